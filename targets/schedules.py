"""Schedules for bdp's kernels and for the float operators around them, per target.

Binary kernels
--------------
Each ``bdp.BinaryConv`` PrimFunc carries the attribute ``bdp.kernel`` and its parameters
(``bdp.params``, JSON, also on the popcount block so that it survives fusion). On CPUs the
kernel's Relax op pattern is "output-elementwise fusable": FuseOps fuses the float ops that
follow it (scale, bias, BatchNorm, PReLU, residual add, sign) and the producers of its input
into one PrimFunc, which :func:`float_schedule_pass` recognizes (:func:`bdp_kernel_params`) and
schedules as one kernel: :func:`_absorb_fused` folds the consumers into the output stage and
the producers into the pack stage. On CUDA (and with ``BDP_FLOAT_SCHEDULE=0``)
:func:`schedule_module` schedules each kernel alone before the pipeline and marks it
``tir.is_scheduled`` and opaque. On CPUs the popcount stage is
register-blocked in one of two orientations, picked per layer by :func:`binary_conv_plan`
(``VL`` = packed words per vector register: 8 uint64 on AVX-512, 4 on AVX2, 2 on NEON; twice,
four or eight times that for 32/16/8-bit words):

* **x** (wide outputs): a tile of ``xv`` consecutive output columns (one vector register of
  words, ``xv`` the widest power of two <= VL dividing OW) times ``mt`` output channels
  (unrolled); per tap and channel word: one vector load of packed input (consecutive columns are
  consecutive words thanks to the pad stage's phase split), ``mt`` scalar weight broadcasts and
  ``mt`` XOR + popcount + add.
* **k** (narrow outputs, many channels; needs ``M/group`` % VL == 0): a tile of ``wt`` output
  columns (unrolled) times ``kt`` output channels (``kt / VL`` vector registers); per tap and
  channel word: ``wt`` broadcasts of input words, ``kt / VL`` vector weight loads and
  ``wt * kt / VL`` XOR + popcount + add.

In orientation k the accumulator block is laid out with the output channels innermost (the
vector lanes), so the popcount loop reads and writes it with whole vectors; only its write-back
gathers. Orientation k is taken where an x tile would fill less than half a register.

The accumulators live in a ``local`` cache block placed under the tile, the float epilogue is
inlined into its write-back (``reverse_compute_inline``: no integer tensor reaches memory), the
tile loops are fused with the rows and run in parallel (when the layer is big enough to pay for
a parallel region), the reduction init is decomposed last. The pack stage is a vectorized loop
over columns with the channel bits of a word unrolled (in a register), parallel over rows;
the pad stage is a copy of words. A kernel whose input is a concatenation or a resize read by
nothing else gets its pack stage as a Relax function of its own (op pattern injective, see
:func:`bdp.targets.lower.pack_apart`): FuseOps fuses the resizes and the concatenation into it
(never into a kernel), and :func:`schedule_pack_cpu` unrolls a pixel's words in chunks of bits
that each read one piece of the concatenation, so each copy reads its piece directly; the
float concatenation is never written, only its words. LLVM turns the vector popcount into ``vpopcntq``/``vpopcntd``/
``vpopcntw`` (``icelake-server``), a ``vpshufb`` nibble lookup (``haswell``), or NEON ``cnt`` +
``uaddlp``/``uadalp`` (AArch64).

On CUDA every stage is a flat grid (``blockIdx.x``/``threadIdx.x`` over the fused spatial
loops, columns fastest so warps read consecutive words); each thread of the popcount stage
accumulates a few output channels of one output position in registers (``__popcll``/``__popc``,
see :func:`register_cuda_popcount`).

Float operators
---------------
TVM's default Relax pipeline for CPUs legalizes operators to TOPI compute and schedules nothing:
every loop nest runs serially and unvectorized (``dlight`` has CPU rules for GEMV and row
reductions only). :func:`relax_pipeline` inserts :func:`float_schedule_pass` after legalization
and fusion for CPU targets; it gives every PrimFunc without ``tir.is_scheduled`` a generic,
tuning-free schedule (:func:`schedule_float_cpu`):

* injective producers are inlined into their consumers, except constant padding in front of a
  reduction that reads each input element several times, a conv (kept as a parallel copy, so
  the inner loop has no bounds checks; in front of pooling the copy costs more), producers read
  more than once per output (bilinear resize taps) and producers of a concatenation whose
  pieces cannot be split into a few equal chunks (:func:`_schedule_concat` unrolls those chunks,
  so each copy of the loop body reads one piece and the inlined producer runs vectorized);
* the main reduction block (conv2d, grouped/depthwise conv, conv2d_transpose, matmul, pooling)
  is register-blocked: orientation "x" vectorizes the innermost output axis (one or two
  registers) and unrolls an output axis that the x-dependent operand ignores (conv: output
  channels); strided reads get a phase-split layout so the vector loads stay contiguous (of
  the padding copy, or of a copy of their own where the reduction reads each input element at
  least ``PHASE_SPLIT_MIN_REUSE`` times: not for pooling, whose strided loads cost less).
  Orientation "u", for outputs too narrow for a vector (1x1 convs and depthwise convs at 1/16
  and 1/32 scale), vectorizes that other axis instead: constant operands (weights) are
  re-laid out at compile time (the PrimFunc's parameter changes layout and the Relax call
  sites get permuted constants), others get a copy when cheap next to the work. The
  accumulators stay in registers, elementwise consumers are inlined into their write-back;
* reductions along the contiguous innermost axis (means, softmax, global pooling) are split
  with ``rfactor`` into vector partial sums;
* every other block is parallelized over its outer loops and vectorized innermost.

Loops stay serial below a minimum amount of work (``PARALLEL_MIN_*``): a parallel region costs a
thread wake-up, and far more on a busy machine when a worker has been descheduled.
"""

from __future__ import annotations

import os

from .fastmath import rewrite_exp
from .lower import BDP_KERNEL_ATTR

# ---------------------------------------------------------------------------------------------
# Targets


def vector_bits(spec) -> int:
    """Width of the target's vector registers in bits."""
    if spec.arch == "aarch64":
        return 128
    if spec.popcount_isa.startswith("avx512"):
        return 512
    if spec.popcount_isa == "avx2":
        return 256
    return 128


def vector_lanes(spec, bits=64) -> int:
    """Lanes of BITS-bit integers in a vector register."""
    return max(1, vector_bits(spec) // bits)


def _vector_registers(spec) -> int:
    if spec.arch == "aarch64":
        return 32
    if spec.popcount_isa.startswith("avx512"):
        return 32
    return 16


def _float_lanes(spec) -> int:
    """float32 lanes of a vector register."""
    return vector_lanes(spec, 32)


# ---------------------------------------------------------------------------------------------
# Binary conv: plan


def _loops_below(sch, block, anchor):
    """The loops of BLOCK nested inside loop ANCHOR."""
    loops = sch.get_loops(block)
    a = sch.get(anchor)
    for i, lp in enumerate(loops):
        if sch.get(lp).same_as(a):
            return loops[i + 1:]
    return []


def _vectorize_if(sch, loop, lo=2):
    """Vectorize LOOP when its extent is a power of two >= LO."""
    if loop is None:
        return
    ext = _extent(sch, loop)
    if ext is not None and ext >= lo and ext & (ext - 1) == 0:
        sch.vectorize(loop)


def _divisor(n, prefs):
    for d in prefs:
        if d <= n and n % d == 0:
            return d
    return None


def binary_conv_plan(p, spec) -> dict:
    """The tiling of one binary conv on a CPU target: orientation and tile sizes."""
    vl = vector_lanes(spec, p.word)
    regs = _vector_registers(spec)
    oh, ow = p.out_hw
    mg = p.mg
    force = os.environ.get("BDP_BINARY_ORIENT")  # "x" or "k": for experiments and tests
    k_ok = mg % vl == 0
    # x tile: the widest power of two up to a register that divides OW (no ragged vectors)
    xv = next(v for v in (vl, vl // 2, vl // 4, vl // 8, 8, 4, 2, 1) if v <= vl and ow % v == 0)
    if force in ("x", "k"):
        orient = force if (force == "x" or k_ok) else "x"
    elif k_ok and (2 * xv < vl or ow < 4 * xv):
        orient = "k"
    else:
        orient = "x"
    # accumulator budget: about half the vector registers (the rest: operands, popcount temporaries)
    budget = regs // 2 if spec.popcount_isa != "avx2" else 8
    if orient == "x":
        nvec = -(-xv // vl)
        mt = _divisor(mg, [d for d in (8, 6, 4, 3, 2, 1) if d * nvec <= budget]) or 1
        return {"orient": "x", "xv": xv, "mt": mt, "vl": vl}
    kt = 2 * vl if (mg % (2 * vl) == 0 and 2 * budget >= 4 * 2) else vl
    nk = kt // vl
    wmax = max(1, budget // nk)
    wt = _divisor(ow, [d for d in (4, 5, 6, 3, 8, 7, 2) if d <= wmax]) or min(4, wmax, ow)
    return {"orient": "k", "kt": kt, "wt": wt, "vl": vl}


def _pack_width(w, vl):
    for v in (4 * vl, 2 * vl):
        if w % v == 0:
            return v
    if w <= 4 * vl:
        return w
    return 2 * vl


# ---------------------------------------------------------------------------------------------
# Binary conv: CPU


def _pack_tiles(sch, vl, words_inner):
    """The pack block's loops: columns split into vectors (innermost), a word's bits above them
    accumulated in a register (a local cache written back per word), the rows fused outermost,
    with the words among them or, WORDS_INNER, just above the bits. Returns (block, rows, words
    loop, bits loop)."""
    pk = sch.get_sblock("bdp_pack")
    n, g, c, y, x, kb = sch.get_loops(pk)
    xo, xi = sch.split(x, [None, _pack_width(_extent(sch, x), vl)])
    if words_inner:
        sch.reorder(n, g, y, xo, c, kb, xi)
        at, rows = c, (n, g, y)
    else:
        sch.reorder(n, g, c, y, xo, kb, xi)
        at, rows = xo, (n, g, c, y)
    loc = sch.cache_write(pk, 0, "local")
    sch.reverse_compute_at(loc, at)
    _vectorize_if(sch, xi)
    below = _loops_below(sch, loc, at)
    _vectorize_if(sch, below[-1] if below else None)
    return pk, sch.fuse(*rows), c, kb


def _sched_pack_cpu(sch, vl, parallel):
    pk, rows, _, kb = _pack_tiles(sch, vl, words_inner=False)
    if parallel:
        sch.parallel(rows)
    sch.decompose_reduction(pk, kb)
    sch.unroll(kb)  # the word's bits: shifts and channel offsets become constants


def _is_pack_function(func) -> bool:
    """A pack stage of its own (``in_words`` kernels, :func:`bdp.targets.lower.pack_apart`), with
    the producers Relax fused into it."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name, want in (("bdp_pack", True), ("bdp_popcount", False)):
        try:
            sch.get_sblock(name)
            found = True
        except Exception:
            found = False
        if found != want:
            return False
    return True


PACK_UNROLL_MAX_BITS = 1024  # a pack function without a splittable concatenation: bits unrolled up to this many


def schedule_pack_cpu(func, spec):
    """A pack function with its fused producers (resizes, concatenation): the producers read once
    per value are inlined into the pack (a concatenation's selection, a resize's row blend), the
    rest (a resize's column blend) stay parallel vectorized stages. The pack runs rows in
    parallel with a vector of columns innermost. Its bits are split into chunks that each read one
    piece of the concatenation (the pieces' common divisor, :func:`_concat_split`); the words and
    chunks are unrolled, so each copy's piece is known at compile time (the others fold away) and
    the float concatenation is never written, only its words. Without a concatenation the bits
    of a word are unrolled."""
    import math

    from tvm import s_tir

    sch = s_tir.Schedule(func)
    lanes = _float_lanes(spec)
    blocks = _root_blocks(sch)
    plans = [_concat_split(sch.get(b)) for b in blocks]
    plans = [pl for pl in plans if pl is not None]
    chunk = plans[0][1] if len(plans) == 1 and plans[0][0] == 1 else None
    has_concat = any(_has_conditional(sch.get(b).body, select=False) for b in blocks)
    any_concat = {sch.get(b).name_hint: True for b in blocks}  # made uniform by the unrolled chunks
    for b in blocks:
        stmt = sch.get(b)
        if stmt.name_hint == "bdp_pack" or "R" in _iter_kinds(stmt):
            continue
        if _inline_is_cheap(sch, b, any_concat):
            try:
                sch.compute_inline(b)
            except Exception:
                pass
    _, _, _, _, x, _ = sch.get_loops(sch.get_sblock("bdp_pack"))
    w = _extent(sch, x)
    pk, rows, c, kb = _pack_tiles(sch, vector_lanes(spec, 64), words_inner=True)
    cw, bits = _extent(sch, c), _extent(sch, kb)
    if _extent(sch, rows) * w * cw * bits >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(rows)
    step = math.gcd(chunk, bits) if chunk else 0
    if has_concat and step:
        kbo, kbi = sch.split(kb, [None, step])
        sch.decompose_reduction(pk, kbo)
        sch.unroll(kbo)
        sch.unroll(c)
        if step <= 8:
            sch.unroll(kbi)
    else:
        sch.decompose_reduction(pk, kb)
        sch.unroll(kb)
        if has_concat and cw * bits <= PACK_UNROLL_MAX_BITS:
            sch.unroll(c)
    for b in _root_blocks(sch):
        if sch.get(b).name_hint != "bdp_pack" and all(sch.get(lp).kind == 0 for lp in sch.get_loops(b)):
            _schedule_injective(sch, b, lanes)
    return sch.mod["main"]


def _sched_pad_cpu(sch, parallel):
    try:
        pd = sch.get_sblock("bdp_pad")
    except Exception:  # no pad stage
        return
    loops = sch.get_loops(pd)
    rows = sch.fuse(*loops[:4])
    if parallel:
        sch.parallel(rows)


def _sched_bits_cpu(sch, p):
    """The packed-bit output stage: 8 channels' threshold bits OR-ed into a byte, columns
    innermost (P rows are contiguous along x), rows in parallel."""
    bb = sch.get_sblock("bdp_binary_conv")
    n, b, y, x, j = sch.get_loops(bb)
    sch.reorder(n, b, y, j, x)
    rows = sch.fuse(n, b, y)
    oh, ow = p.out_hw
    if p.n * p.m * oh * ow >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(rows)
    sch.decompose_reduction(bb, j)
    sch.unroll(j)


def _bits_in_tile(sch, loc, at, p, tile_m):
    """Packed-bit output straight from the registers: when a tile holds whole bytes of channels
    (TILE_M a multiple of 8), the byte stage moves under tile loop AT and reads the accumulators
    (the write-back LOC is inlined into it), so no int32 tensor reaches memory; 8 channels' bits
    OR-ed per byte, vectorized over the tile's columns. Returns the step that decomposes the
    byte reduction, to run last."""
    bb = sch.get_sblock("bdp_binary_conv")
    sch.reverse_compute_at(bb, at)
    sch.compute_inline(loc)
    loops = _loops_below(sch, bb, at)  # [bytes, columns, jb], the unit ones dropped
    nb = 1 if tile_m > 8 else 0
    if len(loops) not in (nb + 1, nb + 2) or _extent(sch, loops[-1]) != 8:
        raise RuntimeError(f"bdp: unexpected byte-stage loops {[_extent(sch, lp) for lp in loops]}")
    jb = loops[-1]
    if len(loops) == nb + 2:
        x = loops[-2]
        sch.reorder(jb, x)
        _vectorize_if(sch, x)
    sch.unroll(jb)
    return lambda: sch.decompose_reduction(bb, jb)  # after the tile loops are parallel


def _register_accumulators(sch, blk, at, p, epilogue, tile_m=0, lanes_last=False):
    """Keep BLK's accumulators in registers: a local cache of the tile written back (vectorized)
    below loop AT; then the output stage, packed bits or EPILOGUE() for float / ±1 output. Packed
    bits come from the registers (:func:`_bits_in_tile`) when the tile's TILE_M channels are whole
    bytes, else from an int32 tensor in a stage of their own. Returns a step to run after the
    tile loops are parallel, or None."""
    loc = sch.cache_write(blk, 0, "local")
    if lanes_last:  # orientation k: the vector lanes (output channels) innermost
        sch.transform_layout(blk, ("write", 0), lambda n, m, y, x: (n, y, x, m))
    sch.reverse_compute_at(loc, at)
    if p.out_mode == "bits":
        if tile_m and tile_m % 8 == 0 and p.m % tile_m == 0 and os.environ.get("BDP_BITS_IN_TILE", "1") != "0":
            return _bits_in_tile(sch, loc, at, p, tile_m)
        _sched_bits_cpu(sch, p)
    else:
        epilogue()
    below = _loops_below(sch, loc, at)
    _vectorize_if(sch, below[-1] if below else None)
    return None


def _depthwise_cpu(sch, p, blk, loops):
    """One input channel per group: the taps are 0/1 bytes, added in uint8 (int16 for kernels of
    256+ taps) over vectors of 16/32 output columns kept in registers across every tap (the row is
    computed rounded up to whole vectors, see ``ow_padded``); the float / ±1 epilogue runs in the
    same parallel row loop, right after the row's taps (one parallel region less, the row's
    counts still in L1)."""
    n, m, y, x, r, s, c = loops
    v = 16 if p.ow_padded <= 16 else 32
    xo, xi = sch.split(x, [None, v])
    sch.reorder(n, m, y, xo, r, s, c, xi)
    oh, ow = p.out_hw
    parallel = p.n * p.m * oh * ow >= PARALLEL_MIN_ELEMENTS  # a depthwise tap is a byte add

    _register_accumulators(sch, blk, xo, p, lambda: None)  # the epilogue: below, in the row loop
    rows = sch.fuse(n, m, y)
    if parallel:
        sch.parallel(rows)
    if p.out_mode != "bits":
        ep = sch.get_sblock("bdp_binary_conv")
        sch.reverse_compute_at(ep, rows)
        vx = next(d for d in (16, 8, 4, 2, 1) if ow % d == 0)
        if vx > 1:
            _, exi = sch.split(_loops_below(sch, ep, rows)[-1], [None, vx])
            sch.vectorize(exi)
    sch.vectorize(xi)
    init = sch.decompose_reduction(blk, r)
    sch.vectorize(sch.get_loops(init)[-1])


def _absorb_fused(sch):
    """Fold what Relax fused around a bdp kernel into its stages: elementwise consumers into the
    output block (``reverse_compute_inline``: the epilogue computes them in registers), producers
    into the pack stage. Returns the names of the blocks that would not fold (scheduled apart)."""
    ep = sch.get_sblock("bdp_binary_conv")
    while True:
        cons = sch.get_consumers(ep)
        if len(cons) != 1:
            break
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:
            break
    rest = []
    for b in _root_blocks(sch):
        name = sch.get(b).name_hint
        if name.startswith("bdp_"):
            continue
        try:
            sch.compute_inline(b)
        except Exception:
            rest.append(name)
    return rest


def _schedule_rest(sch, rest, spec):
    lanes = _float_lanes(spec)
    for name in rest:
        b = sch.get_sblock(name)
        if all(sch.get(lp).kind == 0 for lp in sch.get_loops(b)):
            _schedule_injective(sch, b, lanes)


def _cpu_binary_schedule(func, p, spec):
    from tvm import s_tir

    plan = binary_conv_plan(p, spec)
    sch = s_tir.Schedule(func)
    rest = _absorb_fused(sch)
    if not p.in_words:
        _sched_pack_cpu(sch, vector_lanes(spec, 64), p.n * p.c * p.h * p.w >= 4 * PARALLEL_MIN_ELEMENTS)
    hp, wp = p.padded_hw
    _sched_pad_cpu(sch, p.n * p.group * p.cw * hp * wp >= PARALLEL_MIN_ELEMENTS)
    blk = sch.get_sblock("bdp_popcount")
    n, m, y, x, r, s, c = sch.get_loops(blk)
    if p.depthwise:
        _depthwise_cpu(sch, p, blk, (n, m, y, x, r, s, c))
        _schedule_rest(sch, rest, spec)
        return sch.mod["main"]
    if plan["orient"] == "x":
        mo, mi = sch.split(m, [None, plan["mt"]])
        xo, xi = sch.split(x, [None, plan["xv"]])
        sch.reorder(n, y, xo, mo, r, s, c, mi, xi)
        inner = [("unroll", mi), ("vectorize", xi)]
    else:
        mo, mb, mi = sch.split(m, [None, plan["kt"] // plan["vl"], plan["vl"]])
        xo, xi = sch.split(x, [None, plan["wt"]])
        sch.reorder(n, y, xo, mo, r, s, c, xi, mb, mi)
        inner = [("unroll", xi), ("unroll", mb), ("vectorize", mi)]
    finish = _register_accumulators(sch, blk, mo, p,
                                    lambda: sch.reverse_compute_inline(sch.get_sblock("bdp_binary_conv")),
                                    plan["mt"] if plan["orient"] == "x" else plan["kt"],
                                    lanes_last=plan["orient"] == "k")
    tiles = sch.fuse(n, y, xo)
    if p.binary_macs >= PARALLEL_MIN_BINARY_MACS:
        sch.parallel(tiles)
    for kind, loop in inner:
        if int(sch.get(loop).extent) > 1:
            getattr(sch, kind)(loop) if kind == "unroll" else _vectorize_if(sch, loop)
    sch.decompose_reduction(blk, r)
    if finish is not None:
        finish()
    _schedule_rest(sch, rest, spec)
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------
# Binary conv: CUDA


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


def _cuda_binary_schedule(func, p, spec):
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
    except Exception:
        pass
    # popcount: each thread owns mt output channels of one output position
    blk = sch.get_sblock("bdp_popcount")
    n, m, y, x, r, s, c = sch.get_loops(blk)
    mt = _divisor(p.mg, (4, 2, 1))
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


def bdp_kernel_params(func):
    """The BinaryConvParams of the bdp kernel inside PrimFunc FUNC (alone, or with the elementwise
    ops Relax fused into it), or None for a function without one."""
    from tvm import s_tir

    from .kernels import BinaryConvParams

    if func.attrs is not None and "bdp.params" in func.attrs:
        return BinaryConvParams.from_json(str(func.attrs["bdp.params"]))
    sch = s_tir.Schedule(func)
    try:
        ann = sch.get(sch.get_sblock("bdp_popcount")).annotations
    except Exception:
        return None
    return BinaryConvParams.from_json(str(ann["bdp.params"])) if "bdp.params" in ann else None


def fuses_epilogues(spec) -> bool:
    """True where bdp kernels are scheduled inside bdp's Relax pipeline, after FuseOps has fused
    their elementwise consumers into them (CPU targets); elsewhere (CUDA, or
    BDP_FLOAT_SCHEDULE=0) they are scheduled alone beforehand by :func:`schedule_module`."""
    return spec.arch != "cuda" and os.environ.get("BDP_FLOAT_SCHEDULE", "1") != "0"


def schedule_binary_conv(func, spec, p=None):
    """The scheduled PrimFunc of one ``bdp_binary_conv`` kernel (with any elementwise ops fused
    into it) for SPEC."""
    p = p or bdp_kernel_params(func)
    if spec.arch == "cuda":
        return _cuda_binary_schedule(func, p, spec)
    return _cpu_binary_schedule(func, p, spec)


def schedule_module(mod, spec):
    """MOD with every bdp kernel scheduled for SPEC and marked ``tir.is_scheduled``."""
    import tvm

    out = tvm.IRModule(mod.functions, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(mod.functions)
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or BDP_KERNEL_ATTR not in func.attrs:
            continue
        if "tir.is_scheduled" in func.attrs and bool(func.attrs["tir.is_scheduled"]):
            continue
        if str(func.attrs[BDP_KERNEL_ATTR]) != "binary_conv":
            raise RuntimeError(f"bdp: {gv.name_hint} ({func.attrs[BDP_KERNEL_ATTR]}) is scheduled after fusion only")
        new = schedule_binary_conv(func, spec)
        # scheduled alone: opaque to FuseOps from here on
        new = new.with_attr("tir.is_scheduled", True).with_attr("op_pattern", 8)
        out[gv] = new
    return out


# ---------------------------------------------------------------------------------------------
# Float operators on CPUs: a generic, tuning-free schedule


def _extent(sch, loop):
    try:
        return int(sch.get(loop).extent)
    except TypeError:
        return None


def _iter_kinds(block_stmt):
    from tvm import tirx

    return "".join({tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}.get(iv.iter_type, "O")
                   for iv in block_stmt.iter_vars)


def _vars_in(expr):
    import tvm_ffi
    from tvm import tirx

    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.add(v)), order="post")
    return found


def _region_vars(region):
    out = set()
    for r in region:
        out |= _vars_in(r.min)
        out |= _vars_in(r.extent)
    return out


def _has_conditional(stmt, select=True):
    import tvm
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit_call(c):
        if str(getattr(c.op, "name", "")).endswith("if_then_else"):
            found.append(c)

    visitors = [(tvm.ir.Call, visit_call)]
    if select:
        visitors.append((tirx.Select, lambda s: found.append(s)))
    tvm_ffi.structural_walk(stmt, visitors, order="post")
    return bool(found)


def _loads_of(stmt, buf):
    """How many loads of BUF the statement STMT makes."""
    import tvm
    import tvm_ffi

    n = [0]

    def visit(ld):
        if ld.source.same_as(buf):
            n[0] += 1

    tvm_ffi.structural_walk(stmt, (tvm.ir.TensorLoad, visit), order="post")
    return n[0]


def _inline_is_cheap(sch, block, concats=None):
    """Inlining BLOCK recomputes it once per load in each consumer: only allow single loads, and
    not into a selection between several buffers (concatenation), unless CONCATS (block name ->
    :func:`_concat_split` plan, taken before any inlining) can make the selection uniform per
    loop iteration: vectorized, every branch of a select is computed for every lane."""
    stmt = sch.get(block)
    if not stmt.writes:
        return False
    buf = stmt.writes[0].source
    for c in sch.get_consumers(block):
        cs = sch.get(c)
        if _loads_of(cs.body, buf) > 1:
            return False
        tensors = {r.source for r in cs.reads if len(r.region) > 0}
        if (len(tensors) > 1 and "R" not in _iter_kinds(cs) and _has_conditional(cs.body, select=False)
                and (concats or {}).get(cs.name_hint) is None):
            return False
    return True


CONCAT_MAX_PIECES = 16  # a concatenation's pieces are unrolled: at most this many


def _concat_split(stmt):
    """For a concatenation block STMT (spatial, an if_then_else between the buffers it reads,
    every read buffer shaped like the output except along one axis): ``(axis, g, n)``, where
    every piece's size along AXIS is a multiple of G and the output has N = size/G chunks of G,
    each of which reads one piece only; None for anything else (or more than
    ``CONCAT_MAX_PIECES`` chunks, or a concatenation along the innermost axis)."""
    import math

    if "R" in _iter_kinds(stmt) or "O" in _iter_kinds(stmt) or len(stmt.writes) != 1:
        return None
    if not _has_conditional(stmt.body, select=False):
        return None
    try:
        out = [int(d) for d in stmt.writes[0].source.shape]
    except TypeError:
        return None
    if len(out) != len(stmt.iter_vars):
        return None
    axis, sizes = None, []
    bufs = {r.source for r in stmt.reads}
    if len(bufs) < 2:
        return None
    for b in bufs:
        try:
            shape = [int(d) for d in b.shape]
        except TypeError:
            return None
        if len(shape) != len(out):
            return None
        diff = [i for i, (u, v) in enumerate(zip(shape, out)) if u != v]
        if len(diff) > 1 or (diff and axis is not None and diff[0] != axis):
            return None
        if diff:
            axis = diff[0]
        sizes.append(shape)
    if axis is None or axis == len(out) - 1:
        return None
    g = 0
    for shape in sizes:
        g = math.gcd(g, shape[axis])
    n = out[axis] // g
    if g == 0 or out[axis] % g or not 2 <= n <= CONCAT_MAX_PIECES:
        return None
    return axis, g, n


def _schedule_concat(sch, block, lanes, plan):
    """Split a concatenation's axis into N chunks of G (each chunk reads one piece), move the
    chunk loop just above the innermost loop and unroll it: every unrolled copy keeps one branch
    of the selection (the loop bounds decide it), so the producers inlined into it (a resize's
    row blend) run vectorized without computing the other pieces. Parallel over the outer loops,
    vectorized innermost. PLAN: :func:`_concat_split` of the block before its producers were
    inlined (None: returns False)."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if plan is None or len(loops) != len(stmt.iter_vars):
        return False
    axis, g, n = plan
    o, i = sch.split(loops[axis], [n, g])
    outer = list(loops[:axis]) + [i] + list(loops[axis + 1:-1])
    inner = loops[-1]
    sch.reorder(*outer, o, inner)
    total = 1
    for lp in outer:
        total *= _extent(sch, lp) or 1
    work = total * n * (_extent(sch, inner) or 1)
    if work >= PARALLEL_MIN_ELEMENTS:
        _par_fuse(sch, outer)
    sch.unroll(o)
    v = _choose_vec(_extent(sch, inner), lanes)
    if v is not None:
        _, ii = sch.split(inner, [None, v])
        sch.vectorize(ii)
    return True


def _root_blocks(sch):
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    return sch.get_child_blocks(root)


def _is_output_block(sch, block):
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    name = sch.get(block).name_hint
    return any(sch.get(b).name_hint == name for b in sch.get_output_blocks(root))


# Below these amounts of work a parallel region costs more than it saves (thread wake-up, and on a
# busy machine the wait for a descheduled worker); such loops stay serial.
PARALLEL_MIN_ELEMENTS = 32768  # elementwise outputs
PARALLEL_MIN_MACS = 1 << 20  # float multiply-accumulates
PARALLEL_MIN_BINARY_MACS = 16 << 20  # binary multiply-accumulates (XOR + popcount lanes)


def _choose_vec(ext, lanes):
    """Vector length for an innermost loop of extent EXT (None: do not vectorize).

    Powers of two only (LLVM legalizes odd vector lengths badly): two registers, one, half or
    a quarter of one, whichever divides EXT.
    """
    if ext is None or ext < 4:
        return None
    for v in (2 * lanes, lanes, lanes // 2, lanes // 4):
        if v >= 4 and ext % v == 0:
            return v
    return None


def _par_fuse(sch, loops):
    """Fuse LOOPS (outermost first) and mark the result parallel; returns it (or None)."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = _extent(sch, fused)
    if ext is None or ext >= 2:
        sch.parallel(fused)
    return fused


def _schedule_injective(sch, block, lanes, min_parallel_work=PARALLEL_MIN_ELEMENTS):
    """Parallel over the outer loops, vectorized innermost loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    stmt = sch.get(block)
    kinds = _iter_kinds(stmt)
    if len(kinds) != len(loops) or "O" in kinds:
        return  # loops that do not map one to one onto the block's iterators: leave them
    if "R" in kinds:
        # a reduction left alone: parallelize its leading spatial loops only
        lead = []
        for lp, k in zip(loops, kinds):
            if k != "S":
                break
            lead.append(lp)
        total = 1
        for lp in lead:
            total *= _extent(sch, lp) or 1
        work = 1
        for lp in loops:
            work *= _extent(sch, lp) or 1
        if lead and total >= 2 and work >= min_parallel_work:
            _par_fuse(sch, lead)
        return
    total = 1
    for lp in loops:
        total *= _extent(sch, lp) or 1
    inner = loops[-1]
    iext = _extent(sch, inner)
    v = _choose_vec(iext, lanes)
    if v is None and iext is not None and iext > 2 * lanes:
        v = lanes  # ragged tail
    outer = list(loops[:-1])
    if v is not None and v != iext:
        io, ii = sch.split(inner, [None, v])
        outer.append(io)
        inner = ii
    if v is not None:
        sch.vectorize(inner)
    elif not outer:
        outer = list(loops)
    if outer and total >= min_parallel_work:
        _par_fuse(sch, outer)


def _pick_unroll_axis(sch, block_stmt, spatial_vars, x_var):
    """The spatial iterator (not X) to register-block: one the x-dependent reads ignore."""
    best, best_key = None, None
    reads = [_region_vars(r.region) for r in block_stmt.reads]
    writes_vars = _region_vars(block_stmt.writes[0].region)
    for i, iv in enumerate(block_stmt.iter_vars[: len(spatial_vars) - 1]):
        v = iv.var
        if v not in writes_vars or int(iv.dom.extent) < 2:
            continue
        score = sum((2 if x_var in rv else 1) for rv in reads if v not in rv)
        key = (score, int(iv.dom.extent))
        if score > 0 and (best_key is None or key > best_key):
            best, best_key = i, key
    return best


def _phase_split_strided_reads(sch, block, x_var, reuse=None):
    """Give reads that step by S > 1 along X (strided convs, pooling) a phase-split layout.

    The buffer (a padding stage in this function, or a copy made with ``cache_read``) is stored
    as ``[..., w % S, w // S]``, so consecutive output columns read consecutive elements and the
    vectorized loads stay contiguous.
    """
    from tvm.sym import detect_linear_equation

    stmt = sch.get(block)
    for i, r in enumerate(stmt.reads):
        idx = r.region[-1].min
        if x_var not in _vars_in(idx):
            continue
        coeff = detect_linear_equation(idx, [x_var])
        if not coeff:
            continue
        try:
            stride = int(coeff[0])
        except (TypeError, ValueError):
            continue
        if stride <= 1:
            continue
        buf = r.source
        prod = [p for p in sch.get_producers(block) if any(w.source.same_as(buf) for w in sch.get(p).writes)]
        try:
            if int(buf.shape[-1]) % stride:
                continue
            if not prod and reuse is not None and reuse < PHASE_SPLIT_MIN_REUSE:
                continue  # a copy of its own would cost more than the strided reads it saves
            pblk = prod[0] if prod else sch.cache_read(block, i, "global")
            sch.transform_layout(pblk, ("write", 0), _phase_split_map(stride, len(buf.shape)))
            try:
                # iterate the copy in its new layout: contiguous (vector) writes, strided reads,
                # instead of a scatter of every vector it writes
                sch.transform_block_layout(pblk, _phase_split_map(stride, len(sch.get_loops(pblk))))
            except Exception:
                pass
        except Exception:
            continue
        stmt = sch.get(block)


PHASE_SPLIT_MIN_REUSE = 4  # reads per input element that pay for a phase-split copy of its own


def _feeds_light_reduction(sch, block):
    """BLOCK (a padding stage) is read only by reductions that read each input element fewer
    than ``PHASE_SPLIT_MIN_REUSE`` times (pooling): its copy costs more than the bounds checks
    it saves."""
    cons = sch.get_consumers(block)
    if not cons:
        return False
    for c in cons:
        stmt = sch.get(c)
        if "R" not in _iter_kinds(stmt):
            return False
        macs = 1
        for lp in sch.get_loops(c):
            macs *= _extent(sch, lp) or 1
        reuse = _reads_per_input(sch, stmt, macs)
        if reuse is None or reuse >= PHASE_SPLIT_MIN_REUSE:
            return False
    return True


def _reads_per_input(sch, stmt, macs):
    """MACS over the elements of the largest buffer STMT reads: how often each is read."""
    biggest = 0
    for r in stmt.reads:
        try:
            n = 1
            for d in r.source.shape:
                n *= int(d)
        except TypeError:
            return None
        biggest = max(biggest, n)
    return macs / biggest if biggest else None


def _phase_split_map(stride, nd):
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *ax: (*ax[:-1], ax[-1] % stride, ax[-1] // stride), ndim=nd)


def _move_dim_last(d, nd):
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *ax: (*ax[:d], *ax[d + 1:], ax[d]), ndim=nd)


def _relayout_plan(stmt, u_var):
    """[(read index, buffer, dim, ndim)] of the reads indexed by U_VAR, or None when one of them
    uses it other than as ``u (+ unit-extent reduction iters)`` in a single dimension."""
    unit = {iv.var for iv in stmt.iter_vars if iv.iter_type == 2 and int(iv.dom.extent) == 1}
    plan = []
    for i, r in enumerate(stmt.reads):
        dims = [d for d, rg in enumerate(r.region) if u_var in _vars_in(rg.min)]
        if not dims:
            continue
        if len(dims) != 1:
            return None
        idx = r.region[dims[0]].min
        if _vars_in(idx) - unit != {u_var}:
            return None
        from tvm.sym import detect_linear_equation

        coeff = detect_linear_equation(idx, [u_var])
        if not coeff:
            return None
        try:
            if int(coeff[0]) != 1:
                return None
        except (TypeError, ValueError):
            return None
        plan.append((i, r.source, dims[0], len(r.region)))
    return plan


def _relayout_copied(sch, block, u_var, ctx):
    """Elements copied at run time to put U_VAR's dimension innermost (None: not possible)."""
    plan = _relayout_plan(sch.get(block), u_var)
    if plan is None:
        return None
    params = list(sch.mod["main"].params)
    copied = 0
    for _, buf, d, nd in plan:
        if d == nd - 1:
            continue
        pidx = next((i for i, q in enumerate(params) if buf.same_as(q)), None)
        if pidx is not None and pidx in ctx.get("const_params", ()):
            continue
        n = 1
        for e in buf.shape:
            n *= int(e)
        copied += n
    return copied


def _relayout_innermost(sch, block, u_var, ctx):
    """Move the dimension that U_VAR indexes to the end of every read that depends on it.

    A parameter that is a constant at every call site (weights) is re-laid out at compile time:
    the PrimFunc's parameter changes layout and ``ctx["relayouts"]`` records it for the Relax
    call sites. Any other read gets a copy (``cache_read``, or its producer in this function)
    stored with that dimension innermost. Either way a vector over U is one contiguous load.
    """
    plan = _relayout_plan(sch.get(block), u_var)
    if plan is None:
        return False
    params = list(sch.mod["main"].params)
    for _, buf, d, nd in plan:
        if d == nd - 1:
            continue
        stmt = sch.get(block)
        idx = next(k for k, r in enumerate(stmt.reads) if r.source.same_as(buf))
        pidx = next((i for i, q in enumerate(params) if buf.same_as(q)), None)
        if pidx is not None and pidx in ctx.get("const_params", ()) and pidx not in ctx["relayouts"]:
            sch.transform_layout(block, ("read", idx), _move_dim_last(d, nd))
            ctx["relayouts"][pidx] = (d, nd)
            continue
        prod = [p for p in sch.get_producers(block) if any(w.source.same_as(buf) for w in sch.get(p).writes)]
        pblk = prod[0] if prod else sch.cache_read(block, idx, "global")
        sch.transform_layout(pblk, ("write", 0), _move_dim_last(d, nd))
    return True


def _fuse_consumers(sch, loc):
    changed = True
    while changed:
        changed = False
        for c in sch.get_consumers(loc):
            try:
                sch.reverse_compute_inline(c)
                changed = True
                break
            except Exception:
                continue


def _ops_per_step(stmt) -> float:
    """Arithmetic operations in one execution of block STMT's body, over the two of a
    multiply-accumulate (1 for a conv's update; about 15 for a sum of exps, whose exp is a
    polynomial, see :mod:`bdp.targets.fastmath`)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    n = [0]

    def count(_node):
        n[0] += 1

    kinds = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Max, tirx.Min, tirx.Select, tirx.FloorDiv,
             tirx.FloorMod, tvm.ir.Call)
    tvm_ffi.structural_walk(stmt.body, (kinds, count), order="post")
    return max(1.0, n[0] / 2.0)


def _parallel_outer(sch, outer, macs):
    first = next((i for i, lp in enumerate(outer) if (_extent(sch, lp) or 2) > 1), None)
    if first is None or macs < PARALLEL_MIN_MACS:
        return
    keep, chunks = [], 1
    for lp in outer[first:]:
        keep.append(lp)
        chunks *= _extent(sch, lp) or 1
        if chunks >= 64:
            break
    _par_fuse(sch, keep)


def _tile_reduction(sch, block, lanes, regs, ctx):
    """Register-block a reduction block with spatial iters first (conv, matmul, pooling).

    Orientation "x": the innermost output axis is the vector (one or two registers), an output
    axis that the x-dependent operand ignores (conv: output channels) is unrolled. Orientation
    "u" (when x is too short for a full vector, e.g. 1x1 convs and depthwise convs at 1/16 or
    1/32 scale): that other axis is the vector, its operands get a copy with it innermost, and
    a few x positions are unrolled.
    """
    stmt = sch.get(block)
    kinds = _iter_kinds(stmt)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or "O" in kinds or not kinds.startswith("S") or "R" not in kinds:
        return False
    ns = len(kinds) - len(kinds.lstrip("S"))
    if "S" in kinds[ns:]:
        return False
    svars = [iv.var for iv in stmt.iter_vars[:ns]]
    s_loops, r_loops = list(loops[:ns]), list(loops[ns:])
    macs = 1
    for lp in s_loops + r_loops:
        macs *= _extent(sch, lp) or 1
    work = macs * _ops_per_step(stmt)  # what decides parallel loops: exps cost more than MACs
    x_loop = s_loops[-1]
    xext = _extent(sch, x_loop)
    wregion = stmt.writes[0].region
    if xext is None or _vars_in(wregion[-1].min) != {svars[-1]}:
        return False
    xv = _choose_vec(xext, lanes)
    budget = max(4, regs // 2 - 2)
    ui = _pick_unroll_axis(sch, stmt, svars, svars[-1])
    uext = (_extent(sch, s_loops[ui]) or 1) if ui is not None else 1
    orient = "x"
    if xv is None or xv < lanes:
        # a vector over another output axis whose operands can be re-laid out with it innermost,
        # copies made at run time cheap next to the block's work; preferred: an axis whose
        # operands are all constants (re-laid out at compile time, no copy), e.g. a 1x1 conv's
        # output channels rather than its rows
        cands = []
        for i, iv in enumerate(stmt.iter_vars[: ns - 1]):
            if int(iv.dom.extent) % lanes or iv.var not in _vars_in(wregion[i].min):
                continue
            copied = _relayout_copied(sch, block, iv.var, ctx)
            if copied is not None and copied * 8 <= macs:
                cands.append((copied == 0, int(iv.dom.extent), i))
        if cands:
            orient = "u"
            ui = max(cands)[2]
            uext = _extent(sch, s_loops[ui]) or 1
    if orient == "x" and xv is None:
        return False

    if orient == "u":
        if not _relayout_innermost(sch, block, svars[ui], ctx):
            return False
        uv = 2 * lanes if uext % (2 * lanes) == 0 and xext % 4 == 0 else lanes
        nvec = uv // lanes
        xt = next((d for d in (8, 6, 5, 4, 3, 2, 1) if d * nvec <= budget and xext % d == 0), 1)
        uo, u_in = sch.split(s_loops[ui], [None, uv])
        outer = list(s_loops[:-1])
        outer[ui] = uo
        if xt != xext:
            xo, xi = sch.split(x_loop, [None, xt])
            outer.append(xo)
        else:
            xi = x_loop
        sch.reorder(*outer, *r_loops, xi, u_in)
        loc = sch.cache_write(block, 0, "local")
        if not outer:
            return False
        # accumulators with the vector axis innermost (LLVM keeps them in registers)
        udim = next(d for d, rg in enumerate(sch.get(block).writes[0].region) if svars[ui] in _vars_in(rg.min))
        sch.transform_layout(block, ("write", 0), _move_dim_last(udim, len(sch.get(block).writes[0].region)))
        sch.reverse_compute_at(loc, outer[-1])
        _fuse_consumers(sch, loc)
        wl = _loops_below(sch, loc, outer[-1])
        _vectorize_if(sch, wl[-1] if wl else None, lo=4)
        _parallel_outer(sch, outer, work)
        if (_extent(sch, xi) or 1) > 1:
            sch.unroll(xi)
        _vectorize_if(sch, u_in)
        sch.decompose_reduction(block, r_loops[0])
        return True

    _phase_split_strided_reads(sch, block, svars[-1], reuse=_reads_per_input(sch, stmt, macs))
    stmt = sch.get(block)
    nvec = -(-xv // lanes)
    u_in = None
    outer = list(s_loops[:-1])
    if ui is not None:
        uf = next((d for d in (8, 6, 4, 3, 2) if d * nvec <= budget and uext % d == 0), None)
        if uf is not None:
            uo, u_in = sch.split(s_loops[ui], [None, uf])
            outer[ui] = uo
    if xv != xext:
        xo, xi = sch.split(x_loop, [None, xv])
        outer.append(xo)
    else:
        xi = x_loop
    inner = ([u_in] if u_in is not None else []) + [xi]
    sch.reorder(*outer, *r_loops, *inner)
    loc = sch.cache_write(block, 0, "local")
    if not outer:
        return False
    sch.reverse_compute_at(loc, outer[-1])
    _fuse_consumers(sch, loc)
    wl = _loops_below(sch, loc, outer[-1])
    _vectorize_if(sch, wl[-1] if wl else None)
    _parallel_outer(sch, outer, work)
    if u_in is not None:
        sch.unroll(u_in)
    _vectorize_if(sch, xi)
    sch.decompose_reduction(block, r_loops[0])
    return True


def _tile_row_reduction(sch, block, lanes):
    """Reductions along the contiguous innermost axis (means, softmax sums, global pooling):
    ``rfactor`` the innermost reduction loop into VL partial sums kept in a vector, then add them."""
    stmt = sch.get(block)
    kinds = _iter_kinds(stmt)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or "O" in kinds or not kinds.endswith("R"):
        return False
    ns = len(kinds) - len(kinds.lstrip("S"))
    if "S" in kinds[ns:]:
        return False
    rvar = stmt.iter_vars[-1].var
    if not any(len(r.region) and _vars_in(r.region[-1].min) == {rvar} for r in stmt.reads):
        return False
    v = _choose_vec(_extent(sch, loops[-1]), lanes)
    if v is None:
        return False
    work = 1
    for lp in loops:
        work *= _extent(sch, lp) or 1
    ro, ri = sch.split(loops[-1], [None, v])
    rf = sch.rfactor(ri, factor_axis=ns)
    rl = sch.get_loops(rf)
    # the partial sums' lane loop is innermost already: vectorize it, parallelize the outputs
    sch.vectorize(rl[-1])
    lead = [lp for lp in rl[:ns]]
    if lead and work >= PARALLEL_MIN_ELEMENTS:
        _par_fuse(sch, lead)
    sch.decompose_reduction(rf, rl[ns])
    return True


def schedule_float_cpu(func, spec, const_params=()):
    """(scheduled copy of float PrimFunc FUNC for a CPU target, relayouts), or (None, {}).

    CONST_PARAMS: indices of parameters that are constants at every call site; RELAYOUTS maps
    the ones the schedule wants stored differently to ``(dim, ndim)``: that dimension moved last.
    """
    from tvm import s_tir

    lanes = _float_lanes(spec)
    regs = _vector_registers(spec)
    for attempt in ("tiled", "simple"):
        ctx = {"const_params": set(const_params), "relayouts": {}}
        try:
            sch = s_tir.Schedule(func)
            blocks = _root_blocks(sch)
            red = [b for b in blocks if "R" in _iter_kinds(sch.get(b))]
            concats = {sch.get(b).name_hint: _concat_split(sch.get(b)) for b in blocks}
            # inline injective producers, except padding (kept as a parallel copy)
            for b in blocks:
                stmt = sch.get(b)
                if "R" in _iter_kinds(stmt) or _is_output_block(sch, b):
                    continue
                if red and _has_conditional(stmt.body) and attempt == "tiled" and not _feeds_light_reduction(sch, b):
                    continue
                if not _inline_is_cheap(sch, b, concats):
                    continue
                try:
                    sch.compute_inline(b)
                except Exception:
                    pass
            tiled = set()
            if attempt == "tiled":
                for b in red:
                    name = sch.get(b).name_hint
                    if _tile_reduction(sch, b, lanes, regs, ctx):
                        tiled.add(name)
                    elif _tile_row_reduction(sch, b, lanes):
                        tiled.add(name + "_rf")
                if not tiled:
                    continue
            for b in _root_blocks(sch):
                stmt = sch.get(b)
                if stmt.name_hint in tiled:
                    continue
                loops = sch.get_loops(b)
                if any(sch.get(lp).kind != 0 for lp in loops):  # already parallel / vectorized
                    continue
                if not _schedule_concat(sch, b, lanes, concats.get(stmt.name_hint)):
                    _schedule_injective(sch, b, lanes)
            return sch.mod["main"], ctx["relayouts"]
        except Exception:
            if os.environ.get("BDP_SCHEDULE_DEBUG"):
                raise
            continue
    return None, {}


def _call_tir_sites(mod):
    """{PrimFunc name: [call_tir Call nodes]} over every Relax function of MOD."""
    import tvm
    import tvm_ffi
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites, refs = {}, {}

    def visit(c):
        if c.op.same_as(call_tir) and isinstance(c.args[0], tvm.ir.GlobalVar):
            sites.setdefault(c.args[0].name_hint, []).append(c)

    def ref(gv):
        refs[gv.name_hint] = refs.get(gv.name_hint, 0) + 1

    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            tvm_ffi.structural_walk(f, (tvm.ir.Call, visit), order="post")
            tvm_ffi.structural_walk(f, (tvm.ir.GlobalVar, ref), order="post")
    # a PrimFunc also used any other way than as a call_tir callee keeps its signature
    return {k: v for k, v in sites.items() if refs.get(k, 0) == len(v)}


def _constant_args(calls):
    """Argument indices that are constants at every call site."""
    import tvm

    out = None
    for c in calls:
        args = c.args[1].fields if hasattr(c.args[1], "fields") else []
        idx = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.GenericConst)}
        out = idx if out is None else out & idx
    return out or set()


def _rewrite_constant_args(mod, relayouts):
    """Re-lay out the constant arguments of the call_tir sites named in RELAYOUTS.

    The PrimFuncs' parameter types changed, so they get new GlobalVars (same names) carrying
    the new types, and the call sites are rebuilt with them and the permuted constants.
    """
    import numpy as np
    import tvm
    import tvm_ffi
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    new_gvs = {}
    for gv, f in mod.functions.items():
        plan = relayouts.get(gv.name_hint)
        if not plan or not isinstance(f, tvm.tirx.PrimFunc) or not isinstance(gv.ty, relax.FuncType):
            continue
        params = list(gv.ty.params)
        for i, (d, _) in plan.items():
            old = params[i]
            shape = [int(v) for v in old.shape.values]
            shape = shape[:d] + shape[d + 1:] + [shape[d]]
            params[i] = relax.TensorType(relax.ShapeExpr(shape), old.dtype)
        ngv = tvm.ir.GlobalVar(gv.name_hint)
        relax.expr._update_type(ngv, relax.FuncType(params, gv.ty.ret, gv.ty.purity))
        new_gvs[gv.name_hint] = ngv

    def fix(c):
        if not (c.op.same_as(call_tir) and isinstance(c.args[0], tvm.ir.GlobalVar)):
            return c
        name = c.args[0].name_hint
        if name not in new_gvs:
            return c
        fields = list(c.args[1].fields)
        for i, (d, _) in relayouts[name].items():
            data = fields[i].value.numpy()
            fields[i] = relax.const(np.ascontiguousarray(np.moveaxis(data, d, -1)))
        return tvm.ir.Call(c.op, [new_gvs[name], relax.Tuple(fields), *c.args[2:]], c.attrs, list(c.ty_args),
                           c.span, ret_ty=c.ty)

    funcs = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            funcs[gv] = tvm_ffi.structural_map(f, (tvm.ir.Call, fix), order="post")
        else:
            funcs[new_gvs.get(gv.name_hint, gv)] = f
    return tvm.IRModule(funcs, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(funcs)


def float_schedule_pass(spec):
    """A module pass scheduling every unscheduled PrimFunc for a CPU SPEC (after FuseTIR)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="BdpScheduleFloatCPU")
    def _pass(mod, _ctx):
        sites = _call_tir_sites(mod)
        out = tvm.IRModule(mod.functions, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(mod.functions)
        relayouts = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if func.attrs is not None and "tir.is_scheduled" in func.attrs and bool(func.attrs["tir.is_scheduled"]):
                continue
            func = rewrite_exp(func)  # vector exp / sigmoid instead of one expf call per lane
            p = bdp_kernel_params(func)
            if p is not None:  # a bdp kernel, with its fused epilogue
                out[gv] = schedule_binary_conv(func, spec, p).with_attr("tir.is_scheduled", True)
                continue
            if _is_pack_function(func):  # a pack stage apart, with its fused producers
                out[gv] = schedule_pack_cpu(func, spec).with_attr("tir.is_scheduled", True)
                continue
            calls = sites.get(gv.name_hint, [])
            consts = _constant_args(calls) if calls else set()
            new, rel = schedule_float_cpu(func, spec, consts)
            if new is not None:
                out[gv] = new.with_attr("tir.is_scheduled", True)
                if rel:
                    relayouts[gv.name_hint] = rel
        if relayouts:
            out = _rewrite_constant_args(out, relayouts)
        return out

    return _pass


def _legalize_conv2d_transpose(bb, call):
    """conv2d_transpose whose kernel equals its stride (no padding, groups 1): every input pixel
    makes its own kH x kW output block, so it is kH*kW 1x1 convs (one per output phase, all
    reading the input as it lies) and an interleave - instead of TOPI's conv over a zero-dilated
    input, which multiplies by zero for 1 - 1/(sH*sW) of its work. Any other case: TOPI's."""
    from tvm import te
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d_transpose

    a = call.attrs
    try:
        kshape = [int(v) for v in call.args[1].ty.shape.values]
        ok = (a.data_layout == "NCHW" and a.kernel_layout == "IOHW" and a.out_layout == "NCHW"
              and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
              and all(int(q) == 0 for q in a.padding) and all(int(o) == 0 for o in a.output_padding)
              and [int(v) for v in a.strides] == kshape[2:])
    except Exception:
        ok = False
    if not ok:
        return _nn_conv2d_transpose(bb, call)
    out_dtype = str(call.ty.dtype)

    def te_fn(data, kernel):
        n, c, h, w = data.shape
        _, f, kh, kw = kernel.shape
        rc = te.reduce_axis((0, c), name="rc")
        phase = te.compute(
            (n, f, kh, kw, h, w),
            lambda b, o, p, q, i, j: te.sum(data[b, rc, i, j].astype(out_dtype) * kernel[rc, o, p, q].astype(out_dtype),
                                            axis=rc),
            name="conv2d_transpose_phase")
        return te.compute((n, f, h * kh, w * kw),
                          lambda b, o, y, x: phase[b, o, y % kh, x % kw, y // kh, x // kw],
                          name="conv2d_transpose_interleave")

    return bb.call_te(te_fn, call.args[0], call.args[1], primfunc_name_hint="conv2d_transpose")


def relax_pipeline(spec, target):
    """The Relax pipeline bdp builds with: TVM's default, plus the float CPU schedules (and a
    cheaper legalization of non-overlapping conv2d_transpose) for CPU targets."""
    import tvm
    from tvm import relax

    if spec.arch == "cuda" or os.environ.get("BDP_FLOAT_SCHEDULE", "1") == "0":
        return relax.pipeline.get_default_pipeline(target)
    from tvm.relax.backend.cpu_generic import pipeline as cg

    legalize = [relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d_transpose": _legalize_conv2d_transpose}),
                relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
                relax.transform.FuseTIR()]

    @tvm.transform.module_pass(opt_level=0, name="BdpCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cg.library_dispatch_passes(target) + legalize + [float_schedule_pass(spec)]
                + cg.dataflow_lower_passes(target) + cg.finalize_passes(target))
            return seq(mod)

    return _pipeline
