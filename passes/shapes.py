"""``fold-shapes``: ``Shape`` / ``Size`` of a tensor whose shape is static become constants.

Converters write a reshape's target from the runtime shape of its input when the framework
left a dimension open (tf2onnx for a Keras ``Reshape`` at 224x224: ``Shape -> Cast -> Slice ->
Concat -> Reshape``); nothing in the graph says what that shape is, so ``fold-constants``
cannot fold the chain and the compiler meets a Reshape with a computed target. ``bdp compile``
fixes the input shape before the passes; ONNX shape inference then knows every such shape, and
this pass writes it in: each ``Shape`` (with its ``start``/``end``) or ``Size`` of a tensor with
a fully known shape is replaced by its value, and ``fold-constants`` folds the rest. Exact: the
constant is what the node computes for that input shape.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .core import register_pass
from .graph import from_gs, to_gs


def _inferred(model):
    from .ops import attach_functions

    try:
        return onnx.shape_inference.infer_shapes(attach_functions(model), data_prop=True)
    except Exception:  # shape inference is advisory: without it nothing is folded
        return None


def elem_types(model) -> dict:
    """{tensor name: ONNX element type} of every tensor shape inference types."""
    inferred = _inferred(model)
    out = {t.name: t.data_type for t in model.graph.initializer}
    if inferred is None:
        return out
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = v.type.tensor_type.elem_type
    return out


def _static_shapes(model) -> dict:
    inferred = _inferred(model)
    if inferred is None:
        return {}
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[v.name] = [int(d.dim_value) for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    return out


@register_pass("fold-shapes", "Shape / Size of a tensor with a static shape -> a constant (then fold-constants "
                              "folds the dynamic reshape targets converters write)")
def fold_shapes(model, report):
    if not any(n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    shapes = _static_shapes(model)
    graph = to_gs(model)
    outs = {t.name for t in graph.outputs}
    done = 0
    for n in [n for n in graph.nodes if n.op in ("Shape", "Size") and (n.domain or "") in ("", "ai.onnx")]:
        s = shapes.get(n.inputs[0].name) if n.inputs else None
        y = n.outputs[0] if n.outputs else None
        if s is None or y is None or y.name in outs:
            continue
        if n.op == "Size":
            value = np.array(int(np.prod(s)), np.int64)
        else:
            r = len(s)
            start = int(n.attrs.get("start", 0))
            end = n.attrs.get("end")
            start = max(0, min(r, start + r if start < 0 else start))
            end = r if end is None else max(0, min(r, int(end) + r if int(end) < 0 else int(end)))
            value = np.array(s[start:end], np.int64)
        c = gs.Constant(f"{n.name}_static", value)
        for consumer in list(y.outputs):
            consumer.inputs = [c if t is y else t for t in consumer.inputs]
        n.inputs, n.outputs = [], []
        done += 1
    if not done:
        return model
    report.notes.append(f"fold-shapes: {done} Shape/Size node(s) of static shapes folded")
    graph.cleanup()
    return from_gs(graph, model)
