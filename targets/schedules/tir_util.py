"""TIR helpers every bdp schedule uses: loop and block queries, vectorize/parallel helpers, the
work thresholds below which loops stay serial, and the generic injective schedule.

Schedule primitives that do not apply raise ``tvm.s_tir.ScheduleError``; the helpers that try a
primitive catch that type only (:data:`SCHEDULE_ERRORS`).
"""

from __future__ import annotations

from tvm.error import InternalError
from tvm.s_tir import ScheduleError

# what a schedule primitive raises when it does not apply (and TVM's own checks behind it)
SCHEDULE_ERRORS = (ScheduleError, InternalError)

# Below these amounts of work a parallel region costs more than it saves (thread wake-up, and on a
# busy machine the wait for a descheduled worker); such loops stay serial.
PARALLEL_MIN_ELEMENTS = 32768  # elementwise outputs
PARALLEL_MIN_MACS = 1 << 20  # float multiply-accumulates
PARALLEL_MIN_BINARY_MACS = 16 << 20  # binary multiply-accumulates (XOR + popcount lanes)


def loops_below(sch, block, anchor):
    """The loops of BLOCK nested inside loop ANCHOR."""
    loops = sch.get_loops(block)
    a = sch.get(anchor)
    for i, lp in enumerate(loops):
        if sch.get(lp).same_as(a):
            return loops[i + 1:]
    return []


def vectorize_if(sch, loop, lo=2):
    """Vectorize LOOP when its extent is a power of two >= LO."""
    if loop is None:
        return
    ext = extent(sch, loop)
    if ext is not None and ext >= lo and ext & (ext - 1) == 0:
        sch.vectorize(loop)


def divisor(n, prefs):
    for d in prefs:
        if d <= n and n % d == 0:
            return d
    return None


def extent(sch, loop):
    try:
        return int(sch.get(loop).extent)
    except TypeError:
        return None


def loops_extent(sch, loops):
    """The product of the extents of LOOPS (a loop of unknown extent counts 1)."""
    total = 1
    for lp in loops:
        total *= extent(sch, lp) or 1
    return total


def iter_kinds(block_stmt):
    from tvm import tirx

    return "".join({tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}.get(iv.iter_type, "O")
                   for iv in block_stmt.iter_vars)


def spatial_then_reduction(sch, block):
    """(stmt, kinds, loops, ns) for a block whose loops are ``S...S R...R`` (NS spatial ones
    first, at least one reduction, no opaque iterator), else None."""
    stmt = sch.get(block)
    kinds = iter_kinds(stmt)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or "O" in kinds or not kinds.startswith("S") or "R" not in kinds:
        return None
    ns = len(kinds) - len(kinds.lstrip("S"))
    if "S" in kinds[ns:]:
        return None
    return stmt, kinds, loops, ns


def vars_in(expr):
    import tvm_ffi
    from tvm import tirx

    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.add(v)), order="post")
    return found


def region_vars(region):
    out = set()
    for r in region:
        out |= vars_in(r.min)
        out |= vars_in(r.extent)
    return out


def has_conditional(stmt, select=True):
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


def loads_of(stmt, buf):
    """How many loads of BUF the statement STMT makes."""
    import tvm
    import tvm_ffi

    n = [0]

    def visit(ld):
        if ld.source.same_as(buf):
            n[0] += 1

    tvm_ffi.structural_walk(stmt, (tvm.ir.TensorLoad, visit), order="post")
    return n[0]


def has_float_divide(stmt):
    """Whether STMT divides floats (a vector divide costs 7-18 cycles a vector on x86 and AArch64
    cores, against one or less for a multiply)."""
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(d):
        if "float" in str(d.ty.dtype):
            found.append(d)

    tvm_ffi.structural_walk(stmt, [(tirx.Div, visit)], order="post")
    return bool(found)


def _broadcast(block_stmt, buf):
    """Whether BLOCK_STMT reads BUF at the same element across one of its spatial iterations (an
    iteration variable of extent > 1 that no index of its BUF region uses)."""
    regions = [r.region for r in block_stmt.reads if r.source.same_as(buf)]
    if not regions:
        return False
    used = set().union(*(region_vars(rg) for rg in regions))
    return any(iv.iter_type == 0  # data-parallel (spatial)
               and not (hasattr(iv.dom.extent, "value") and int(iv.dom.extent.value) == 1)
               and iv.var not in used for iv in block_stmt.iter_vars)


def inline_is_cheap(sch, block, concats=None):
    """Inlining BLOCK recomputes it once per load in each consumer: only allow single loads, and
    not into a selection between several buffers (concatenation), unless CONCATS (block name ->
    :func:`concat_split` plan, taken before any inlining) can make the selection uniform per
    loop iteration: vectorized, every branch of a select is computed for every lane."""
    stmt = sch.get(block)
    if not stmt.writes:
        return False
    buf = stmt.writes[0].source
    divides = has_float_divide(stmt.body)
    for c in sch.get_consumers(block):
        cs = sch.get(c)
        if loads_of(cs.body, buf) > 1:
            return False
        if divides and _broadcast(cs, buf):
            # a divide read broadcast along an axis of its consumer (softmax's 1 / sum): inlined,
            # it would divide once per consumer iteration instead of once per element
            return False
        tensors = {r.source for r in cs.reads if len(r.region) > 0}
        if (len(tensors) > 1 and "R" not in iter_kinds(cs) and has_conditional(cs.body, select=False)
                and (concats or {}).get(cs.name_hint) is None):
            return False
    return True


CONCAT_MAX_PIECES = 16  # a concatenation's pieces are unrolled: at most this many


def concat_split(stmt):
    """For a concatenation block STMT (spatial, an if_then_else between the buffers it reads,
    every read buffer shaped like the output except along one axis): ``(axis, g, n)``, where
    every piece's size along AXIS is a multiple of G and the output has N = size/G chunks of G,
    each of which reads one piece only; None for anything else (or more than
    ``CONCAT_MAX_PIECES`` chunks, or a concatenation along the innermost axis)."""
    import math

    if "R" in iter_kinds(stmt) or "O" in iter_kinds(stmt) or len(stmt.writes) != 1:
        return None
    if not has_conditional(stmt.body, select=False):
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


def root_blocks(sch):
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    return sch.get_child_blocks(root)


def is_output_block(sch, block):
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    name = sch.get(block).name_hint
    return any(sch.get(b).name_hint == name for b in sch.get_output_blocks(root))








def choose_vec(ext, lanes):
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


def par_fuse(sch, loops):
    """Fuse LOOPS (outermost first) and mark the result parallel; returns it (or None)."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = extent(sch, fused)
    if ext is None or ext >= 2:
        sch.parallel(fused)
    return fused


PARALLEL_MIN_ROWS = 64  # enough rows to share among threads without splitting the rows


def schedule_injective(sch, block, lanes, min_parallel_work=PARALLEL_MIN_ELEMENTS):
    """Parallel over the outer loops, vectorized innermost loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    stmt = sch.get(block)
    kinds = iter_kinds(stmt)
    if len(kinds) != len(loops) or "O" in kinds:
        return  # loops that do not map one to one onto the block's iterators: leave them
    if "R" in kinds:
        # a reduction left alone: parallelize its leading spatial loops only
        lead = []
        for lp, k in zip(loops, kinds):
            if k != "S":
                break
            lead.append(lp)
        if lead and loops_extent(sch, lead) >= 2 and loops_extent(sch, loops) >= min_parallel_work:
            par_fuse(sch, lead)
        return
    total = loops_extent(sch, loops)
    inner = loops[-1]
    iext = extent(sch, inner)
    v = choose_vec(iext, lanes)
    if v is None and iext is not None and iext > 2 * lanes:
        v = lanes  # ragged tail
    outer = list(loops[:-1])
    rows = loops_extent(sch, outer)
    if v is not None and v != iext:
        io, ii = sch.split(inner, [None, v])
        if rows < PARALLEL_MIN_ROWS:
            outer.append(io)
        # else the row's vectors stay a serial loop inside each parallel row: what depends on
        # the row only (a resize's source rows and weights, a broadcast) is computed once per row
        inner = ii
    elif iext is not None and iext in (v, 2) and len(outer) >= 2 and loops_extent(sch, outer[:-1]) >= PARALLEL_MIN_ROWS:
        # one vector per position of the loop above it (a resize's column stage: the phases of
        # one input column; a pair of them is a vector too): that loop stays serial inside the
        # parallel rows, so its index is a counter, not the remainder of a division of the fused
        # loop's
        v = iext
        above = outer.pop()
        ext = extent(sch, above)
        u = next((d for d in (4, 2) if ext and ext % d == 0), None)
        if u and v * u <= 4 * lanes:  # a few of them per iteration: independent work for the pipes
            _, ui = sch.split(above, [None, u])
            sch.unroll(ui)
    if v is not None:
        sch.vectorize(inner)
    elif not outer:
        outer = list(loops)
    if outer and total >= min_parallel_work:
        par_fuse(sch, outer)


def fuse_consumers(sch, loc):
    changed = True
    while changed:
        changed = False
        for c in sch.get_consumers(loc):
            try:
                sch.reverse_compute_inline(c)
                changed = True
                break
            except SCHEDULE_ERRORS:
                continue
