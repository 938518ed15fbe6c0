"""Data layouts the float schedules ask for: phase-split copies for strided reads, a dimension
moved innermost (at compile time for constant operands, whose Relax call sites then get
permuted constants; by a copy at run time for the others)."""

from __future__ import annotations

from .tir_util import SCHEDULE_ERRORS, iter_kinds, loops_extent, vars_in

PHASE_SPLIT_MIN_REUSE = 4  # reads per input element that pay for a phase-split copy of its own


def phase_split_strided_reads(sch, block, x_var, reuse=None):
    """Give reads that step by S > 1 along X (strided convs, pooling) a phase-split layout.

    The buffer (a padding stage in this function, or a copy made with ``cache_read``) is stored
    as ``[..., w % S, w // S]``, so consecutive output columns read consecutive elements and the
    vectorized loads stay contiguous.
    """
    from tvm.sym import detect_linear_equation

    stmt = sch.get(block)
    for i, r in enumerate(stmt.reads):
        idx = r.region[-1].min
        if x_var not in vars_in(idx):
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
            sch.transform_layout(pblk, ("write", 0), phase_split_map(stride, len(buf.shape)))
            try:
                # iterate the copy in its new layout: contiguous (vector) writes, strided reads,
                # instead of a scatter of every vector it writes
                sch.transform_block_layout(pblk, phase_split_map(stride, len(sch.get_loops(pblk))))
            except SCHEDULE_ERRORS:
                pass
        except (TypeError, *SCHEDULE_ERRORS):  # a shape that is not static, or a layout TVM refuses
            continue
        stmt = sch.get(block)


def feeds_light_reduction(sch, block):
    """BLOCK (a padding stage) is read only by reductions that read each input element fewer
    than ``PHASE_SPLIT_MIN_REUSE`` times (pooling): its copy costs more than the bounds checks
    it saves."""
    cons = sch.get_consumers(block)
    if not cons:
        return False
    for c in cons:
        stmt = sch.get(c)
        if "R" not in iter_kinds(stmt):
            return False
        macs = loops_extent(sch, sch.get_loops(c))
        reuse = reads_per_input(sch, stmt, macs)
        if reuse is None or reuse >= PHASE_SPLIT_MIN_REUSE:
            return False
    return True


def reads_per_input(sch, stmt, macs):
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


def phase_split_map(stride, nd):
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *ax: (*ax[:-1], ax[-1] % stride, ax[-1] // stride), ndim=nd)


def move_dim_last(d, nd):
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *ax: (*ax[:d], *ax[d + 1:], ax[d]), ndim=nd)


def block_dim_map(d, nd, b, order=None):
    """Dimension D (of ND) cut into blocks of B: the block index first, the other dimensions
    (in ORDER, original dimension numbers; default: as they are), the offset in the block last
    (``[M, C, KH, KW]`` -> ``[M/B, KH, KW, C, B]`` for D = 0, ORDER = (2, 3, 1)): a tile of B
    consecutive indices reads one stream, in the order of ORDER."""
    from tvm.tirx import IndexMap

    order = _rest_order(d, nd, order)
    return IndexMap.from_func(lambda *ax: (ax[d] // b, *(ax[i] for i in order), ax[d] % b), ndim=nd)


def _rest_order(d, nd, order):
    return tuple(order) if order is not None else tuple(i for i in range(nd) if i != d)


def relayout_array(data, d, block=None, order=None):
    """Numpy DATA in the layout :func:`move_dim_last` (BLOCK None) or :func:`block_dim_map` make."""
    import numpy as np

    if block is None:
        return np.ascontiguousarray(np.moveaxis(data, d, -1))
    nd = data.ndim
    shape = list(data.shape)
    split = data.reshape(shape[:d] + [shape[d] // block, block] + shape[d + 1:])
    # axes of SPLIT: original i < d -> i, d -> (d, d + 1), i > d -> i + 1
    ax = {i: (i if i < d else i + 1) for i in range(nd) if i != d}
    perm = [d] + [ax[i] for i in _rest_order(d, nd, order)] + [d + 1]
    return np.ascontiguousarray(split.transpose(perm))


def relayout_shape(shape, d, block=None, order=None):
    shape = list(shape)
    if block is None:
        return shape[:d] + shape[d + 1:] + [shape[d]]
    return [shape[d] // block] + [shape[i] for i in _rest_order(d, len(shape), order)] + [block]


def relayout_plan(stmt, u_var):
    """[(read index, buffer, dim, ndim)] of the reads indexed by U_VAR, or None when one of them
    uses it other than as ``u (+ unit-extent reduction iters)`` in a single dimension."""
    unit = {iv.var for iv in stmt.iter_vars if iv.iter_type == 2 and int(iv.dom.extent) == 1}
    plan = []
    for i, r in enumerate(stmt.reads):
        dims = [d for d, rg in enumerate(r.region) if u_var in vars_in(rg.min)]
        if not dims:
            continue
        if len(dims) != 1:
            return None
        idx = r.region[dims[0]].min
        if vars_in(idx) - unit != {u_var}:
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


def relayout_copied(sch, block, u_var, ctx):
    """Elements copied at run time to put U_VAR's dimension innermost (None: not possible)."""
    plan = relayout_plan(sch.get(block), u_var)
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


def relayout_innermost(sch, block, u_var, ctx):
    """Move the dimension that U_VAR indexes to the end of every read that depends on it.

    A parameter that is a constant at every call site (weights) is re-laid out at compile time:
    the PrimFunc's parameter changes layout and ``ctx["relayouts"]`` records it for the Relax
    call sites (``pidx -> (dim, ndim, None, None)``). Any other read gets a copy (``cache_read``, or its producer in this function)
    stored with that dimension innermost. Either way a vector over U is one contiguous load.
    """
    plan = relayout_plan(sch.get(block), u_var)
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
            sch.transform_layout(block, ("read", idx), move_dim_last(d, nd))
            ctx["relayouts"][pidx] = (d, nd, None, None)
            continue
        prod = [p for p in sch.get_producers(block) if any(w.source.same_as(buf) for w in sch.get(p).writes)]
        pblk = prod[0] if prod else sch.cache_read(block, idx, "global")
        sch.transform_layout(pblk, ("write", 0), move_dim_last(d, nd))
    return True


def call_tir_sites(mod):
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


def constant_args(calls):
    """Argument indices that are constants at every call site."""
    import tvm

    out = None
    for c in calls:
        args = c.args[1].fields if hasattr(c.args[1], "fields") else []
        idx = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.GenericConst)}
        out = idx if out is None else out & idx
    return out or set()


def rewrite_constant_args(mod, relayouts):
    """Re-lay out the constant arguments of the call_tir sites named in RELAYOUTS (PrimFunc name
    -> {argument index: (dim, ndim, block, order)}: :func:`relayout_array`).

    The PrimFuncs' parameter types changed, so they get new GlobalVars (same names) carrying
    the new types, and the call sites are rebuilt with them and the permuted constants.
    """
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
        for i, (d, _, blk, order) in plan.items():
            old = params[i]
            shape = relayout_shape([int(v) for v in old.shape.values], d, blk, order)
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
        for i, (d, _, blk, order) in relayouts[name].items():
            fields[i] = relax.const(relayout_array(fields[i].value.numpy(), d, blk, order))
        return tvm.ir.Call(c.op, [new_gvs[name], relax.Tuple(fields), *c.args[2:]], c.attrs, list(c.ty_args),
                           c.span, ret_ty=c.ty)

    funcs = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            funcs[gv] = tvm_ffi.structural_map(f, (tvm.ir.Call, fix), order="post")
        else:
            funcs[new_gvs.get(gv.name_hint, gv)] = f
    return tvm.IRModule(funcs, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(funcs)
