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


@register_pass("qonnx-to-standard", "QONNX BipolarQuant(X, scale) -> Where(X >= 0, 1, -1) * scale (standard ops)")
def qonnx_to_standard(model, report):
    graph = to_gs(model)
    for n in [n for n in graph.nodes if n.op == "BipolarQuant" and n.domain in QONNX_DOMAINS + ("",)]:
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
