"""Binary conv kernels on CUDA: every stage a flat grid, each thread of the popcount stage
accumulating a few output channels of one output position in registers."""

from __future__ import annotations

from .tir_util import SCHEDULE_ERRORS, divisor

def _bind_flat(sch, block, threads=256):
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops)
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return bx, tx


_CUDA_POPCOUNT = []


def register_cuda_popcount():
    """Lower ``tirx.popcount`` of any width for CUDA: ``__popc`` (<= 32 bits) / ``__popcll``.

    TVM's own CUDA rule covers 32- and 64-bit operands only; narrow packed words (8/16 bits,
    for layers with few channels per group) are widened to 32 bits first.
    """
    if _CUDA_POPCOUNT:
        return
    from tvm import tirx

    def lower(op):
        x = op.args[0]
        bits = tvm_dtype_bits(x.ty.dtype)
        if bits == 64:
            r = tirx.call_pure_extern("int32", "__popcll", x)
        else:
            r = tirx.call_pure_extern("int32", "__popc", x.astype("uint32") if bits < 32 else x)
        return r.astype(str(op.ty.dtype))

    tirx.register_intrin_lowering("tirx.popcount", target="cuda", f=lower, level=99)
    _CUDA_POPCOUNT.append(True)


def tvm_dtype_bits(dtype) -> int:
    import re

    if hasattr(dtype, "bits"):
        return int(dtype.bits)
    m = re.search(r"(\d+)", str(dtype))
    return int(m.group(1)) if m else 32


def schedule_binary_cuda(func, p, spec):
    from tvm import s_tir

    register_cuda_popcount()
    sch = s_tir.Schedule(func)
    # pack: one thread per word, the 64 bits accumulated in a register
    pk = sch.get_sblock("bdp_pack")
    loops = sch.get_loops(pk)
    fused = sch.fuse(*loops[:-1])
    bx, tx = sch.split(fused, factors=[None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    loc = sch.cache_write(pk, 0, "local")
    sch.reverse_compute_at(loc, tx)
    sch.decompose_reduction(pk, loops[-1])
    try:
        _bind_flat(sch, sch.get_sblock("bdp_pad"))
    except SCHEDULE_ERRORS:  # no pad stage
        pass
    # popcount: each thread owns mt output channels of one output position
    blk = sch.get_sblock("bdp_popcount")
    n, m, y, x, r, s, c = sch.get_loops(blk)
    mt = divisor(p.mg, (4, 2, 1))
    mo, mi = sch.split(m, [None, mt])
    sch.reorder(n, mo, y, x, r, s, c, mi)
    fused = sch.fuse(n, mo, y, x)
    bx, tx = sch.split(fused, factors=[None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    loc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(loc, tx)
    if p.out_mode == "bits" or p.ow_padded != p.out_hw[1]:
        bb = sch.get_sblock("bdp_binary_conv")  # one thread per output byte / value
        loops = sch.get_loops(bb)
        fused = sch.fuse(*loops[:-1])
        bx2, tx2 = sch.split(fused, factors=[None, 128])
        sch.bind(bx2, "blockIdx.x")
        sch.bind(tx2, "threadIdx.x")
    else:
        sch.reverse_compute_inline(sch.get_sblock("bdp_binary_conv"))
    sch.unroll(mi)
    sch.decompose_reduction(blk, r)
    return sch.mod["main"]
