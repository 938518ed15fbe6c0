"""The Relax pipeline bdp builds with, and the pass that schedules every PrimFunc of a module
for a target: bdp kernels (with their fused epilogues), pack functions, float operators."""

from __future__ import annotations

from ..fastmath import rewrite_exp
from ..kernels import BDP_KERNEL_ATTR
from ..options import DEFAULT
from .binary_cpu import is_pack_function, schedule_binary_cpu, schedule_pack_cpu
from .binary_cuda import schedule_binary_cuda
from .float_cpu import schedule_float_cpu
from .legalize import legalize_conv2d, legalize_conv2d_transpose, legalize_softmax
from .relayout import call_tir_sites, constant_args, rewrite_constant_args
from .tir_util import SCHEDULE_ERRORS

def bdp_kernel_params(func):
    """The BinaryConvParams of the bdp kernel inside PrimFunc FUNC (alone, or with the elementwise
    ops Relax fused into it), or None for a function without one."""
    from tvm import s_tir

    from ..kernels import BinaryConvParams

    if func.attrs is not None and "bdp.params" in func.attrs:
        return BinaryConvParams.from_json(str(func.attrs["bdp.params"]))
    sch = s_tir.Schedule(func)
    try:
        ann = sch.get(sch.get_sblock("bdp_popcount")).annotations
    except SCHEDULE_ERRORS:
        return None
    return BinaryConvParams.from_json(str(ann["bdp.params"])) if "bdp.params" in ann else None


def fuses_epilogues(spec, options=DEFAULT) -> bool:
    """True where bdp kernels are scheduled inside bdp's Relax pipeline, after FuseOps has fused
    their elementwise consumers into them (CPU targets); elsewhere (GPUs, or the option
    ``float_schedule=false``) they are scheduled alone beforehand by :func:`schedule_module`."""
    return spec.fuses_epilogues and options.float_schedule


def schedule_binary_conv(func, spec, p=None, options=DEFAULT):
    """The scheduled PrimFunc of one ``bdp_binary_conv`` kernel (with any elementwise ops fused
    into it) for SPEC."""
    p = p or bdp_kernel_params(func)
    if spec.kind == "gpu":
        return schedule_binary_cuda(func, p, spec)
    return schedule_binary_cpu(func, p, spec, options)


def schedule_module(mod, spec, options=DEFAULT):
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
        new = schedule_binary_conv(func, spec, options=options)
        # scheduled alone: opaque to FuseOps from here on
        new = new.with_attr("tir.is_scheduled", True).with_attr("op_pattern", 8)
        out[gv] = new
    return out


def float_schedule_pass(spec, options=DEFAULT):
    """A module pass scheduling every unscheduled PrimFunc for a CPU SPEC (after FuseTIR)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="BdpScheduleFloatCPU")
    def _pass(mod, _ctx):
        sites = call_tir_sites(mod)
        out = tvm.IRModule(mod.functions, attrs=mod.attrs) if mod.attrs is not None else tvm.IRModule(mod.functions)
        relayouts = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if func.attrs is not None and "tir.is_scheduled" in func.attrs and bool(func.attrs["tir.is_scheduled"]):
                continue
            func = rewrite_exp(func, options.fast_exp)  # vector exp / sigmoid instead of one expf call per lane
            p = bdp_kernel_params(func)
            if p is not None:  # a bdp kernel, with its fused epilogue
                out[gv] = schedule_binary_conv(func, spec, p, options).with_attr("tir.is_scheduled", True)
                continue
            if is_pack_function(func):  # a pack stage apart, with its fused producers
                out[gv] = schedule_pack_cpu(func, spec).with_attr("tir.is_scheduled", True)
                continue
            calls = sites.get(gv.name_hint, [])
            consts = constant_args(calls) if calls else set()
            new, rel = schedule_float_cpu(func, spec, consts, debug=options.schedule_debug)
            if new is not None:
                out[gv] = new.with_attr("tir.is_scheduled", True)
                if rel:
                    relayouts[gv.name_hint] = rel
        if relayouts:
            out = rewrite_constant_args(out, relayouts)
        return out

    return _pass


def relax_pipeline(spec, target, options=DEFAULT):
    """The Relax pipeline bdp builds with: TVM's default, plus the float CPU schedules (and a
    cheaper legalization of non-overlapping conv2d_transpose) for CPU targets."""
    import tvm
    from tvm import relax

    if not fuses_epilogues(spec, options):
        return relax.pipeline.get_default_pipeline(target)
    from tvm.relax.backend.cpu_generic import pipeline as cg

    legalize = [relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d_transpose": legalize_conv2d_transpose,
                                                                    "relax.nn.conv2d": legalize_conv2d(spec),
                                                                    "relax.nn.softmax": legalize_softmax}),
                relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
                relax.transform.FuseTIR()]

    @tvm.transform.module_pass(opt_level=0, name="BdpCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cg.library_dispatch_passes(target) + legalize + [float_schedule_pass(spec, options)]
                + cg.dataflow_lower_passes(target) + cg.finalize_passes(target))
            return seq(mod)

    return _pipeline
