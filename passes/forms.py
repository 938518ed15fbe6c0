"""Binarized forms in the wild, and the float glue after a binary conv.

* ``qonnx-to-standard``: QONNX ``BipolarQuant(X, scale)`` (domain ``qonnx.custom_op.general``,
  what Brevitas exports) is ``where(X >= 0, 1, -1) * scale``; it is rewritten to those standard
  ops so that weights fold to constants and activations match the binary-conv pattern.
* ``fold-binary-glue``: per-channel ``Mul`` / ``Div`` / ``Add`` / ``Sub`` by constants and an
  inference ``BatchNormalization`` that follow a ``bdp.BinaryConv`` (its only consumer) fold
  into the op's per-channel ``scale`` and ``bias`` (``y*c = (scale*c)*D + bias*c``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .binarizers import QONNX_DOMAINS
from .core import register_pass
from .graph import const_value, fold_bn, from_gs, per_channel, to_gs
from .ops import BINARY_CONV, DOMAIN


class _Emitter:
    """Standard ONNX nodes for one QONNX node N, named after it."""

    def __init__(self, graph, n):
        self.graph, self.n, self.k = graph, n, 0

    def const(self, v):
        self.k += 1
        return gs.Constant(f"{self.n.name}_c{self.k}", np.asarray(v, np.float32))

    def op(self, op, *inputs, out=None, **attrs):
        self.k += 1
        y = out if out is not None else gs.Variable(f"{self.n.name}_{op.lower()}{self.k}", dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, f"{self.n.name}_{op.lower()}{self.k}", attrs=attrs,
                                        inputs=list(inputs), outputs=[y]))
        return y

    def round(self, x, mode):
        """QONNX rounding modes: ROUND (half to even), CEIL, FLOOR, UP / DOWN (away from / toward
        zero), HALF_UP / HALF_DOWN (halves away from / toward zero)."""
        mode = mode.upper()
        if mode in ("ROUND", "HALF_EVEN"):
            return self.op("Round", x)
        if mode in ("CEIL", "FLOOR"):
            return self.op(mode.capitalize(), x)
        sign, mag = self.op("Sign", x), self.op("Abs", x)
        if mode in ("UP", "DOWN"):
            r = self.op("Ceil" if mode == "UP" else "Floor", mag)
        elif mode in ("HALF_UP", "HALF_DOWN"):
            r = self.op("Floor", self.op("Add", mag, self.const(0.5))) if mode == "HALF_UP" else \
                self.op("Ceil", self.op("Sub", mag, self.const(0.5)))
        else:
            return None
        return self.op("Mul", sign, r)


def _int_range(signed, narrow, bits):
    if signed:
        return -(2.0 ** (bits - 1)) + (1 if narrow else 0), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - (2 if narrow else 1)


def _quant(e, n):
    """QONNX (Int)Quant(x, scale, zeropt, bitwidth): clamp(x / scale + zeropt) rounded, minus
    zeropt, times scale; None when a parameter is not constant."""
    x, scale, zp, bw = n.inputs[:4]
    bits = const_value(bw)
    if bits is None or const_value(scale) is None or const_value(zp) is None:
        return None
    lo, hi = _int_range(int(n.attrs.get("signed", 1)), int(n.attrs.get("narrow", 0)), float(np.asarray(bits).reshape(-1)[0]))
    y = e.op("Add", e.op("Div", x, scale), zp)
    y = e.op("Min", e.op("Max", y, e.const(lo)), e.const(hi))
    r = e.round(y, _mode(n, "ROUND"))
    return None if r is None else e.op("Mul", e.op("Sub", r, zp), scale, out=n.outputs[0])


def _trunc(e, n):
    """QONNX Trunc: with 5 inputs (x, scale, zeropt, in_bits, out_bits; version 1) or 6-7 (x,
    scale, zeropt, in_bits, out_scale, [out_zeropt], out_bits; version 2), as QONNX defines it."""
    ins = n.inputs
    if any(const_value(t) is None for t in ins[1:]):
        return None
    x, scale, zp = ins[:3]
    y = e.op("Round", e.op("Add", e.op("Div", x, scale), zp))
    mode = _mode(n, "FLOOR")
    if len(ins) == 5:
        shift = float(np.asarray(const_value(ins[3])).reshape(-1)[0]) - float(np.asarray(const_value(ins[4])).reshape(-1)[0])
        y = e.round(e.op("Div", y, e.const(2.0 ** shift)), mode)
        return None if y is None else e.op("Mul", e.op("Sub", y, zp), scale, out=n.outputs[0])
    if len(ins) not in (6, 7):
        return None
    sc, out_sc = np.asarray(const_value(scale), np.float64), np.asarray(const_value(ins[4]), np.float64)
    trunc_scale = (2.0 ** np.round(np.log2(out_sc / sc))).astype(np.float32)
    lo, hi = _int_range(int(n.attrs.get("signed", 1)), int(n.attrs.get("narrow", 0)),
                        float(np.asarray(const_value(ins[-1])).reshape(-1)[0]))
    y = e.op("Div", y, e.const(trunc_scale))
    y = e.round(e.op("Min", e.op("Max", y, e.const(lo)), e.const(hi)), mode)
    if y is None:
        return None
    out_zp = e.const(np.asarray(const_value(zp), np.float32) / trunc_scale)
    return e.op("Mul", e.op("Sub", y, out_zp), ins[4], out=n.outputs[0])


def _mode(n, default):
    m = n.attrs.get("rounding_mode", default)
    return m.decode() if isinstance(m, bytes) else str(m)


@register_pass("qonnx-to-standard", "QONNX BipolarQuant, (Int)Quant and Trunc -> their QONNX definitions in standard "
                                    "ops (a bipolar quantizer is then a binarizer)")
def qonnx_to_standard(model, report):
    """QONNX ops become the standard ops of their definition, so weights fold to constants, a
    bipolar activation quantizer matches the binary-conv pattern, and an 8-bit input quantizer (a
    Brevitas CNV's) runs in float, exactly as QONNX computes it."""
    graph = to_gs(model)
    for n in [n for n in graph.nodes if n.domain in QONNX_DOMAINS + ("",) and n.op == "BipolarQuant"]:
        x, scale = n.inputs[0], n.inputs[1]
        y = n.outputs[0]
        zero = gs.Constant(n.name + "_zero", np.array(0.0, np.float32))
        one = gs.Constant(n.name + "_one", np.array(1.0, np.float32))
        mone = gs.Constant(n.name + "_mone", np.array(-1.0, np.float32))
        ge = gs.Variable(n.name + "_ge", dtype=np.bool_)
        sg = gs.Variable(n.name + "_sign", dtype=np.float32)
        graph.nodes.append(gs.Node("GreaterOrEqual", n.name + "_ge", inputs=[x, zero], outputs=[ge]))
        graph.nodes.append(gs.Node("Where", n.name + "_where", inputs=[ge, one, mone], outputs=[sg]))
        graph.nodes.append(gs.Node("Mul", n.name, inputs=[sg, scale], outputs=[y]))
        n.inputs, n.outputs = [], []
        report.notes.append(f"{n.name}: QONNX BipolarQuant rewritten to standard ops")
    for n in [n for n in graph.nodes if n.domain in QONNX_DOMAINS and n.op in ("Quant", "IntQuant", "Trunc")]:
        e = _Emitter(graph, n)
        before = len(graph.nodes)
        y = _quant(e, n) if n.op != "Trunc" else _trunc(e, n)
        if y is None:  # a parameter that is not constant, or an unknown rounding mode
            for m in graph.nodes[before:]:
                m.inputs, m.outputs = [], []
            del graph.nodes[before:]
            continue  # left as is: check_supported names it
        n.inputs, n.outputs = [], []
        report.notes.append(f"{n.name}: QONNX {n.op} rewritten to standard ops (runs in float)")
    graph.cleanup()
    out = from_gs(graph, model)
    keep = [o for o in out.opset_import if o.domain not in QONNX_DOMAINS]
    if not any(n.domain in QONNX_DOMAINS for n in out.graph.node):
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


@register_pass("fold-binary-glue", "fold per-channel Mul/Div/Add/Sub and BatchNorm after bdp.BinaryConv into its scale and bias")
def fold_binary_glue(model, report):
    graph = to_gs(model)
    outputs = {t.name for t in graph.outputs}
    changed = True
    while changed:
        changed = False
        for bc in [n for n in graph.nodes if n.op == BINARY_CONV and n.domain == DOMAIN]:
            y = bc.outputs[0] if bc.outputs else None
            if y is None or y.name in outputs or len(y.outputs) != 1:
                continue
            nxt = y.outputs[0]
            scale = np.asarray(bc.inputs[2].values, np.float32).copy()
            bias = np.asarray(bc.inputs[3].values, np.float32).copy()
            m = scale.size
            if nxt.op in ("Mul", "Div", "Add", "Sub") and len(nxt.inputs) == 2:
                other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
                c = per_channel(const_value(other), m)
                if c is None:
                    continue
                if nxt.op == "Mul":
                    scale, bias = scale * c, bias * c
                elif nxt.op == "Div" and nxt.inputs[0] is y and np.all(c != 0):
                    scale, bias = scale / c, bias / c
                elif nxt.op == "Add":
                    bias = bias + c
                elif nxt.op == "Sub":
                    if nxt.inputs[0] is y:
                        bias = bias - c
                    else:  # c - y
                        scale, bias = -scale, c - bias
                else:
                    continue
            elif fold_bn(nxt) is not None:
                s, shift = fold_bn(nxt)
                scale = (scale * s).astype(np.float32)
                bias = shift(bias).astype(np.float32)
            else:
                continue
            bc.inputs[2] = gs.Constant(bc.name + f"_scale_{nxt.name}", scale.astype(np.float32))
            bc.inputs[3] = gs.Constant(bc.name + f"_bias_{nxt.name}", bias.astype(np.float32))
            bc.outputs = [nxt.outputs[0]]
            nxt.inputs, nxt.outputs = [], []
            report.fuse("fold-binary-glue", bc.name, f"{nxt.op} {nxt.name} folded into scale/bias")
            changed = True
        if changed:
            graph.cleanup()
    return from_gs(graph, model)
