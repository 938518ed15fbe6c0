"""Lower an ONNX graph (standard ops + ``bdp`` ops) to a TVM Relax module and build it.

The standard ops go through TVM's Relax ONNX frontend. That frontend has no hook for custom
domains, so while importing, bdp adds its own converters to the frontend's op table (restored
afterwards; the patch and why: :mod:`bdp.targets.tvm_patches`): each ``bdp.BinaryConv``
becomes a ``call_tir`` of the packed-bit TE kernel in :mod:`bdp.targets.kernels`, with its
weights re-packed into the kernel's layout at compile time.
Kernels are then scheduled per target (:mod:`bdp.targets.schedules`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from bdp.errors import InputError, UnsupportedOpError

from .kernels import BDP_KERNEL_ATTR
from .options import DEFAULT, CompileOptions


def _const(expr, what):
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        raise InputError(f"{what} must be a constant (initializer)")
    return expr.value.numpy()


def _static_shape(expr, what):
    try:
        return [int(s) for s in expr.ty.shape]
    except (TypeError, ValueError, AttributeError):
        raise InputError(f"{what} has a dynamic shape; pass --input-shape N,C,H,W") from None


PACK_APART_PRODUCERS = ("Concat", "Resize")


@dataclass
class LoweringPlan:
    """How the ``bdp`` ops of one model are lowered, decided on the ONNX graph before import.

    ``links``: binary conv name -> (in_channels if its X arrives as packed bits else 0,
    out_mode), see :func:`plan_links`; ``pack_apart``: binary convs whose pack stage is a
    function of its own (:func:`pack_apart`)."""

    links: dict = field(default_factory=dict)
    pack_apart: set = field(default_factory=set)
    spec: object = None  # the TargetSpec (None: target-independent word sizes)
    options: CompileOptions = DEFAULT

    @classmethod
    def of(cls, model: onnx.ModelProto, spec=None, options=DEFAULT) -> "LoweringPlan":
        from .schedules import fuses_epilogues

        apart = set()
        if spec is not None and fuses_epilogues(spec, options) and options.pack_apart:
            apart = pack_apart(model)
        return cls(plan_links(model), apart, spec, options)


def plan_links(model: onnx.ModelProto) -> dict:
    """How each ``bdp.BinaryConv`` is lowered: ``name -> (in_channels, out_mode)``.

    ``out_mode`` is "float" (``out_sign=0``), "sign" (±1 floats: the output has float consumers
    or is a graph output) or "bits" (every consumer is a binary conv reading it as X: the kernel
    writes packed bits and those consumers read them, ``in_channels`` > 0, with no pack stage from
    float).
    """
    from bdp.passes.links import packed_links
    from bdp.passes.ops import BINARY_CONV, DOMAIN

    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    plan = {n.name: [0, "float"] for n in model.graph.node if n.op_type == BINARY_CONV and n.domain == DOMAIN}
    for name, users in packed_links(model).items():
        plan[name][1] = "sign" if users is None else "bits"
        for c in users or ():
            plan[c][0] = int(inits[nodes[name].input[1]][0])
    return {k: tuple(v) for k, v in plan.items()}


def pack_apart(model: onnx.ModelProto) -> set:
    """Names of the ``bdp.BinaryConv`` nodes whose pack stage becomes a Relax function of its own
    (:func:`bdp.targets.kernels.pack_te`, op pattern injective) instead of a stage of the kernel:
    those whose float input X is made by a concatenation or a resize and read by nothing else.
    Relax's FuseOps then fuses the resizes and the concatenation into the pack (it fuses no
    producer into a kernel), so the float tensor they make is never written to memory: only its
    bits. Ungrouped convs only."""
    from bdp.passes.ops import BINARY_CONV, DOMAIN, binary_conv_attrs

    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in model.graph.output}
    out = set()
    for n in model.graph.node:
        if n.op_type != BINARY_CONV or n.domain != DOMAIN:
            continue
        src = producer.get(n.input[0])
        if (binary_conv_attrs(n)["group"] == 1 and src is not None and src.op_type in PACK_APART_PRODUCERS
                and readers.get(n.input[0]) == 1 and n.input[0] not in outputs):
            out.add(n.name)
    return out


def _binary_conv_converter(plan: LoweringPlan):
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from bdp.passes.ops import sign_thresholds

    from .kernels import BinaryConvParams, binary_conv_te, pack_te, pack_weights, popcount_thresholds

    class BinaryConvConverter(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            name = attr["tvm_custom"]["name"]
            in_channels, out_mode = plan.links.get(name, (0, "float"))
            x, wbits, scale, bias = inputs[:4]
            n, c, h, w = _static_shape(x, f"input of {name}")
            if in_channels:
                c = in_channels  # X is packed bits [N, ceil(C/8), H, W]
            wb = _const(wbits, f"{name}: Wbits")
            sc = _const(scale, f"{name}: scale").astype(np.float32)
            bi = _const(bias, f"{name}: bias").astype(np.float32)
            kh, kw = (int(k) for k in attr["kernel_shape"])
            if int(attr.get("out_sign", 0)) == 0:
                out_mode = "float"
            p = BinaryConvParams(
                n=n, c=c, h=h, w=w, m=int(wb.shape[0]), kh=kh, kw=kw,
                strides=tuple(int(s) for s in attr.get("strides", (1, 1))),
                dilations=tuple(int(d) for d in attr.get("dilations", (1, 1))),
                pads=tuple(int(q) for q in attr.get("pads", (0, 0, 0, 0))),
                group=int(attr.get("group", 1)),
                act_threshold=float(attr.get("act_threshold", 0.0)),
                pad_value=float(attr.get("pad_value", 0.0)),
                in_packed=bool(in_channels),
                out_mode=out_mode,
            )
            if c % p.group or p.m % p.group:
                raise InputError(f"{name}: channels {c} -> {p.m} not divisible by group {p.group}")
            if plan.spec is not None and plan.spec.kind == "cpu":
                from .schedules import binary_word

                p = dataclasses.replace(p, word_bits=binary_word(p, plan.spec, plan.options))
            if name in plan.pack_apart and not in_channels:
                pp = p
                x = bb.emit_te(lambda X: pack_te(X, pp), x, primfunc_name_hint="bdp_pack",
                               primfunc_attrs={BDP_KERNEL_ATTR: "pack", "op_pattern": 2})
                p = dataclasses.replace(p, in_words=True)
            wp, dt = pack_weights(wb, p)
            # float / ±1 outputs: kOutEWiseFusable (4), so Relax fuses elementwise consumers (ReLU,
            # PReLU, shortcut adds, gate products) into the kernel's epilogue; packed bits: opaque
            fn_attrs = {BDP_KERNEL_ATTR: "binary_conv", "op_pattern": 8 if out_mode == "bits" else 4,
                        "bdp.params": p.to_json()}
            args = [x, relax.const(wp), relax.const(sc), relax.const(bi)]
            if dt is not None:
                args.append(relax.const(dt))
            if out_mode != "float":
                flip, tt = sign_thresholds(sc, bi, float(attr.get("out_threshold", 0.0)), p.k)
                athr, inv = popcount_thresholds(flip, tt, dt, p)
                args += [relax.const(athr), relax.const(inv)]
            has_dt = dt is not None

            def te_fn(X, W, S, B, *rest):
                DT = rest[0] if has_dt else None
                thresholds = tuple(rest[1:] if has_dt else rest) or None
                return binary_conv_te(X, W, S, B, DT, p, thresholds)

            return bb.emit_te(te_fn, *args, primfunc_name_hint="bdp_binary_conv", primfunc_attrs=fn_attrs)

    return BinaryConvConverter


@contextlib.contextmanager
def bdp_frontend(plan: LoweringPlan):
    """Teach TVM's Relax ONNX frontend the ``bdp`` ops (lowered as PLAN says) for the duration of
    the block (TVM has no public way to add converters: :mod:`bdp.targets.tvm_patches`)."""
    from .resize import resize_converter
    from .tvm_patches import onnx_converters

    with onnx_converters({"BinaryConv": _binary_conv_converter(plan), "Resize": resize_converter()}):
        yield


def supported_ops() -> set:
    from .tvm_patches import onnx_convert_map

    return set(onnx_convert_map()) | {"BinaryConv", "Constant", "If"}


def check_supported(model: onnx.ModelProto):
    """Raise UnsupportedOpError naming the first node the compiler cannot handle."""
    from bdp.passes.ops import DOMAIN

    ok = supported_ops()
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type != "BinaryConv":
            raise UnsupportedOpError(node.name, f"{node.domain}.{node.op_type}", "this bdp op has no kernel yet")
        if node.domain not in ("", "ai.onnx", DOMAIN):
            raise UnsupportedOpError(node.name, f"{node.domain}.{node.op_type}",
                                     "custom domain; re-export with standard ONNX ops")
        if node.op_type not in ok:
            raise UnsupportedOpError(node.name, node.op_type, "TVM's ONNX frontend has no converter for it")


def import_onnx(model: onnx.ModelProto, input_shapes: dict, spec=None, options=DEFAULT):
    """Relax IRModule of MODEL (params folded in as constants). With SPEC, the module is made for
    that target: pack stages apart (:func:`pack_apart`) where its pipeline fuses them."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(model)
    with bdp_frontend(LoweringPlan.of(model, spec, options)):
        return from_onnx(model, shape_dict=input_shapes, keep_params_in_input=False)


def build(mod, spec, progress=None, options=DEFAULT, notes=None):
    """Schedule bdp kernels for SPEC and build; returns the TVM Executable. NOTES: a list (the
    compile report's notes) that gets one line for each optimization the build skipped, and why
    (without it, a warning says so)."""
    import tvm

    from .byte_counters import skipped_rewrites
    from .schedules import fuses_epilogues, relax_pipeline, schedule_module

    target = tvm.target.Target(spec.tvm)
    if not fuses_epilogues(spec, options):
        mod = schedule_module(mod, spec, options)  # else scheduled inside the pipeline, after fusion
    if progress:
        progress("tvm build")
    tir = "default"
    if spec.kind == "cpu" and options.stack_buffers:
        from .tir_pipeline import register

        tir = register(byte_counts=spec.schedules.byte_counters and options.byte_counters)
    with target, contextlib.ExitStack() as stack:
        if notes is not None:
            stack.enter_context(skipped_rewrites(notes))
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(spec, target, options), tir_pipeline=tir)
    return ex


def export_library(ex, path, spec):
    if spec.cross_cc:
        ex.export_library(path, cc=spec.cross_cc)
    else:
        ex.export_library(path)
