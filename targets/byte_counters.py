"""Byte-lane popcount accumulation: a TIR pass for targets whose vector popcount counts bytes
(AVX2's nibble-table ``vpshufb``).

LLVM makes the popcount of a vector of 16/32/64-bit words from byte counts (two ``vpshufb``
table lookups and an add per vector) and then sums each word's bytes: for 16-bit words a shift,
an add and a shift more, for 64-bit words a ``vpsadbw``. A binary conv tile adds thousands of
such popcounts into the same accumulators, and every byte count is at most 8, so 31 of them fit
in a byte: the byte counts can be added as they are, in byte lanes, and each word's bytes summed
once per 31 steps (the issue's micro-kernel: ``vpsadbw`` every few steps). On AVX2 (Zen 3) the
16-bit words' popcount took 12 vector instructions per 256-bit XOR, 5 of them on the two shuffle
and shift pipes; byte lanes take 9, 3 of them on those pipes.

The pass rewrites what bdp's CPU schedules produce for a binary conv's register tile once TVM
has lowered it (the ``host`` stage of :mod:`bdp.targets.tir_pipeline`): a nest of serial loops
(the taps and words of the reduction) whose innermost body only binds variables and updates
accumulators of a local buffer,

    acc[i] = acc[i] + cast(intN x L, popcount(E))      E: uint{8,16,32,64} x L

becomes, per chunk of at most :data:`MAX_STEPS` steps of the nest (the innermost loops, the last
one split where it alone is longer),

    bytes[j] = 0 ...
    <the chunk's loops>: bytes[j] = bytes[j] + popcount(reinterpret(uint8 x L*N/8, E))
    acc[i] = acc[i] + cast(intN x L, sum of each word's bytes of bytes[j])

The counts are the same integers (exact); nothing else in a function changes. Nests that do not
have exactly this form are left as they are.

A function the pass cannot take apart as it expects is compiled as it came (the rewrite is an
optimization, never a failed build), and said: into the notes of :func:`skipped_rewrites` (the
compile report's ``notes``, see :func:`bdp.targets.lower.build`), else as a warning.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

from bdp.errors import first_line

_NOTES = threading.local()  # the notes list of the build running in this thread (skipped_rewrites)

MAX_STEPS = 31  # popcount additions per byte lane between widenings: 31 * 8 = 248 <= 255
MIN_STEPS = 4  # chunks shorter than this are not worth a widening each


def _int(e):
    from tvm import tirx

    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _dtype(e):
    import tvm

    return tvm.DataType(str(e.ty.dtype))


def _popcount_arg(e):
    """E when e is ``cast(intN x L, popcount(E))`` with E unsigned 8/16/32/64-bit lanes, else None."""
    import tvm
    from tvm import tirx

    if not isinstance(e, tirx.Cast):
        return None
    call = e.value
    if not (isinstance(call, tvm.ir.Call) and getattr(call.op, "name", "") == "tirx.popcount" and len(call.args) == 1):
        return None
    arg = call.args[0]
    at, rt = _dtype(arg), _dtype(e)
    if at.type_code != 1 or at.bits not in (8, 16, 32, 64) or at.lanes < 2:  # 1: kDLUInt
        return None
    if rt.type_code not in (0, 1) or rt.lanes != at.lanes or rt.bits < 16:
        return None
    return arg


def _accumulation(store):
    """(buffer, indices, E) when STORE is ``acc[i] = acc[i] + cast(popcount(E))`` into a local
    buffer, else None."""
    import tvm_ffi
    from tvm import ir, tirx

    if not isinstance(store, tirx.BufferStore) or store.buffer.scope() != "local":
        return None
    v = store.value
    if not isinstance(v, tirx.Add):
        return None
    for load, other in ((v.a, v.b), (v.b, v.a)):
        if (isinstance(load, ir.TensorLoad) and load.source.same_as(store.buffer)
                and len(load.indices) == len(store.indices)
                and all(tvm_ffi.structural_equal(a, b) for a, b in zip(load.indices, store.indices))):
            arg = _popcount_arg(other)
            if arg is not None:
                return store.buffer, store.indices, arg
    return None


def _seq(stmt):
    from tvm import tirx

    return list(stmt.seq) if isinstance(stmt, tirx.SeqStmt) else [stmt]


def _nest(loop):
    """(loops, levels, body) of a pure accumulation nest rooted at LOOP, else None. LEVELS[i] is
    the list of ``Bind`` statements right inside loops[i] before the next loop; BODY the innermost
    loop's statements in order: binds and accumulations (:func:`_accumulation`), at least one."""
    from tvm import tirx

    from .schedules.tir_util import loads_of

    loops, levels = [], []
    stmt = loop
    while True:
        if not (isinstance(stmt, tirx.For) and stmt.kind in (tirx.ForKind.SERIAL, tirx.ForKind.UNROLLED)
                and _int(stmt.min) == 0 and _int(stmt.extent) and stmt.thread_binding is None):
            return None
        loops.append(stmt)
        body = _seq(stmt.body)
        if isinstance(body[-1], tirx.For) and all(isinstance(s, tirx.Bind) for s in body[:-1]):
            levels.append(body[:-1])
            stmt = body[-1]
            continue
        items = []
        for s in body:
            if isinstance(s, tirx.Bind):
                items.append(s)
                continue
            acc = _accumulation(s)
            if acc is None:
                return None
            items.append(acc)
        if all(isinstance(s, tirx.Bind) for s in items):
            return None
        # the accumulators must be the same at every step: no index may use the nest's loop
        # variables or what it binds (a byte lane per accumulator is kept across the steps)
        inner = {lp.loop_var for lp in loops}
        inner |= {b.var for lv in levels for b in lv} | {s.var for s in items if isinstance(s, tirx.Bind)}
        for a in items:
            if isinstance(a, tuple) and any(
                    any(v in inner for v in tirx.analysis.undefined_vars(i)) for i in a[1]):
                return None
        # nothing in the nest may read an accumulator but its own update (the partial sums are
        # in the byte lanes until the chunk ends)
        accs = [a[0] for a in items if isinstance(a, tuple)]
        exprs = [b.value for lv in levels for b in lv] + [s.value if isinstance(s, tirx.Bind) else s[2] for s in items]
        exprs += [i for a in items if isinstance(a, tuple) for i in a[1]]
        exprs += [lp.extent for lp in loops]
        if any(loads_of(e, b) for e in exprs for b in accs):
            return None
        return loops, levels, items


def _byte_sum(v, word_bits):
    """Each WORD_BITS-lane of V (uint8 lanes reinterpreted) summed over its bytes, as uint lanes."""
    from tvm import tirx

    lanes = _dtype(v).lanes * 8 // word_bits
    w = tirx.reinterpret(f"uint{word_bits}x{lanes}", v)

    def const(c):
        return tirx.Broadcast(tirx.const(c, f"uint{word_bits}"), lanes)

    width = 8
    while width < word_bits:
        mask = 0
        for k in range(0, word_bits, 2 * width):
            mask |= ((1 << width) - 1) << k
        w = tirx.Add(tirx.BitwiseAnd(w, const(mask)),
                     tirx.BitwiseAnd(tirx.shift_right(w, const(width)), const(mask)))
        width *= 2
    return w


def _rewrite(loops, levels, items):
    """The chunked byte-lane form of a pure accumulation nest (see the module docstring), or None
    when the chunks would be too short."""
    import tvm_ffi
    from tvm import tirx

    extents = [_int(lp.extent) for lp in loops]
    # the chunk: the innermost loops whose steps fit; the last one split when it alone is too long
    k = len(loops)
    steps = 1
    while k > 0 and steps * extents[k - 1] <= MAX_STEPS:
        k -= 1
        steps *= extents[k]
    split = None
    if k == len(loops):  # the innermost loop alone is too long: split it by its largest divisor that fits
        e = extents[-1]
        d = max(c for c in range(1, MAX_STEPS + 1) if e % c == 0)
        if d < MIN_STEPS:
            return None
        split, steps = d, d
    elif steps < MIN_STEPS:
        return None

    # one byte-lane register per distinct accumulator
    accs = [a for a in items if isinstance(a, tuple)]
    slots, order = {}, []
    for buf, idx, arg in accs:
        key = (buf, tuple(str(i) for i in idx))
        if key not in slots:
            slots[key] = len(slots)
            order.append((buf, idx, _dtype(arg)))
    nbytes = {str(dt) for _, _, dt in order}
    if len(nbytes) != 1:
        return None
    wdt = order[0][2]
    blanes = wdt.bits * wdt.lanes // 8
    bdt = f"uint8x{blanes}"
    bbuf = tirx.decl_buffer((len(order),), bdt, name="bdp_byte_counts", scope="local")

    def bload(j):
        return tirx.BufferLoad(bbuf, [tirx.const(j, "int32")])

    zero = tirx.Broadcast(tirx.const(0, "uint8"), blanes)
    inits = [tirx.BufferStore(bbuf, zero, [tirx.const(j, "int32")]) for j in range(len(order))]
    widen = []
    for j, (buf, idx, dt) in enumerate(order):
        old = tirx.BufferLoad(buf, idx)
        s = _byte_sum(bload(j), dt.bits)
        widen.append(tirx.BufferStore(buf, tirx.Add(old, tirx.Cast(str(old.ty.dtype), s)), idx))
    body_stores = []  # the innermost body: its binds as they were, the accumulations in bytes
    for item in items:
        if not isinstance(item, tuple):
            body_stores.append(item)
            continue
        buf, idx, arg = item
        j = slots[(buf, tuple(str(i) for i in idx))]
        cnt = tirx.popcount(arg if _dtype(arg).bits == 8 else tirx.reinterpret(bdt, arg))
        body_stores.append(tirx.BufferStore(bbuf, tirx.Add(bload(j), cnt), [tirx.const(j, "int32")]))

    levels = list(levels) + [[]]  # the innermost loop's binds are in its body (items)

    def build(i, inner):
        """Loop i with its binds around INNER."""
        lp = loops[i]
        body = tirx.SeqStmt(list(levels[i]) + _seq(inner)) if levels[i] else inner
        return tirx.For(lp.loop_var, lp.min, lp.extent, lp.kind, body, lp.thread_binding, lp.annotations)

    inner = tirx.SeqStmt(body_stores) if len(body_stores) > 1 else body_stores[0]
    if split is None:
        for i in range(len(loops) - 1, k - 1, -1):
            inner = build(i, inner)
        chunk = tirx.SeqStmt(inits + [inner] + widen)
        for i in range(k - 1, -1, -1):
            chunk = build(i, chunk)
        return tirx.SeqStmt([tirx.AllocBuffer(bbuf), chunk])
    # the innermost loop v split into vo (chunks) and vi (steps): v = vo * split + vi
    last = loops[-1]
    v = last.loop_var
    vdt = str(v.ty.dtype)
    vo, vi = tirx.Var(f"{v.name}_o", vdt), tirx.Var(f"{v.name}_i", vdt)
    at = vo * tirx.const(split, vdt) + vi
    inner_body = tvm_ffi.structural_map(inner, [(tirx.Var, lambda x: at if x.same_as(v) else x)])
    inner = tirx.For(vi, tirx.const(0, vdt), tirx.const(split, vdt), last.kind, inner_body)
    chunk = tirx.For(vo, tirx.const(0, vdt), tirx.const(extents[-1] // split, vdt), tirx.ForKind.SERIAL,
                     tirx.SeqStmt(inits + [inner] + widen))
    for i in range(len(loops) - 2, -1, -1):
        chunk = build(i, chunk)
    return tirx.SeqStmt([tirx.AllocBuffer(bbuf), chunk])


def byte_counters(func):
    """FUNC with every pure popcount accumulation nest in byte-lane form. Returns (function,
    number of nests rewritten)."""
    import tvm_ffi
    from tvm import tirx

    state = {"n": 0}

    def on_for(loop, mutator):
        nest = _nest(loop)
        if nest is not None:
            new = _rewrite(*nest)
            if new is not None:
                state["n"] += 1
                return new
        return mutator.default_mutate(loop)

    new = tvm_ffi.structural_mutate(func, [(tirx.For, on_for)])
    return new, state["n"]


@contextlib.contextmanager
def skipped_rewrites(notes: list):
    """Within the block (one build, in this thread), each function the pass compiles without its
    rewrite is one line in NOTES: which, why, and what it costs."""
    before = getattr(_NOTES, "notes", None)
    _NOTES.notes = notes
    try:
        yield notes
    finally:
        _NOTES.notes = before


def _skipped(func, e):
    attrs = func.attrs
    name = str(attrs["global_symbol"]) if attrs is not None and "global_symbol" in attrs else "a kernel"
    msg = (f"byte counters skipped in {name} ({type(e).__name__}: {first_line(e)}): compiled without the "
           "rewrite, same results, its popcounts slower")
    notes = getattr(_NOTES, "notes", None)
    if notes is not None:
        notes.append(msg)
    else:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def byte_counters_pass():
    """The pass over every PrimFunc of a module. The rewrite only makes code faster: a function
    it cannot take apart as it expects is compiled as it was (never a failed build), and that is
    noted (:func:`skipped_rewrites`)."""
    from tvm import tirx

    def _run(func, _mod, _ctx):
        try:
            return byte_counters(func)[0]
        except Exception as e:  # noqa: BLE001 - an optimization: the function as it came is correct; noted
            _skipped(func, e)
            return func

    return tirx.transform.prim_func_pass(_run, opt_level=0, name="BdpByteCounters")
