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
                       par_fuse, root_blocks, spatial_then_reduction)

FMA_LATENCY = 4.0  # cycles between dependent FMAs (4 on Intel since Skylake and on Zen 3, 5 on Zen 2)
BROADCAST_FP = 0.5  # FP pipe slots of a broadcast from memory (Zen 3)
WEIGHT_LOAD = 3.0  # load slots a weight vector costs (measured: 32 x 2 tiles lose to 16 x 4)
MIN_PARALLEL_CHUNKS = 16  # channel tiles x row bands to give the thread pool
BLOCK_MIN_TERMS = 64  # smallest block of a blocked reduction (8 channels of a 3x3 conv, as MLAS sums them)
UNROLL_STEPS = 80  # reduction steps of a block unrolled (a 3x3 conv's 8 channels x 9 taps)
MAX_VECTORS = 8  # vector registers across the channels of a tile
CHANNEL_TILE_ATTR = "bdp.channel_tile"  # (uv, xt) of a conv legalized with padded positions
BAND_ACC_BYTES = 16384  # band accumulators that stay in L1: the reduction blocks go outside the tiles


def _step_cycles(xt, nvec, regs, vector_input=False):
    """Cycles of one reduction step of a tile of XT positions x NVEC vectors (None: it does not
    fit in REGS vector registers - accumulators, the weight vectors and a broadcast; LLVM
    spills rather than reload weights). The larger of: FMAs (two per cycle) plus the FP pipe
    share of the broadcasts (half a slot each on Zen 3); the latency of each accumulator's
    chain; loads (two per cycle, a weight vector counting WEIGHT_LOAD: it streams from further
    away than the input pixels). Calibrated on Zen 3 against measured tiles: 16 channels x 4
    positions is the best AVX2 tile, 8 x 7 and a single position are 30-60% slower.
    VECTOR_INPUT (depthwise convs, pooling): the input is a vector per position and channel
    vector, loaded, not broadcast."""
    acc = xt * nvec
    if acc + nvec + 2 > regs:
        return None
    if vector_input:
        return max(acc / 2.0, FMA_LATENCY, (acc + WEIGHT_LOAD * nvec) / 2.0)
    return max(acc / 2.0 + xt * BROADCAST_FP, FMA_LATENCY, (xt + WEIGHT_LOAD * nvec) / 2.0)


def tile_plan(m, rows, width, k, chunks, lanes, regs, vector_input=False, padded=False):
    """(uv, xt, bands) for M output channels, a ROWS x WIDTH grid of positions (rows cut into
    BANDS that divide them evenly), K reduction steps, CHUNKS parallel tiles besides: UV a
    multiple of LANES dividing M, XT positions per tile. Minimizes the modelled cycles
    (:func:`_step_cycles` per step, a write-back per tile; a partial tile keeps a bounds check
    on every position, which LLVM does not always hoist) with enough parallel tiles
    (MIN_PARALLEL_CHUNKS) where the rows allow. PADDED: the positions can be padded up to a
    multiple of XT (:func:`bdp.targets.schedules.legalize.legalize_conv2d`), the partial tile
    is a full one."""
    best = None
    for nb in range(1, rows + 1):
        if rows % nb:
            continue
        pband = rows // nb * width
        for nvec in range(1, MAX_VECTORS + 1):
            uv = nvec * lanes
            if m % uv:
                continue
            par = chunks * nb * (m // uv)
            for xt in range(1, pband + 1):
                step = _step_cycles(xt, nvec, regs, vector_input)
                if step is None:
                    break
                tiles = -(-pband // xt)
                cycles = (m // uv) * nb * tiles * (k * step + xt * uv)
                if pband % xt and not padded:
                    cycles *= 1.1  # the bounds checks
                key = (par < MIN_PARALLEL_CHUNKS and nb < rows, round(cycles, 3), nb, -xt * nvec)
                if best is None or key < best[0]:
                    best = (key, uv, xt, nb)
    return best[1:] if best else (None, None, None)


def conv_tile_plan(n, m, oh, ow, k, lanes, regs, padded=False):
    """The :func:`tile_plan` that :func:`tile_channels` makes for a conv of batch N, M output
    channels, OH x OW outputs and K = C*KH*KW (what the conv legalization pads for)."""
    macs = n * m * oh * ow * k
    chunks = n if macs >= PARALLEL_MIN_MACS else MIN_PARALLEL_CHUNKS
    return tile_plan(m, oh, ow, k, chunks, lanes, regs, padded=padded)


def _param_index(sch, buf):
    return next((i for i, q in enumerate(sch.mod["main"].params) if buf.same_as(q)), None)


def channel_axis(sch, block, lanes, ctx, vector_input=True):
    """(index of the spatial iterator of BLOCK to vectorize as output channels, reads to give a
    channel-last copy at run time), or None. The iterator's extent is a multiple of LANES, and
    every read it indexes uses it alone in one dimension (coefficient 1): constant parameters
    (weights) are re-laid out at compile time; other reads (the input of a depthwise conv or a
    pooling) get that dimension last - in the layout of their producer in this function where
    there is one (a padding copy), else in a copy - when the copies are small next to the
    work."""
    stmt = sch.get(block)
    consts = ctx.get("const_params", ())
    macs = math.prod(int(iv.dom.extent) for iv in stmt.iter_vars)
    best = None
    for i, iv in enumerate(stmt.iter_vars):
        if iv.iter_type != 0:
            break
        ext = int(iv.dom.extent)
        if ext % lanes:
            continue
        plan = relayout_plan(stmt, iv.var)
        if not plan:
            continue
        runtime, copied, ok = [], 0, True
        for ri, buf, d, nd in plan:
            p = _param_index(sch, buf)
            if p is not None and p in consts:
                ok = ok and p not in ctx["relayouts"]
                continue
            runtime.append((ri, d, nd))
            if d != nd - 1 and not any(w.source.same_as(buf) for b in sch.get_producers(block)
                                       for w in sch.get(b).writes):
                copied += math.prod(int(e) for e in buf.shape)
        if not ok or copied > macs or len(runtime) > 1 or (runtime and (len(plan) < len(stmt.reads) or not vector_input)):
            continue  # one run-time operand (the input), and then no broadcast operand besides
        if best is None or ext > best[1]:
            best = (i, ext, runtime)
    return (best[0], best[2]) if best else None


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


def _block_count(ext, inner, k):
    """Blocks to cut a reduction loop of extent EXT into (a divisor of EXT; the loop runs
    outside INNER other terms, K in all) so that a block sums about sqrt(K) terms (at least
    BLOCK_MIN_TERMS), or 1 for a reduction too short to split."""
    if k < 2 * BLOCK_MIN_TERMS:
        # a short reduction over a few channels of several taps (a stem): a block per channel,
        # as onnxruntime sums them (its kernel for NCHW inputs)
        return ext if ext >= 2 and inner >= 4 else 1
    target = max(BLOCK_MIN_TERMS, math.sqrt(k))
    best = (abs(math.log(k / target)), 1)
    for nblk in range(2, ext + 1):
        if ext % nblk == 0 and k // nblk >= BLOCK_MIN_TERMS // 2:
            best = min(best, (abs(math.log(k / nblk / target)), nblk))
    return best[1]


def _index_loops(sch, block, index):
    """The loops (LoopRVs, outermost first) whose variables the binding of the iterator that
    INDEX (an expression of BLOCK's iterators) uses."""
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
    dim_vars = vars_in(index)
    idx = [i for i, iv in enumerate(stmt.iter_vars) if iv.var in dim_vars]
    if len(idx) != 1:
        return []
    used = vars_in(found[0].iter_values[idx[0]])
    return [lp for lp in sch.get_loops(block) if sch.get(lp).loop_var in used]


def _move_innermost(sch, block, index, anchor):
    """Reorder the loops of BLOCK below ANCHOR so that the one INDEX (an expression of the
    block's iterators) runs over is innermost; returns that loop (or None)."""
    below = loops_below(sch, block, anchor)
    ch = [lp for lp in _index_loops(sch, block, index) if any(sch.get(lp).same_as(sch.get(b)) for b in below)]
    if not ch or not below:
        return None
    c = ch[-1]
    if not sch.get(below[-1]).same_as(sch.get(c)):
        sch.reorder(*[lp for lp in below if not sch.get(lp).same_as(sch.get(c))], c)
    return c


def _vectorize_lanes(sch, loop, lanes):
    """Vectorize LOOP (a multiple of LANES) at the register width: a loop of registers
    (unrolled) around a loop of LANES (vectorized)."""
    ext = extent(sch, loop)
    if ext is None or ext % lanes:
        return
    if ext > lanes:
        regs, loop = sch.split(loop, [None, lanes])
        sch.unroll(regs)
    sch.vectorize(loop)


def _input_channel(sch, block, ctx):
    """(read index, dimension, ndim, reduction iterator index) of BLOCK's one non-constant read
    (the input) and the reduction iterator that indexes one of its dimensions alone: the input
    channel (None when there is no such read or iterator, or it has fewer than 8 channels)."""
    stmt = sch.get(block)
    consts = ctx.get("const_params", ())
    inputs = [i for i, r in enumerate(stmt.reads) if _param_index(sch, r.source) not in consts]
    if len(inputs) != 1:
        return None
    for j, iv in enumerate(stmt.iter_vars):
        if iv.iter_type != 2 or int(iv.dom.extent) < 8:
            continue
        plan = relayout_plan(stmt, iv.var)
        hit = [(i, d, nd) for i, _, d, nd in plan or () if i == inputs[0]]
        if len(hit) == 1:
            return (*hit[0], j)
    return None


def _input_channel_last(sch, block, read, dim, nd, cache_map):
    """Give BLOCK's input (read index READ) a layout with dimension DIM (of ND, the input
    channel) last: its producer's, if this function makes it (a padding stage: the copy exists
    anyway), else a copy at run time - indexed by CACHE_MAP of the block's iterators where
    given (a strided 1x1 conv: a copy of the pixels it reads only), else a copy of the buffer."""
    buf = sch.get(block).reads[read].source
    prod = [b for b in sch.get_producers(block) if any(w.source.same_as(buf) for w in sch.get(b).writes)]
    if prod:
        pblk = prod[0]
    elif cache_map is not None:
        sch.reindex_cache_read(block, read, "global", cache_map)
        return
    else:
        pblk = sch.cache_read(block, read, "global")
    sch.transform_layout(pblk, ("write", 0), move_dim_last(dim, nd))
    try:  # iterate the copy in its new layout: contiguous writes
        sch.transform_block_layout(pblk, move_dim_last(dim, len(sch.get_loops(pblk))))
    except SCHEDULE_ERRORS:
        pass


def _read_dim_order(stmt, read, skip, rank):
    """The dimensions of read READ of STMT other than SKIP, sorted by RANK (iterator var ->
    position of its loop) of the iterator indexing each (dimensions with none first)."""
    from .tir_util import vars_in

    dims = []
    for d, rg in enumerate(stmt.reads[read].region):
        if d == skip:
            continue
        vs = [rank[v] for v in vars_in(rg.min) if v in rank]
        dims.append((min(vs) if vs else -1, d))
    return tuple(d for _, d in sorted(dims))


def _simplify_blocks(func, names):
    """FUNC with the indices of blocks NAMES (their reads, writes and body) simplified under
    their iterators' domains, as TVM's StmtSimplify would (which cannot run on the whole
    function here: it would also fold unit iterators that the schedules read)."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, sym, tirx

    def on_block(block, mutator):
        block = mutator.default_mutate(block)
        if block.name_hint not in names:
            return block
        an = sym.Analyzer()
        for iv in block.iter_vars:
            an.bind(iv.var, iv.dom)
        simp = an.simplify

        def load(x):
            return tirx.BufferLoad(x.source, [simp(i) for i in x.indices])

        def store(x):
            return tirx.BufferStore(x.buffer, x.value, [simp(i) for i in x.indices])

        def region(r):
            return tirx.BufferRegion(r.source, [tvm.ir.Range.from_min_extent(simp(g.min), simp(g.extent))
                                                for g in r.region])

        return tvm_ffi.structural_map(block, [(tvm.ir.TensorLoad, load), (tirx.BufferStore, store),
                                              (tvm.ir.TensorRegion, region)], order="post")

    return tvm_ffi.structural_mutate(func, [(s_tir.SBlock, on_block)])


def crop_by_positions(sch):
    """(PrimFunc, changed): SCH's function with the consumer of every padded conv (a block with
    ``bdp.channel_tile``; the consumer is the crop back to rows and columns, with the elementwise
    ops after it inlined into it) iterating over (band, position) as the conv does, its reads of
    the conv simplified to [band, position]. Run before the schedule proper: TVM's
    transform_block_layout leaves (h // R, h % R * W + w) unsimplified in the new iterators,
    and reverse_compute_at then solved the tile's region wrongly (a few columns of each band
    computed, the rest left unwritten)."""
    from tvm.sym import detect_linear_equation
    from tvm.tirx import IndexMap

    names = []
    for blk in root_blocks(sch):
        stmt = sch.get(blk)
        if not stmt.annotations or CHANNEL_TILE_ATTR not in stmt.annotations:
            continue
        conv_buf = stmt.writes[0].source
        for c in sch.get_consumers(blk):
            cst = sch.get(c)
            rd = next((r for r in cst.reads if r.source.same_as(conv_buf)), None)
            kinds = iter_kinds(cst)
            ns = len(kinds)
            if rd is None or "R" in kinds or "O" in kinds or ns < 2 or len(rd.region) != ns:
                continue
            w = cst.iter_vars[ns - 1].var
            coeff = detect_linear_equation(rd.region[-1].min, [w])
            rows = int(cst.iter_vars[ns - 2].dom.extent) // int(conv_buf.shape[-2])
            width = int(cst.iter_vars[ns - 1].dom.extent)
            if not coeff or int(coeff[0]) != 1:
                continue
            sch.transform_block_layout(c, IndexMap.from_func(
                lambda *ax: (*ax[:-2], ax[-2] // rows, ax[-2] % rows * width + ax[-1]), ndim=ns))
            names.append(cst.name_hint)
    if not names:
        return sch.mod["main"], False
    return _simplify_blocks(sch.mod["main"], set(names)), True


def _padded_epilogue(sch, acc, anchor):
    """The consumer of a padded conv's tiles (made to iterate over (band, position) by
    :func:`crop_by_positions`) under the tile loop ANCHOR: each tile's valid positions after
    the tile."""
    for c in sch.get_consumers(acc):
        stmt = sch.get(c)
        if not any(r.source.same_as(w.source) for r in stmt.reads for w in sch.get(acc).writes):
            continue
        if "R" in iter_kinds(stmt) or "O" in iter_kinds(stmt):
            continue
        sch.reverse_compute_at(c, anchor)


def tile_channels(sch, block, lanes, regs, ctx, vector_input=True):
    """Schedule reduction BLOCK as channel tiles (see the module docstring); False when it does
    not apply (the schedule is then unchanged, except where a primitive failed: the caller
    starts over). VECTOR_INPUT: also blocks whose input is indexed by the channels (depthwise
    convs, pooling)."""
    found = spatial_then_reduction(sch, block)
    if found is None:
        return False
    stmt, kinds, loops, ns = found
    if len(stmt.writes) != 1:
        return False
    svars = [iv.var for iv in stmt.iter_vars[:ns]]
    region = stmt.writes[0].region
    if len(region) != ns or any(not r.min.same_as(v) for r, v in zip(region, svars)):
        return False  # output indexed other than by the spatial iterators in order
    found = channel_axis(sch, block, lanes, ctx, vector_input)
    if found is None:
        return False
    ui, vec_reads = found  # vec_reads: the input, when it is read as vectors over the channels
    sext = [int(iv.dom.extent) for iv in stmt.iter_vars[:ns]]
    rext = [int(iv.dom.extent) for iv in stmt.iter_vars[ns:]]
    others = [i for i in range(ns) if i != ui]
    m = sext[ui]
    macs = math.prod(sext) * math.prod(rext)
    prefused = stmt.annotations.get(CHANNEL_TILE_ATTR) if stmt.annotations else None
    if prefused is not None:
        # a conv legalized with its positions as (band, position), padded to whole tiles
        uv, xt = (int(v) for v in prefused)
        pos = others[-2:]
        nb, band_rows, width = sext[pos[0]], 1, sext[pos[1]]
        if len(others) < 2 or pos[1] != pos[0] + 1 or m % uv or sext[pos[1]] % xt:
            return False
    else:
        pos = [i for i in others[1:] if sext[i] > 1][-2:] if len(others) > 1 else others
        if not pos:
            pos = others[-1:]
        if len(pos) == 2 and pos[1] != pos[0] + 1:
            return False
        outer_ext = math.prod(sext[i] for i in others if i not in pos)
        rows = sext[pos[0]]
        width = sext[pos[1]] if len(pos) == 2 else 1
        chunks = outer_ext if macs >= PARALLEL_MIN_MACS else MIN_PARALLEL_CHUNKS
        uv, xt, nb = tile_plan(m, rows, width, math.prod(rext), chunks, lanes, regs, bool(vec_reads))
        if uv is None:
            return False
        band_rows = rows // nb
    pband = band_rows * width
    # the reduction: blocks over the input channel (innermost, contiguous in a channel-last
    # input), or over the outermost reduction loop that splits well
    inch = None if vec_reads else _input_channel(sch, block, ctx)
    k = math.prod(rext)
    if inch is not None:
        ci = inch[3] - ns
        taps = [j for j in range(len(rext)) if j != ci]
        nblk = _block_count(rext[ci], k // rext[ci], k)
    else:
        ci, taps = 0, list(range(1, len(rext)))
        nblk = _block_count(rext[0], k // rext[0], k)
    r_order = taps + [ci]  # reduction loops, outermost first (the block loop goes outside them)
    nsp = ns + 2 - len(pos)  # spatial iterators once the positions are (band, position)
    rank = {stmt.iter_vars[ns + j].var: nsp + i for i, j in enumerate(r_order)}

    # the output (an intermediate of this function) stored as [..., band, position]
    out_buf = stmt.writes[0].source
    if _param_index(sch, out_buf) is not None:
        sch.cache_write(block, 0, "global")
    for ri, buf, d, nd in relayout_plan(sch.get(block), svars[ui]):
        pidx = _param_index(sch, buf)
        if any(ri == v[0] for v in vec_reads):
            continue
        order = _read_dim_order(sch.get(block), ri, d, rank)
        sch.transform_layout(block, ("read", ri), block_dim_map(d, nd, uv, order))
        ctx["relayouts"][pidx] = (d, nd, uv, order)
    if prefused is None:
        # iterators first, then the buffer: its indices then simplify to the new iterators
        sch.transform_block_layout(block, _positions_map(ns, len(rext), pos, band_rows, width))
        sch.transform_layout(block, ("write", 0), _positions_map(ns, 0, pos, band_rows, width))
    for ri, d, nd in vec_reads:
        if d != nd - 1:
            _input_channel_last(sch, block, ri, d, nd, None)
    if inch is not None and inch[1] != inch[2] - 1:
        cache_map = None
        if all(rext[j] == 1 for j in taps):  # 1x1: a copy of just the pixels read
            from .tir_util import region_vars

            st2 = sch.get(block)
            used = region_vars(st2.reads[inch[0]].region)
            keep = [i for i in range(nsp) if st2.iter_vars[i].var in used]
            from tvm.tirx import IndexMap

            cache_map = IndexMap.from_func(lambda *ax: (*(ax[i] for i in keep), ax[nsp + ci]), ndim=nsp + len(rext))
        _input_channel_last(sch, block, inch[0], inch[1], inch[2], cache_map)
    ui2 = ui if ui < pos[0] else ui - len(pos) + 2
    bi, pi = pos[0], pos[0] + 1
    loops = sch.get_loops(block)
    s_loops, r_loops = list(loops[:nsp]), list(loops[nsp:])
    uo, u_in = sch.split(s_loops[ui2], [None, uv])
    po, xi = sch.split(s_loops[pi], [None, xt]) if xt < pband else (s_loops[pi], None)
    outer = [lp for i, lp in enumerate(s_loops) if i not in (ui2, bi, pi)]
    par = outer + [uo, s_loops[bi]]
    split = nblk > 1
    if split:
        ro, rin = sch.split(r_loops[ci], [nblk, None])
        r_loops = [ro] + [r_loops[j] for j in taps] + [rin]
    else:
        r_loops = [r_loops[j] for j in r_order]
    inner = ([xi] if xi is not None else []) + [u_in]
    rblk_outer = split and pband * uv * 4 <= BAND_ACC_BYTES
    if rblk_outer:
        sch.reorder(*par, r_loops[0], po, *r_loops[1:], *inner)
    else:
        sch.reorder(*par, po, *r_loops, *inner)
    udim = ui2  # the channel dimension of the output and of the accumulators
    main = block
    if split:
        main = sch.rfactor(r_loops[0], factor_axis=0)  # block sums; BLOCK now adds them up
        ml = sch.get_loops(main)
        if rblk_outer:
            lp_rblk, lp_po, lp_r1 = ml[len(par)], ml[len(par) + 1], ml[len(par) + 2]
            lp_anchor = lp_po
        else:
            lp_po, lp_rblk, lp_r1 = ml[len(par)], ml[len(par) + 1], ml[len(par) + 2]
            lp_anchor = lp_rblk
        loc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(loc, lp_anchor)
        sch.reverse_compute_at(block, lp_anchor)
        sch.transform_layout(main, ("write", 0), move_dim_last(udim + 1, nsp + 1))
        try:
            sch.compute_inline(loc)  # the block sums are added straight from the registers
        except SCHEDULE_ERRORS:
            pass
        acc = sch.cache_write(block, 0, "local")
        acc_at = ml[len(par) - 1] if rblk_outer else lp_po
        sch.reverse_compute_at(acc, acc_at)
        sch.transform_layout(block, ("write", 0), move_dim_last(udim, nsp))
        _vectorize_lanes(sch, _move_innermost(sch, block, sch.get(block).writes[0].region[-1].min, lp_anchor), lanes)
    else:
        ml = sch.get_loops(main)
        lp_po, lp_r1 = ml[len(par)], ml[len(par) + 1]
        acc = sch.cache_write(main, 0, "local")
        acc_at = lp_po
        sch.reverse_compute_at(acc, acc_at)
        sch.transform_layout(main, ("write", 0), move_dim_last(udim, nsp))
    acc_buf = sch.get(block).writes[0].source
    if prefused is not None:
        _padded_epilogue(sch, acc, acc_at)
    fuse_consumers(sch, acc)
    # the write-back: positions outer, the channels of one position inner (one index computation
    # per position)
    rd = next((r for r in sch.get(acc).reads if r.source.same_as(acc_buf)), None)
    if rd is not None and not rblk_outer:
        _move_innermost(sch, acc, rd.region[-1].min, lp_po)
    ml = sch.get_loops(main)
    if xi is not None:
        sch.unroll(ml[-2])
    _vectorize_lanes(sch, ml[-1], lanes)
    # blocks outside the tiles: a block's steps unrolled, so that every input address is a base
    # per position plus a constant (with loop counters in them, LLVM's SLP vectorizer packs the
    # positions' address additions into vectors and extracts them again: 25% slower; measured
    # slower the other way round for tiles that run over all blocks)
    if rblk_outer and k // nblk <= UNROLL_STEPS:
        anchor = lp_po
        for lp in loops_below(sch, main, anchor):
            if sch.get(lp).kind == 0:  # the reduction loops (the tile's are unrolled or vectorized)
                sch.unroll(lp)
    if macs >= PARALLEL_MIN_MACS:
        par_fuse(sch, sch.get_loops(main)[:len(par)])
    sch.decompose_reduction(main, lp_r1)  # last: the reduction checks of parallel() need the init
    if split:
        sch.decompose_reduction(block, lp_rblk)
    return True
