"""Float operators on CPUs: a generic, tuning-free schedule (register-blocked reductions in
orientation x or u, row reductions with rfactor, concatenations unrolled by piece, everything
else parallel and vectorized). See :mod:`bdp.targets.schedules` for the design."""

from __future__ import annotations

import math

from .float_tile import _block_count, crop_by_positions, tile_channels
from .relayout import (feeds_light_reduction, move_dim_last, phase_split_strided_reads, reads_per_input,
                       relayout_copied, relayout_innermost)
from .tir_util import (PARALLEL_MIN_ELEMENTS, PARALLEL_MIN_MACS, SCHEDULE_ERRORS, choose_vec, concat_split,
                       extent, fuse_consumers, has_conditional, inline_is_cheap, is_output_block, iter_kinds,
                       loops_below, loops_extent, par_fuse, region_vars, root_blocks, schedule_injective,
                       spatial_then_reduction, vars_in, vectorize_if)

def schedule_concat(sch, block, lanes, plan):
    """Split a concatenation's axis into N chunks of G (each chunk reads one piece), move the
    chunk loop just above the innermost loop and unroll it: every unrolled copy keeps one branch
    of the selection (the loop bounds decide it), so the producers inlined into it (a resize's
    row blend) run vectorized without computing the other pieces. Parallel over the outer loops,
    vectorized innermost. PLAN: :func:`concat_split` of the block before its producers were
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
    work = loops_extent(sch, outer) * n * (extent(sch, inner) or 1)
    if work >= PARALLEL_MIN_ELEMENTS:
        par_fuse(sch, outer)
    sch.unroll(o)
    v = choose_vec(extent(sch, inner), lanes)
    if v is not None:
        _, ii = sch.split(inner, [None, v])
        sch.vectorize(ii)
    return True


def _pick_unroll_axis(sch, block_stmt, spatial_vars, x_var):
    """The spatial iterator (not X) to register-block: one the x-dependent reads ignore."""
    best, best_key = None, None
    reads = [region_vars(r.region) for r in block_stmt.reads]
    writes_vars = region_vars(block_stmt.writes[0].region)
    for i, iv in enumerate(block_stmt.iter_vars[: len(spatial_vars) - 1]):
        v = iv.var
        if v not in writes_vars or int(iv.dom.extent) < 2:
            continue
        score = sum((2 if x_var in rv else 1) for rv in reads if v not in rv)
        key = (score, int(iv.dom.extent))
        if score > 0 and (best_key is None or key > best_key):
            best, best_key = i, key
    return best


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
    first = next((i for i, lp in enumerate(outer) if (extent(sch, lp) or 2) > 1), None)
    if first is None or macs < PARALLEL_MIN_MACS:
        return
    keep, chunks = [], 1
    for lp in outer[first:]:
        keep.append(lp)
        chunks *= extent(sch, lp) or 1
        if chunks >= 64:
            break
    par_fuse(sch, keep)


# Float reductions computed with vectors over their output columns (orientation "x" of
# :func:`_tile_reduction`, summed in the channel tiles' blocks) before the channel tiles of
# :mod:`.float_tile`, per ISA: a channel tile's write-back stores every lane (a channel) to its own
# plane with its own address, which costs more than the reduction in short dot products and in
# layers with few output channels. None: every conv; (K, M): convs of at most K reduction terms
# or at most M output channels. Measured on Zen 3 (AVX2, 2 threads, vs onnxruntime FP32): a
# 3->32 3x3/2 stem at 256x320 2.61 -> 0.62 ms (ORT 0.70), 1x1 64->8 at 64x80 1.12 -> 0.14 ms (ORT
# 0.19), 240->8 4.43 -> 0.42 ms (ORT 0.75), 32->64 1.23 -> 0.41 ms (ORT 0.36); but 3x3 convs of
# 288-4608 terms and 1x1 convs of 128+ channels to 128+ lost 10-50% (the channel tiles re-lay
# out the weights for contiguous loads and keep more accumulators): so the limits. Estimated on
# the Cortex-A72: the stem 6.1 -> 3.7 ms, a 128->8 1x1 0.44 -> 0.27 ms, 3x3 convs of 576+ terms
# about even (3.5-3.9 MACs per cycle of the FMA pipes' 4): every conv. Never a product whose
# column axis indexes the constant weights (Gemm, MatMul: strided weight loads). Up to half the
# register file in accumulators: with the A72's 10-cycle FMA chains (llvm-mca's model) 8
# accumulators left a 1x1 conv at 2.7 MACs per cycle, 16 at 3.5. Elsewhere (AVX-512, not
# measured since) the channel tiles first.
# (COLUMNS_FIRST: ``spec.schedules.columns_first``, with the AVX2 limits (64, 16) in
# ``columns_first_limits``; see bdp.targets.spec.AVX2_TRAITS / NEON_TRAITS)
# Reductions of at least this many terms that the column tiles sum in blocks (the channel tiles'
# rule, onnxruntime's round-off); default every one. On NEON not the short ones of stems (a block
# per input channel): their blocks cost the A72 about 15% (estimated: a 3->16 3x3/2 stem at
# 256x320 2.01 -> 2.31 ms) for round-off already at 1e-7 of the output's scale (27 terms)
# (COLUMN_BLOCKS_MIN_TERMS: ``spec.schedules.column_block_min_terms``, 2 * BLOCK_MIN_TERMS on NEON)


def columns_first(spec, k, m) -> bool:
    """Whether a float conv of K reduction terms and M output channels on SPEC tries vectors
    over its output columns before channel tiles (COLUMNS_FIRST)."""
    if not spec.schedules.columns_first:
        return False
    limits = spec.schedules.columns_first_limits
    return limits is None or k <= limits[0] or m <= limits[1]


def _columns_first_fits(sch, block, spec, ctx) -> bool:
    """Whether reduction BLOCK on SPEC tries the column tiles before channel tiles
    (COLUMNS_FIRST): its column axis reads no constant parameter, and on ISAs with limits its
    reduction or its output channels (the axis the column-indexed reads ignore) are short."""
    if not spec.schedules.columns_first:
        return False
    found = spatial_then_reduction(sch, block)
    if found is None:
        return False
    stmt, _, _, ns = found
    xvar = stmt.iter_vars[ns - 1].var
    params = list(sch.mod["main"].params)
    consts = ctx.get("const_params", ())
    for r in stmt.reads:
        pidx = next((i for i, q in enumerate(params) if r.source.same_as(q)), None)
        if pidx is not None and pidx in consts and any(xvar in vars_in(rg.min) for rg in r.region):
            return False
    svars = [iv.var for iv in stmt.iter_vars[:ns]]
    ui = _pick_unroll_axis(sch, stmt, svars, xvar)
    m = int(stmt.iter_vars[ui].dom.extent) if ui is not None else 1
    k = math.prod(int(iv.dom.extent) for iv in stmt.iter_vars[ns:])
    return columns_first(spec, k, m)


def _tile_reduction(sch, block, lanes, regs, ctx, orients=("x", "u"), acc_budget=0, blocked=None):
    """Register-block a reduction block with spatial iters first (conv, matmul, pooling).

    Orientation "x": the innermost output axis is the vector (one or two registers), an output
    axis that the x-dependent operand ignores (conv: output channels) is unrolled. Orientation
    "u" (when x is too short for a full vector, e.g. 1x1 convs and depthwise convs at 1/16 or
    1/32 scale): that other axis is the vector, its operands get a copy with it innermost, and
    a few x positions are unrolled.

    ORIENTS: the orientations allowed; ACC_BUDGET: vector registers for accumulators (default:
    about half the register file, less the operands'); BLOCKED: orientation x sums a reduction
    of at least this many terms in blocks as the channel tiles do (:func:`_blocked_columns`;
    None: never).
    """
    found = spatial_then_reduction(sch, block)
    if found is None:
        return False
    stmt, kinds, loops, ns = found
    svars = [iv.var for iv in stmt.iter_vars[:ns]]
    s_loops, r_loops = list(loops[:ns]), list(loops[ns:])
    macs = loops_extent(sch, s_loops + r_loops)
    work = macs * _ops_per_step(stmt)  # what decides parallel loops: exps cost more than MACs
    x_loop = s_loops[-1]
    xext = extent(sch, x_loop)
    wregion = stmt.writes[0].region
    if xext is None or vars_in(wregion[-1].min) != {svars[-1]}:
        return False
    xv = choose_vec(xext, lanes)
    budget = acc_budget or max(4, regs // 2 - 2)
    nblk = 1
    k = loops_extent(sch, r_loops)
    if blocked is not None and k is not None and k >= blocked:
        r0 = extent(sch, r_loops[0]) or 1
        nblk = _block_count(r0, k // r0, k)
    ui = _pick_unroll_axis(sch, stmt, svars, svars[-1])
    uext = (extent(sch, s_loops[ui]) or 1) if ui is not None else 1
    orient = "x"
    if xv is None or xv < lanes:
        # a vector over another output axis whose operands can be re-laid out with it innermost,
        # copies made at run time cheap next to the block's work; preferred: an axis whose
        # operands are all constants (re-laid out at compile time, no copy), e.g. a 1x1 conv's
        # output channels rather than its rows
        cands = []
        for i, iv in enumerate(stmt.iter_vars[: ns - 1]):
            if int(iv.dom.extent) % lanes or iv.var not in vars_in(wregion[i].min):
                continue
            copied = relayout_copied(sch, block, iv.var, ctx)
            if copied is not None and copied * 8 <= macs:
                cands.append((copied == 0, int(iv.dom.extent), i))
        if cands:
            orient = "u"
            ui = max(cands)[2]
            uext = extent(sch, s_loops[ui]) or 1
    if (orient == "x" and xv is None) or orient not in orients:
        return False

    if orient == "u":
        if not relayout_innermost(sch, block, svars[ui], ctx):
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
        udim = next(d for d, rg in enumerate(sch.get(block).writes[0].region) if svars[ui] in vars_in(rg.min))
        sch.transform_layout(block, ("write", 0), move_dim_last(udim, len(sch.get(block).writes[0].region)))
        sch.reverse_compute_at(loc, outer[-1])
        fuse_consumers(sch, loc)
        wl = loops_below(sch, loc, outer[-1])
        vectorize_if(sch, wl[-1] if wl else None, lo=4)
        _parallel_outer(sch, outer, work)
        if (extent(sch, xi) or 1) > 1:
            sch.unroll(xi)
        vectorize_if(sch, u_in)
        sch.decompose_reduction(block, r_loops[0])
        return True

    phase_split_strided_reads(sch, block, svars[-1], reuse=reads_per_input(sch, stmt, macs))
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
    if not outer:
        return False
    if nblk > 1:
        return _blocked_columns(sch, block, outer, r_loops, inner, u_in, xi, nblk, lanes, work)
    sch.reorder(*outer, *r_loops, *inner)
    loc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(loc, outer[-1])
    fuse_consumers(sch, loc)
    wl = loops_below(sch, loc, outer[-1])
    vectorize_if(sch, wl[-1] if wl else None)
    _parallel_outer(sch, outer, work)
    if u_in is not None:
        sch.unroll(u_in)
    vectorize_if(sch, xi)
    sch.decompose_reduction(block, r_loops[0])
    return True


def _blocked_columns(sch, block, outer, r_loops, inner, u_in, xi, nblk, lanes, work):
    """The column tile of :func:`_tile_reduction` with its reduction summed in NBLK blocks (the
    outermost reduction loop cut, e.g. a block per input channel of a stem, or of about sqrt(K)
    terms; :func:`bdp.targets.schedules.float_tile._block_count`, the channel tiles' rule): each
    block in its own registers (``rfactor``), added into the tile's accumulators - the round-off
    of onnxruntime's blocked kernels rather than that of one serial sum."""
    rb, rin = sch.split(r_loops[0], [nblk, None])
    sch.reorder(*outer, rb, rin, *r_loops[1:], *inner)
    no = len(outer)
    main = sch.rfactor(rb, factor_axis=0)  # the block sums; BLOCK now adds them up
    # the loop handles now belong to BLOCK's write-back nest: MAIN's own loops from here
    ml = sch.get_loops(main)
    outer, rb, rin = ml[:no], ml[no], ml[no + 1]
    if u_in is not None:
        u_in = ml[-2]
    xi = ml[-1]
    loc = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(loc, rb)
    sch.reverse_compute_at(block, rb)
    try:
        sch.compute_inline(loc)  # the block sums are added straight from the registers
    except SCHEDULE_ERRORS:
        pass
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer[-1])
    fuse_consumers(sch, acc)
    wl = loops_below(sch, acc, outer[-1])
    vectorize_if(sch, wl[-1] if wl else None)
    below = loops_below(sch, block, rb)  # the adds of a block's sums: vectorized like the tile
    if below:
        vectorize_if(sch, below[-1])
        for lp in below[:-1]:
            if (extent(sch, lp) or 1) > 1:
                sch.unroll(lp)
    _parallel_outer(sch, outer, work)
    if u_in is not None:
        sch.unroll(u_in)
    vectorize_if(sch, xi)
    sch.decompose_reduction(main, rin)
    sch.decompose_reduction(block, rb)
    return True


def _tile_row_reduction(sch, block, lanes):
    """Reductions along the contiguous innermost axis (means, softmax sums, global pooling):
    ``rfactor`` the innermost reduction loop into VL partial sums kept in a vector, then add them."""
    stmt = sch.get(block)
    kinds = iter_kinds(stmt)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or "O" in kinds or not kinds.endswith("R"):
        return False
    ns = len(kinds) - len(kinds.lstrip("S"))
    if "S" in kinds[ns:]:
        return False
    rvar = stmt.iter_vars[-1].var
    if not any(len(r.region) and vars_in(r.region[-1].min) == {rvar} for r in stmt.reads):
        return False
    v = choose_vec(extent(sch, loops[-1]), lanes)
    if v is None:
        return False
    work = loops_extent(sch, loops)
    ro, ri = sch.split(loops[-1], [None, v])
    rf = sch.rfactor(ri, factor_axis=ns)
    rl = sch.get_loops(rf)
    # the partial sums' lane loop is innermost already: vectorize it, parallelize the outputs
    sch.vectorize(rl[-1])
    lead = [lp for lp in rl[:ns]]
    if lead and work >= PARALLEL_MIN_ELEMENTS:
        par_fuse(sch, lead)
    sch.decompose_reduction(rf, rl[ns])
    return True


def schedule_float_cpu(func, spec, const_params=(), debug=False):
    """(scheduled copy of float PrimFunc FUNC for a CPU target, relayouts), or (None, {}).

    CONST_PARAMS: indices of parameters that are constants at every call site; RELAYOUTS maps
    the ones the schedule wants stored differently to ``(dim, ndim)``: that dimension moved last.
    """
    from tvm import s_tir

    lanes = spec.vector_lanes(32)
    regs = spec.vector_registers
    for attempt in ("channels", "tiled", "simple"):
        ctx = {"const_params": set(const_params), "relayouts": {}}
        try:
            sch = s_tir.Schedule(func)
            blocks = root_blocks(sch)
            red = [b for b in blocks if "R" in iter_kinds(sch.get(b))]
            concats = {sch.get(b).name_hint: concat_split(sch.get(b)) for b in blocks}
            # inline injective producers, except padding (kept as a parallel copy)
            for b in blocks:
                stmt = sch.get(b)
                if "R" in iter_kinds(stmt) or is_output_block(sch, b):
                    continue
                if red and has_conditional(stmt.body) and attempt != "simple" and not feeds_light_reduction(sch, b):
                    continue
                if not inline_is_cheap(sch, b, concats):
                    continue
                try:
                    sch.compute_inline(b)
                except SCHEDULE_ERRORS:
                    pass
            if attempt == "channels":
                cropped, changed = crop_by_positions(sch)
                if changed:  # a fresh schedule of the rewritten function
                    names = [sch.get(b).name_hint for b in red]
                    sch = s_tir.Schedule(cropped)
                    red = [sch.get_sblock(n) for n in names]
            tiled = set()
            if attempt != "simple":
                for b in red:
                    name = sch.get(b).name_hint
                    # constant weights: channel tiles; then vectors over columns, then rows; a
                    # depthwise conv or pooling too narrow for either: channel tiles of its input
                    if (attempt == "channels" and _columns_first_fits(sch, b, spec, ctx)
                            and _tile_reduction(sch, b, lanes, regs, ctx, orients=("x",), acc_budget=regs // 2,
                                                blocked=spec.schedules.column_block_min_terms)):
                        tiled.add(name)
                    elif attempt == "channels" and tile_channels(sch, b, lanes, regs, ctx, vector_input=False):
                        tiled.update({name, name + "_rf"})
                    elif _tile_reduction(sch, b, lanes, regs, ctx):
                        tiled.add(name)
                    elif _tile_row_reduction(sch, b, lanes):
                        tiled.add(name + "_rf")
                    elif attempt == "channels" and tile_channels(sch, b, lanes, regs, ctx):
                        tiled.update({name, name + "_rf"})
                if not tiled:
                    continue
            for b in root_blocks(sch):
                stmt = sch.get(b)
                if stmt.name_hint in tiled:
                    continue
                loops = sch.get_loops(b)
                if any(sch.get(lp).kind != 0 for lp in loops):  # already parallel / vectorized
                    continue
                if not schedule_concat(sch, b, lanes, concats.get(stmt.name_hint)):
                    schedule_injective(sch, b, lanes)
            return sch.mod["main"], ctx["relayouts"]
        except SCHEDULE_ERRORS:  # this attempt does not apply: the next, simpler one
            if debug:
                raise
            continue
    return None, {}
