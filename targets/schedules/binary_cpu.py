"""Binary conv kernels on CPUs: the register-blocked popcount stage in orientation x or k
(:func:`binary_conv_plan`), the pack and pad stages, packed-bit outputs from the registers, the
depthwise kernel, and pack functions apart. See :mod:`bdp.targets.schedules` for the design."""

from __future__ import annotations

from ..options import DEFAULT
from .tir_util import (PARALLEL_MIN_BINARY_MACS, PARALLEL_MIN_ELEMENTS, SCHEDULE_ERRORS, concat_split, divisor,
                       extent, has_conditional, inline_is_cheap, iter_kinds, loops_below, root_blocks,
                       schedule_injective, vectorize_if)


class PlanError(RuntimeError):
    """A kernel's loops are not what its plan expects (a bug in bdp's schedule, not the input)."""

NARROW_WORD = 16  # a packed word of 16 bits: NEON's cnt + uadalp add popcounts into 16-bit lanes
NARROW_X_MIN_COLUMNS = 64  # AVX2: 16-bit words along the columns only for rows this wide (whole vectors)


def binary_word(p, spec, options=DEFAULT) -> int:
    """Bits per packed word of binary conv P on the CPU target SPEC (``BinaryConvParams.word_bits``).

    The popcount of a word is cheapest where the counts stay in narrow lanes:

    - NEON (``neon-cnt``): ``cnt`` counts bytes and ``uadalp`` adds byte pairs into 16-bit
      accumulator lanes; 64-bit words would widen every count to 64 bits (two more ``uaddlp``
      per vector). So 16-bit words (narrower ones where the group is narrower), 16-bit
      accumulators while the sum fits (``acc_dtype``).
    - AVX2: the nibble-table popcount (``vpshufb``) counts bytes for every word size; with byte
      counters (the default, :mod:`bdp.targets.byte_counters`) the byte counts are added as they
      are and no word size costs more per bit: :func:`avx2_byte_word`. Without them a 64-bit word
      adds one ``vpsadbw`` and a 16-bit word a shift, add and shift: 16-bit words in orientation x
      on rows of whole vectors (16 columns, at least NARROW_X_MIN_COLUMNS wide), elsewhere 64-bit
      words with the output channels in the lanes (orientation k).
    - AVX-512 VPOPCNTDQ and scalar ``popcnt``: 64-bit words (one instruction per word).

    Depthwise convs keep their byte words. The option ``binary_word`` forces a size."""
    if p.depthwise:
        return 0
    if options.binary_word != "auto":
        return int(options.binary_word)
    default = p.default_word
    traits = spec.schedules
    if traits.narrow_words:
        return min(default, NARROW_WORD)
    if traits.byte_counters and options.byte_counters and default >= NARROW_WORD:
        return avx2_byte_word(p, spec)
    if traits.byte_counters:
        _, ow = p.out_hw
        if default >= NARROW_WORD and ow % spec.vector_lanes(NARROW_WORD) == 0 and ow >= NARROW_X_MIN_COLUMNS:
            return NARROW_WORD
    return 0


def avx2_byte_word(p, spec) -> int:
    """AVX2 with byte-lane popcounts (:mod:`bdp.targets.byte_counters`): every word size costs
    the same per 256 bits, so the word is one that fills whole vectors of columns in orientation
    x: 16-bit words (16 columns a vector; they never pad more bits than 32-bit ones), 32-bit words
    where the row is a whole number of 8-column vectors but not of 16; 16-bit words with the
    channels in the lanes (orientation k) where neither fits. Measured on Zen 3 (1 thread): float
    output, the four 3x3 layers of ``bdp bench``, x/w16 0.653 ms (x/w32 0.637) at 64x64x80, x/w32
    0.614 (x/w64 0.725) at 128x32x40, k/w16 0.594 (x/w64 0.710) at 256x16x20, k/w16 0.592
    (k/w32 0.627, k/w64 0.641) at 512x8x10; a 3x3 conv with packed-bit output into a 1x1 one at
    64x80, x/w16 against x/w32: 0.47-0.61 against 0.90-0.91 ms (32 -> 64 channels), 0.87 against
    1.33 ms (64 -> 64)."""
    _, ow = p.out_hw
    if ow % spec.vector_lanes(NARROW_WORD) != 0 and ow % spec.vector_lanes(32) == 0:
        return 32
    return NARROW_WORD


def neon_xor_cycles(broadcasts, loads):
    """Cortex-A72 cycles per 128-bit XOR-popcount of a tile that needs BROADCASTS ``ld1r`` and
    LOADS loads in all per XOR: ``eor``, ``cnt`` and ``uadalp`` are one uop each on the two
    NEON pipes (F0/F1), a ``ld1r`` takes a load slot and a NEON uop, a plain vector load a load
    slot only, one load per cycle. So broadcasts cost NEON throughput, and tiles that share each
    broadcast across many vectors win, within the load slots."""
    return max((3.0 + broadcasts) / 2.0, loads)


# Cortex-A72 cycles of the output stage per output (int16 count -> float, border correction,
# scale and bias, store), read from the estimator's hot blocks of the 64- and 256-channel 3x3
# layers: in orientation x a vector of columns is stored whole; in k each channel lane is stored
# to its own plane
NEON_OUTPUT_CYCLES = {"x": 1.5, "k": 2.4}


def _neon_plan(p, spec, vl, xv, force):
    """The NEON (Cortex-A72) tiling: for each orientation the register tile with the fewest
    modelled cycles per XOR (:func:`neon_xor_cycles`; ties: fewer loads), then the orientation
    with the fewest modelled cycles per output (the XORs of an output plus its output stage,
    NEON_OUTPUT_CYCLES). Orientation x: NVEC vectors of columns (powers of two: LLVM splits
    odd-sized vectors badly) x MT channels, each broadcast weight serving NVEC vectors; k: NK
    vectors of channels x WT columns, each broadcast activation serving NK vectors."""
    oh, ow = p.out_hw
    mg = p.mg
    budget, regs = spec.binary_acc_registers, spec.vector_registers
    xors = p.kh * p.kw * p.cw / vl  # 128-bit XORs per output
    plans = []
    if force != "k":
        if xv == vl:
            # NVEC vectors of columns in each of YT rows: a broadcast weight serves NVEC * YT
            # vectors. A single channel (MT 1) measured 12-20% slower than the model says (an
            # activation load, with its row's address, per XOR): at least 2 where they divide
            ms = [m for m in (8, 6, 4, 3, 2) if mg % m == 0] or [1]
            tiles = [(neon_xor_cycles(1 / (v * t), 1 / m + 1 / (v * t)), 1 / m + 1 / (v * t), -t, t, v, m)
                     for v in (1, 2, 4, 8) if ow % (v * vl) == 0 for t in (1, 2, 4, 8) if oh % t == 0
                     for m in ms if v * t * m <= budget and v * t * m + v * t + 3 <= regs]
            cyc, _, _, yt, nvec, mt = min(tiles)
        else:  # a part of a register of columns: each XOR does xv / vl of the work
            mt = divisor(mg, [d for d in (8, 6, 4, 3, 2, 1) if d <= budget]) or 1
            cyc, nvec, yt = neon_xor_cycles(1.0, 1 / mt + 1.0) * vl / xv, 1, 1
        plans.append((xors * cyc + NEON_OUTPUT_CYCLES["x"],
                      {"orient": "x", "xv": xv * nvec, "mt": mt, "vl": vl, "yt": yt}))
    if force != "x" and mg % vl == 0:
        tiles = [(neon_xor_cycles(1 / k, 1 / w + 1 / k), 1 / w + 1 / k, k, w) for k in (1, 2, 4, 8)
                 if mg % (k * vl) == 0 for w in (8, 7, 6, 5, 4, 3, 2, 1)
                 if ow % w == 0 and k * w <= budget and k * w + k + 3 <= regs]
        cyc, _, nk, wt = min(tiles)
        plans.append((xors * cyc + NEON_OUTPUT_CYCLES["k"], {"orient": "k", "kt": nk * vl, "wt": wt, "vl": vl}))
    return min(plans, key=lambda t: t[0])[1]


# WIDE_TILES (``spec.schedules.wide_tiles``): register tiles chosen for the fewest loads per
# popcount (several vectors of columns in orientation x, up to 4 vectors of channels in k):
# measured on the Cortex-A72 estimator and on AVX2 (Zen 3); elsewhere (AVX-512, not measured
# since) the tiles of before (one vector of columns, at most two of channels)


def binary_conv_plan(p, spec, options=DEFAULT) -> dict:
    """The tiling of one binary conv on a CPU target: orientation and tile sizes."""
    vl = spec.vector_lanes(p.word)
    oh, ow = p.out_hw
    mg = p.mg
    force = options.binary_orient  # "auto", or "x" / "k" forced: for experiments and tests
    k_ok = mg % vl == 0
    # x tile: the widest power of two up to a register that divides OW (no ragged vectors)
    xv = next(v for v in (vl, vl // 2, vl // 4, vl // 8, 8, 4, 2, 1) if v <= vl and ow % v == 0)
    wide = spec.schedules.wide_tiles
    if spec.schedules.cycle_model_tiles and p.out_mode != "bits":
        # packed-bit outputs keep the tiles below: their bytes come from the registers when a tile
        # holds 8 channels (x) and their output stage is not the one NEON_OUTPUT_CYCLES models
        return _neon_plan(p, spec, vl, xv, force)
    # k where the column tile falls short of a register (the WIDE_TILES ISAs, where it was
    # measured; elsewhere, AVX-512, k only below half a register) or the row is short
    short = xv < vl if wide else 2 * xv < vl
    if force in ("x", "k"):
        orient = force if (force == "x" or k_ok) else "x"
    elif k_ok and (short or ow < 4 * xv):
        orient = "k"
    else:
        orient = "x"
    # accumulator budget: about half the vector registers (the rest: operands, popcount temporaries;
    # AVX2's nibble-table popcount needs more of them)
    budget = spec.binary_acc_registers
    if orient == "x":
        mt = divisor(mg, [d for d in (8, 6, 4, 3, 2, 1) if d <= budget]) or 1
        nvec = 1
        if wide and xv == vl:
            # several vectors of columns per tile: each broadcast weight word serves NVEC vectors,
            # each activation vector MT channels; the fewest loads per popcount, 1/MT + 1/NVEC
            tiles = [(1 / m + 1 / v, -m, v, m) for v in (1, 2, 4) if ow % (v * vl) == 0
                     for m in (8, 6, 4, 3, 2, 1) if mg % m == 0 and v * m <= budget]
            _, _, nvec, mt = min(tiles)
        return {"orient": "x", "xv": xv * nvec, "mt": mt, "vl": vl}
    if wide:
        # NK vectors of output channels x WT columns: each broadcast activation word serves NK
        # vectors, each weight vector WT columns; the fewest loads per popcount
        tiles = [(1 / w + 1 / k, -k, k, w) for k in (1, 2, 4) if mg % (k * vl) == 0
                 for w in (8, 7, 6, 5, 4, 3, 2, 1) if ow % w == 0 and k * w <= budget]
        _, _, nk, wt = min(tiles)
        return {"orient": "k", "kt": nk * vl, "wt": wt, "vl": vl}
    kt = 2 * vl if (mg % (2 * vl) == 0 and 2 * budget >= 4 * 2) else vl
    nk = kt // vl
    wmax = max(1, budget // nk)
    wt = divisor(ow, [d for d in (4, 5, 6, 3, 8, 7, 2) if d <= wmax]) or min(4, wmax, ow)
    return {"orient": "k", "kt": kt, "wt": wt, "vl": vl}


def _pack_width(w, vl):
    for v in (4 * vl, 2 * vl):
        if w % v == 0:
            return v
    if w <= 4 * vl:
        return w
    return 2 * vl


def _pack_tiles(sch, vl, words_inner):
    """The pack block's loops: columns split into vectors (innermost), a word's bits above them
    accumulated in a register (a local cache written back per word), the rows fused outermost,
    with the words among them or, WORDS_INNER, just above the bits. Returns (block, rows, words
    loop, bits loop)."""
    pk = sch.get_sblock("bdp_pack")
    n, g, c, y, x, kb = sch.get_loops(pk)
    xo, xi = sch.split(x, [None, _pack_width(extent(sch, x), vl)])
    if words_inner:
        sch.reorder(n, g, y, xo, c, kb, xi)
        at, rows = c, (n, g, y)
    else:
        sch.reorder(n, g, c, y, xo, kb, xi)
        at, rows = xo, (n, g, c, y)
    loc = sch.cache_write(pk, 0, "local")
    sch.reverse_compute_at(loc, at)
    vectorize_if(sch, xi)
    below = loops_below(sch, loc, at)
    vectorize_if(sch, below[-1] if below else None)
    return pk, sch.fuse(*rows), c, kb


def _sched_pack_cpu(sch, vl, parallel):
    pk, rows, _, kb = _pack_tiles(sch, vl, words_inner=False)
    if parallel:
        sch.parallel(rows)
    sch.decompose_reduction(pk, kb)
    sch.unroll(kb)  # the word's bits: shifts and channel offsets become constants


def is_pack_function(func) -> bool:
    """A pack stage of its own (``in_words`` kernels, :func:`bdp.targets.lower.pack_apart`), with
    the producers Relax fused into it."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name, want in (("bdp_pack", True), ("bdp_popcount", False)):
        try:
            sch.get_sblock(name)
            found = True
        except SCHEDULE_ERRORS:
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
    piece of the concatenation (the pieces' common divisor, :func:`concat_split`); the words and
    chunks are unrolled, so each copy's piece is known at compile time (the others fold away) and
    the float concatenation is never written, only its words. Without a concatenation the bits
    of a word are unrolled."""
    import math

    from tvm import s_tir

    sch = s_tir.Schedule(func)
    lanes = spec.vector_lanes(32)
    blocks = root_blocks(sch)
    plans = [concat_split(sch.get(b)) for b in blocks]
    plans = [pl for pl in plans if pl is not None]
    chunk = plans[0][1] if len(plans) == 1 and plans[0][0] == 1 else None
    has_concat = any(has_conditional(sch.get(b).body, select=False) for b in blocks)
    any_concat = {sch.get(b).name_hint: True for b in blocks}  # made uniform by the unrolled chunks
    for b in blocks:
        stmt = sch.get(b)
        if stmt.name_hint == "bdp_pack" or "R" in iter_kinds(stmt):
            continue
        if inline_is_cheap(sch, b, any_concat):
            try:
                sch.compute_inline(b)
            except SCHEDULE_ERRORS:
                pass
    _, _, _, _, x, _ = sch.get_loops(sch.get_sblock("bdp_pack"))
    w = extent(sch, x)
    pk, rows, c, kb = _pack_tiles(sch, spec.vector_lanes(64), words_inner=True)
    cw, bits = extent(sch, c), extent(sch, kb)
    if extent(sch, rows) * w * cw * bits >= PARALLEL_MIN_ELEMENTS:
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
    for b in root_blocks(sch):
        if sch.get(b).name_hint != "bdp_pack" and all(sch.get(lp).kind == 0 for lp in sch.get_loops(b)):
            schedule_injective(sch, b, lanes)
    return sch.mod["main"]


def _sched_pad_cpu(sch, p, parallel):
    """The pad stage: rows in parallel; each row's columns partitioned into the left border, the
    columns that read the input for every phase, and the rest, so that the middle part is a plain
    copy (its condition and clamps simplify away; LLVM vectorizes it) and only the borders keep
    the select: byte-wide depthwise rows went through it a byte at a time."""
    try:
        pd = sch.get_sblock("bdp_pad")
    except SCHEDULE_ERRORS:  # no pad stage
        return
    loops = sch.get_loops(pd)
    rows = sch.fuse(*loops[:4])
    if parallel:
        sch.parallel(rows)
    _, l, _, _ = p.pads
    sw = p.strides[1]
    q = loops[-1]
    wq = extent(sch, q)
    if wq is None:
        return
    lo = -(-l // sw)  # from here every phase's column is right of the left padding
    hi = min(wq, (l + p.w - sw + 1) // sw)  # below it every phase's column is inside the row
    if 0 <= lo < hi and hi - lo >= 16:
        parts = [f for f in (lo, hi - lo) if f > 0] + ([None] if hi < wq else [])
        if len(parts) > 1:  # the last part: what the others leave (TVM's convention)
            sch.loop_partition(q, parts)


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
    loops = loops_below(sch, bb, at)  # [bytes, columns, jb], the unit ones dropped
    nb = 1 if tile_m > 8 else 0
    if len(loops) not in (nb + 1, nb + 2) or extent(sch, loops[-1]) != 8:
        raise PlanError(f"bdp: unexpected byte-stage loops {[extent(sch, lp) for lp in loops]}")
    jb = loops[-1]
    if len(loops) == nb + 2:
        x = loops[-2]
        sch.reorder(jb, x)
        vectorize_if(sch, x)
    sch.unroll(jb)
    return lambda: sch.decompose_reduction(bb, jb)  # after the tile loops are parallel


def _register_accumulators(sch, blk, at, p, epilogue, tile_m=0, lanes_last=False, bits_in_tile=True, acc_lanes=0):
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
        if tile_m and tile_m % 8 == 0 and p.m % tile_m == 0 and bits_in_tile:
            return _bits_in_tile(sch, loc, at, p, tile_m)
        _sched_bits_cpu(sch, p)
    else:
        epilogue()
    below = loops_below(sch, loc, at)
    if lanes_last and below:
        # orientation k: the write-back runs the columns outer and the channels (the accumulators'
        # lanes) as vectors of one register (a serial loop over the tile's registers), each lane
        # stored to its channel's plane; the other way round (vectors over the tile's columns),
        # every channel went through the stack lane by lane
        if len(below) == 2:
            sch.reorder(below[1], below[0])
            below = [below[1], below[0]]
        lanes = acc_lanes
        if lanes and extent(sch, below[-1]) > lanes and extent(sch, below[-1]) % lanes == 0:
            below = below[:-1] + list(sch.split(below[-1], [None, lanes]))
    vectorize_if(sch, below[-1] if below else None)
    return None


# Output rows per depthwise tile. A tile of YT rows reads each input row once per kernel column
# for up to kH taps of its rows (LLVM merges the unrolled taps' equal loads) and each broadcast
# weight serves YT rows: the taps' loads fall from 3 load slots per vector to about 1. 7x7
# depthwise layers (bnn-baseline's): Cortex-A72 estimate 1.50 -> 0.78 ms at 32x64x80 (with the
# partitioned pad stage); AVX2 (Zen 3) measured 1.4-1.6x faster at 32x64x80 .. 256x8x10 than
# one row at a time, 2 rows in between. Elsewhere (AVX-512, not measured) a row at a time.
DEPTHWISE_ROWS = 4  # on the targets whose ``spec.schedules.depthwise_rows`` is set


def depthwise_rows(p, spec) -> int:
    """Output rows per tile of depthwise binary conv P on SPEC (1: a row at a time)."""
    oh, _ = p.out_hw
    if not spec.schedules.depthwise_rows or p.kh < 2:
        return 1
    return next((t for t in (DEPTHWISE_ROWS, 2) if oh % t == 0), 1)


def _depthwise_cpu(sch, p, blk, loops, spec):
    """One input channel per group: the taps are 0/1 bytes, added in uint8 (int16 for kernels of
    256+ taps) over vectors of 16/32 output columns kept in registers across every tap (the row is
    computed rounded up to whole vectors, see ``ow_padded``), in tiles of
    :func:`depthwise_rows` rows with the taps unrolled; the float / ±1 epilogue runs in the
    same parallel row loop, right after the tile's taps (one parallel region less, the counts
    still in L1)."""
    n, m, y, x, r, s, c = loops
    v = 16 if p.ow_padded <= 16 else 32
    xo, xi = sch.split(x, [None, v])
    yt = depthwise_rows(p, spec)
    if yt > 1:
        y, yi = sch.split(y, [None, yt])
        sch.reorder(n, m, y, xo, s, r, c, yi, xi)
    else:
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
            _, exi = sch.split(loops_below(sch, ep, rows)[-1], [None, vx])
            sch.vectorize(exi)
    if yt > 1:
        for lp in (r, yi):
            sch.unroll(lp)
    sch.vectorize(xi)
    init = sch.decompose_reduction(blk, s if yt > 1 else r)
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
        except SCHEDULE_ERRORS:
            break
    rest = []
    for b in root_blocks(sch):
        name = sch.get(b).name_hint
        if name.startswith("bdp_"):
            continue
        try:
            sch.compute_inline(b)
        except SCHEDULE_ERRORS:
            rest.append(name)
    return rest


def _schedule_rest(sch, rest, spec):
    lanes = spec.vector_lanes(32)
    for name in rest:
        b = sch.get_sblock(name)
        if all(sch.get(lp).kind == 0 for lp in sch.get_loops(b)):
            schedule_injective(sch, b, lanes)


def schedule_binary_cpu(func, p, spec, options=DEFAULT):
    from tvm import s_tir

    plan = binary_conv_plan(p, spec, options)
    sch = s_tir.Schedule(func)
    rest = _absorb_fused(sch)
    if not p.in_words:
        _sched_pack_cpu(sch, spec.vector_lanes(64), p.n * p.c * p.h * p.w >= 4 * PARALLEL_MIN_ELEMENTS)
    hp, wp = p.padded_hw
    _sched_pad_cpu(sch, p, p.n * p.group * p.cw * hp * wp >= PARALLEL_MIN_ELEMENTS)
    blk = sch.get_sblock("bdp_popcount")
    n, m, y, x, r, s, c = sch.get_loops(blk)
    if p.depthwise:
        _depthwise_cpu(sch, p, blk, (n, m, y, x, r, s, c), spec)
        _schedule_rest(sch, rest, spec)
        return sch.mod["main"]
    if plan["orient"] == "x":
        mo, mi = sch.split(m, [None, plan["mt"]])
        xo, xi = sch.split(x, [None, plan["xv"]])
        yt = plan.get("yt", 1)
        if yt > 1:  # rows in the tile too: every broadcast weight serves them all
            y, yi = sch.split(y, [None, yt])
            sch.reorder(n, y, xo, mo, r, s, c, mi, yi, xi)
            inner = [("unroll", mi), ("unroll", yi), ("vectorize", xi)]
        else:
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
                                    lanes_last=plan["orient"] == "k", bits_in_tile=options.bits_in_tile,
                                    acc_lanes=plan["vl"])
    tiles = sch.fuse(n, y, xo)
    if p.binary_macs >= PARALLEL_MIN_BINARY_MACS:
        sch.parallel(tiles)
    for kind, loop in inner:
        if int(sch.get(loop).extent) > 1:
            getattr(sch, kind)(loop) if kind == "unroll" else vectorize_if(sch, loop)
    sch.decompose_reduction(blk, r)
    if finish is not None:
        finish()
    _schedule_rest(sch, rest, spec)
    return sch.mod["main"]
