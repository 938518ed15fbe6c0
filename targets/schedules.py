"""Schedules for bdp's kernels, per target.

Each kernel PrimFunc carries the attribute ``bdp.kernel``; :func:`schedule_module` finds them
and applies the schedule for the target's architecture, then marks them ``tir.is_scheduled``
so that TVM's default scheduling leaves them alone.
"""

from __future__ import annotations

from .lower import BDP_KERNEL_ATTR


def _spatial_loops(sch, block):
    from tvm import s_tir  # noqa: F401

    loops = sch.get_loops(block)
    br = sch.get(block)
    kinds = [iv.iter_type for iv in br.iter_vars]
    # iter_type 0 = data parallel, 2 = reduction
    n_spatial = sum(1 for k in kinds if k == 0)
    return loops[:n_spatial], loops[n_spatial:]


def _cpu_schedule(func, spec):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("bdp_pack", "bdp_popcount", "bdp_corr", "bdp_binary_conv"):
        try:
            block = sch.get_sblock(name)
        except Exception:
            continue
        spatial, _ = _spatial_loops(sch, block)
        if len(spatial) >= 3:
            outer = sch.fuse(*spatial[:3])
        else:
            outer = sch.fuse(*spatial)
        sch.parallel(outer)
    return sch.mod["main"]


def _cuda_schedule(func, spec):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("bdp_pack", "bdp_popcount", "bdp_corr", "bdp_binary_conv"):
        try:
            block = sch.get_sblock(name)
        except Exception:
            continue
        spatial, _ = _spatial_loops(sch, block)
        fused = sch.fuse(*spatial)
        bx, tx = sch.split(fused, factors=[None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def schedule_module(mod, spec):
    import tvm

    out = tvm.IRModule(mod.functions, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(mod.functions)
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or BDP_KERNEL_ATTR not in func.attrs:
            continue
        if spec.arch == "cuda":
            new = _cuda_schedule(func, spec)
        else:
            new = _cpu_schedule(func, spec)
        new = new.with_attr("tir.is_scheduled", True)
        out[gv] = new
    return out
