"""Float convolutions and matrix products on CPUs, register-tiled over output channels.

A reduction block whose weights are constants (conv2d, conv2d_transpose phases, Gemm, MatMul,
dense) is computed the way onnxruntime's NCHWc kernels do it, whatever its spatial size:

* the vector runs over ``uv`` consecutive output channels; the weights are re-laid out at compile
  time as ``[M/uv, ..., uv]`` (:func:`bdp.targets.schedules.relayout.block_dim_map`), so a tile
  reads one contiguous stream of them;
* the other output axes (rows and columns of a conv, rows of a matrix product) are fused into
  one axis of *positions* (the intermediate output is stored that way), and a tile holds ``xt``
  of them (unrolled): per reduction step, ``uv / VL`` vector weight loads, ``xt`` broadcasts of
  input scalars and ``xt * uv / VL`` FMAs, with ``xt * uv / VL`` accumulator registers. The
  positions need not be contiguous in memory, so any size (7x7, 13x17, strided) tiles alike; a
  last, partial tile keeps its bounds check, and TVM's LoopPartition (``pragma_loop_partition_
  hint``) peels it off so that the full tiles run without one;
* ``uv`` and ``xt`` are chosen per layer by a small cost model (:func:`tile_sizes`): FMA
  throughput, the FMA latency that fewer than ~10 accumulators leave exposed, loads, and the
  partial tile;
* the reduction is summed in blocks of about sqrt(K) terms (K = C * KH * KW): each block in its
  own registers, the blocks' sums added into a second accumulator (``rfactor``). Float round-off
  of a serial sum of K terms grows like K; blocked, like sqrt(K) per level, which is how MLAS's
  blocked kernels come to about 4x less error than a serial sum at K = 4608;
* rows of the output are cut into bands when there are too few channel tiles to keep every
  core busy; channel tiles x bands run in parallel. Elementwise consumers (bias, BatchNorm,
  activation, residual add) are inlined into the write-back of each tile.
"""

from __future__ import annotations

import math

from .relayout import block_dim_map, move_dim_last, relayout_plan
from .tir_util import (PARALLEL_MIN_MACS, SCHEDULE_ERRORS, extent, fuse_consumers, iter_kinds, loops_below,
                       par_fuse)

FMA_LATENCY = 4.5  # cycles between dependent FMAs (4 on Intel since Skylake, 5 on Zen 2, 4 on Zen 3)
MIN_PARALLEL_CHUNKS = 16  # channel tiles x row bands to give the thread pool
BLOCK_MIN_TERMS = 32  # smallest block of a blocked reduction (below it the extra adds cost too much)
MAX_VECTORS = 8  # vector registers across the channels of a tile


def _step_cycles(xt, nvec):
    """Cycles of one reduction step of a tile of XT positions x NVEC vectors: FMA throughput
    (two per cycle), the latency of each accumulator's chain, and loads (two per cycle)."""
    return max(xt * nvec / 2.0, FMA_LATENCY, (xt + nvec) / 2.0)


def tile_sizes(m, p, lanes, regs):
    """(uv, xt) for M output channels and P positions: UV a multiple of LANES dividing M, XT
    positions per tile, minimizing the cycles of all tiles (the last one partial) within the
    vector registers REGS: accumulators, the weight vectors (held when XT > 1) and a
    broadcast."""
    best = None
    for nvec in range(1, MAX_VECTORS + 1):
        uv = nvec * lanes
        if m % uv:
            continue
        for xt in range(1, max(1, p) + 1):
            if xt * nvec + (nvec if xt > 1 else 0) + 2 > regs:
                break
            full, tail = divmod(p, xt)
            cycles = (m // uv) * (full * _step_cycles(xt, nvec) + (_step_cycles(tail, nvec) if tail else 0.0))
            key = (round(cycles, 6), -xt * nvec, -nvec)
            if best is None or key < best[0]:
                best = (key, uv, xt)
    return (best[1], best[2]) if best else (None, None)


def _param_index(sch, buf):
    return next((i for i, q in enumerate(sch.mod["main"].params) if buf.same_as(q)), None)


def channel_axis(sch, block, lanes, ctx):
    """Index of the spatial iterator of BLOCK to vectorize as output channels, or None: its
    extent a multiple of LANES, every read it indexes a constant parameter that can be re-laid
    out (one dimension, coefficient 1), and some read (the input) independent of it."""
    stmt = sch.get(block)
    consts = ctx.get("const_params", ())
    best = None
    for i, iv in enumerate(stmt.iter_vars):
        if iv.iter_type != 0:
            break
        ext = int(iv.dom.extent)
        if ext % lanes:
            continue
        plan = relayout_plan(stmt, iv.var)
        if not plan or len(plan) == len(stmt.reads):
            continue
        pidx = [_param_index(sch, buf) for _, buf, _, _ in plan]
        if any(p is None or p not in consts or p in ctx["relayouts"] for p in pidx):
            continue
        if best is None or ext > best[1]:
            best = (i, ext)
    return best[0] if best else None


def _positions_map(ns_iters, nr, pos, band_rows, width):
    """IndexMap of a block's iterators (or its output's indices when NR = 0): the position axes
    POS (one or two, rows then columns) become (band, position in band)."""
    from tvm.tirx import IndexMap

    def f(*ax):
        out = []
        for i, a in enumerate(ax[:ns_iters]):
            if i == pos[0]:
                if len(pos) == 2:
                    out += [a // band_rows, (a % band_rows) * width + ax[pos[1]]]
                else:
                    out += [a // band_rows, a % band_rows]
            elif len(pos) == 2 and i == pos[1]:
                continue
            else:
                out.append(a)
        return (*out, *ax[ns_iters:])

    return IndexMap.from_func(f, ndim=ns_iters + nr)


def _reduction_split(exts):
    """(loop index, blocks) of the reduction loops (extents EXTS) to sum in blocks of about
    sqrt(K) terms, or None for a reduction too short to split."""
    k = math.prod(exts)
    target = max(BLOCK_MIN_TERMS, math.sqrt(k))
    if k < 2 * BLOCK_MIN_TERMS:
        return None
    best = None
    for li, e in enumerate(exts):
        for nblk in range(2, e + 1):
            if e % nblk:
                continue
            terms = k // nblk
            if terms < BLOCK_MIN_TERMS // 2:
                break
            key = (abs(math.log(terms / target)), li)
            if best is None or key < best[0]:
                best = (key, li, nblk)
    return (best[1], best[2]) if best else None


def _bands(rows, chunks):
    """Row bands (a divisor of ROWS) that bring CHUNKS parallel tiles to MIN_PARALLEL_CHUNKS."""
    if chunks >= MIN_PARALLEL_CHUNKS:
        return 1
    need = -(-MIN_PARALLEL_CHUNKS // chunks)
    return next((d for d in range(need, rows + 1) if rows % d == 0), rows)


def _binding_loops(sch, block, dim):
    """The loops (LoopRVs, outermost first) whose variables the binding of the iterator that
    indexes dimension DIM of BLOCK's output uses."""
    import tvm_ffi
    from tvm import s_tir

    from .tir_util import vars_in

    name = sch.get(block).name_hint
    found = []

    def visit(r):
        if r.block.name_hint == name:
            found.append(r)

    tvm_ffi.structural_walk(sch.mod["main"].body, (s_tir.SBlockRealize, visit), order="post")
    if len(found) != 1:
        return []
    stmt = sch.get(block)
    dim_vars = vars_in(stmt.writes[0].region[dim].min)
    idx = [i for i, iv in enumerate(stmt.iter_vars) if iv.var in dim_vars]
    if len(idx) != 1:
        return []
    used = vars_in(found[0].iter_values[idx[0]])
    return [lp for lp in sch.get_loops(block) if sch.get(lp).loop_var in used]


def _channels_innermost(sch, block, dim, anchor, uv):
    """Put the loop of BLOCK's output dimension DIM (the channels) innermost below ANCHOR and
    vectorize it."""
    below = loops_below(sch, block, anchor)
    ch = [lp for lp in _binding_loops(sch, block, dim) if any(sch.get(lp).same_as(sch.get(b)) for b in below)]
    if not ch or not below:
        return
    c = ch[-1]
    if not sch.get(below[-1]).same_as(sch.get(c)):
        rest = [lp for lp in below if not sch.get(lp).same_as(sch.get(c))]
        sch.reorder(*rest, c)
    if extent(sch, c) == uv:
        sch.vectorize(c)


def tile_channels(sch, block, lanes, regs, ctx):
    """Schedule reduction BLOCK as channel tiles (see the module docstring); False when it does
    not apply (the schedule is then unchanged, except where a primitive failed: the caller
    starts over)."""
    stmt = sch.get(block)
    kinds = iter_kinds(stmt)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or "O" in kinds or not kinds.startswith("S") or "R" not in kinds:
        return False
    ns = len(kinds) - len(kinds.lstrip("S"))
    if "S" in kinds[ns:] or len(stmt.writes) != 1:
        return False
    svars = [iv.var for iv in stmt.iter_vars[:ns]]
    region = stmt.writes[0].region
    if len(region) != ns or any(not r.min.same_as(v) for r, v in zip(region, svars)):
        return False  # output indexed other than by the spatial iterators in order
    ui = channel_axis(sch, block, lanes, ctx)
    if ui is None:
        return False
    sext = [int(iv.dom.extent) for iv in stmt.iter_vars[:ns]]
    rext = [int(iv.dom.extent) for iv in stmt.iter_vars[ns:]]
    others = [i for i in range(ns) if i != ui]
    pos = [i for i in others[1:] if sext[i] > 1][-2:] if len(others) > 1 else others
    if not pos:
        pos = others[-1:]
    if len(pos) == 2 and pos[1] != pos[0] + 1:
        return False
    m = sext[ui]
    p = math.prod(sext[i] for i in pos)
    macs = math.prod(sext) * math.prod(rext)
    uv, xt = tile_sizes(m, p, lanes, regs)
    if uv is None:
        return False
    outer_ext = math.prod(sext[i] for i in others if i not in pos)
    rows = sext[pos[0]]
    nb = _bands(rows, outer_ext * (m // uv)) if macs >= PARALLEL_MIN_MACS else 1
    if nb > 1:
        uv, xt = tile_sizes(m, p // nb, lanes, regs)
    band_rows = rows // nb
    width = sext[pos[1]] if len(pos) == 2 else 1
    pband = band_rows * width

    # the output (an intermediate of this function) stored as [..., band, position]
    out_buf = stmt.writes[0].source
    if _param_index(sch, out_buf) is not None:
        sch.cache_write(block, 0, "global")
    for ri, buf, d, nd in relayout_plan(sch.get(block), svars[ui]):
        pidx = _param_index(sch, buf)
        sch.transform_layout(block, ("read", ri), block_dim_map(d, nd, uv))
        ctx["relayouts"][pidx] = (d, nd, uv)
    # iterators first, then the buffer: its indices then simplify to the new iterators
    sch.transform_block_layout(block, _positions_map(ns, len(rext), pos, band_rows, width))
    sch.transform_layout(block, ("write", 0), _positions_map(ns, 0, pos, band_rows, width))
    # iterators now: spatial (others before pos..., band, position, ... with pos collapsed), reductions
    nsp = ns + 2 - len(pos)
    ui2 = ui if ui < pos[0] else ui - len(pos) + 2
    bi, pi = pos[0], pos[0] + 1
    loops = sch.get_loops(block)
    s_loops, r_loops = list(loops[:nsp]), list(loops[nsp:])
    uo, u_in = sch.split(s_loops[ui2], [None, uv])
    po, xi = sch.split(s_loops[pi], [None, xt]) if xt < pband else (s_loops[pi], None)
    outer = [lp for i, lp in enumerate(s_loops) if i not in (ui2, bi, pi)]
    par = outer + [uo, s_loops[bi]]
    split = _reduction_split(rext)
    if split is not None:
        li, nblk = split
        ro, rin = sch.split(r_loops[li], [nblk, None])
        r_loops = [ro] + r_loops[:li] + [rin] + r_loops[li + 1:]
    inner = ([xi] if xi is not None else []) + [u_in]
    sch.reorder(*par, po, *r_loops, *inner)
    udim = ui2  # the channel dimension of the output and of the accumulators
    main = block
    if split is not None:
        main = sch.rfactor(r_loops[0], factor_axis=0)  # block sums; BLOCK now adds them up
        ml = sch.get_loops(main)
        lp_po, lp_rblk, lp_r1 = ml[len(par)], ml[len(par) + 1], ml[len(par) + 2]
        loc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(loc, lp_rblk)
        sch.reverse_compute_at(block, lp_rblk)
        sch.transform_layout(main, ("write", 0), move_dim_last(udim + 1, nsp + 1))
        try:
            sch.compute_inline(loc)  # the block sums are added straight from the registers
        except SCHEDULE_ERRORS:
            pass
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, lp_po)
        sch.transform_layout(block, ("write", 0), move_dim_last(udim, nsp))
        _channels_innermost(sch, block, nsp - 1, lp_rblk, uv)
    else:
        ml = sch.get_loops(main)
        lp_po, lp_r1 = ml[len(par)], ml[len(par) + 1]
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, lp_po)
        sch.transform_layout(main, ("write", 0), move_dim_last(udim, nsp))
    fuse_consumers(sch, acc)
    ml = sch.get_loops(main)
    if xi is not None:
        sch.unroll(ml[-2])
    sch.vectorize(ml[-1])
    if xt < pband and pband % xt:
        sch.annotate(lp_po, "pragma_loop_partition_hint", 1)  # peel the partial tile off
    if macs >= PARALLEL_MIN_MACS:
        par_fuse(sch, sch.get_loops(main)[:len(par)])
    sch.decompose_reduction(main, lp_r1)  # last: the reduction checks of parallel() need the init
    if split is not None:
        sch.decompose_reduction(block, lp_rblk)
    return True
