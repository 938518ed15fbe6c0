"""Canonicalisation: name every node, infer shapes, fold constants, fold BatchNorm into Conv.

After these passes the weights of a binary conv are one constant tensor whatever way the source
computed them (``alpha * sign(W)`` in the graph, stored signs times scales, BN folded or not),
which is the form the binary-conv pass matches.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .core import register_pass
from .graph import const_value, fold_bn, from_gs, to_gs


@register_pass("name-nodes", "give every node a unique name (reports and errors name nodes)")
def name_nodes(model, report):
    seen = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)
    return model


@register_pass("fold-constants", "constant-fold subgraphs that depend only on initializers (onnx-graphsurgeon)")
def fold_constants(model, report):
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR  # its size advice is noise here: weights must fold whatever their size
    graph = to_gs(model)
    graph.fold_constants(error_ok=True, fold_shapes=True, size_threshold=None)
    return from_gs(graph, model)


@register_pass("infer-shapes", "ONNX shape inference (value_info for every tensor it can type)")
def infer_shapes(model, report):
    from .ops import attach_functions

    try:
        return onnx.shape_inference.infer_shapes(attach_functions(model), data_prop=True)
    except Exception as e:  # shape inference is advisory: a model it cannot type still compiles
        report.notes.append(f"shape inference skipped: {str(e).splitlines()[0][:200]}")
        return model


@register_pass("fold-batchnorm", "fold inference BatchNormalization into the Conv before it")
def fold_batchnorm(model, report):
    graph = to_gs(model)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Conv" or len(x.outputs) != 1 or len(bn.outputs) != 1:
            continue
        conv = x.inputs[0]
        w = const_value(conv.inputs[1])
        folded = fold_bn(bn)
        if w is None or folded is None:
            continue
        s, shift = folded
        b = const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        # W' = W * s per output channel. Multiply in float32 so that a channel of equal |W|
        # stays a channel of equal |W'| (every element sees the same product).
        w_new = (w.astype(np.float32) * s.astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b_new = shift(b).astype(np.float32)
        conv.inputs[1] = gs.Constant(conv.name + "_W_bn", w_new)
        if len(conv.inputs) > 2:
            conv.inputs[2] = gs.Constant(conv.name + "_B_bn", b_new)
        else:
            conv.inputs.append(gs.Constant(conv.name + "_B_bn", b_new))
        out = bn.outputs[0]
        conv.outputs = [out]
        bn.outputs = []
        bn.inputs = []
        report.notes.append(f"folded {bn.name} into {conv.name}")
    return from_gs(graph, model)


@register_pass("batchnorm-to-affine", "an inference BatchNormalization left in the graph (after a ReLU, a shortcut "
                                      "add) -> Mul + Add by per-channel constants: no divide or sqrt at run time")
def batchnorm_to_affine(model, report):
    """``BN(x) = (x - mean) / sqrt(var + eps) * gamma + beta`` becomes ``x * s + t`` with
    ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` computed once here (float64, then
    float32), as onnxruntime fuses it: the compiled kernel multiplies and adds per element
    instead of a divide (and TVM's legalized sqrt) per element. Equal to float round-off."""
    from .shapes import _static_shapes

    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model
    graph = to_gs(model)
    shapes = _static_shapes(model)
    count = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and len(n.outputs) == 1]:
        folded = fold_bn(bn)
        x = bn.inputs[0]
        shape = shapes.get(x.name) or getattr(x, "shape", None)
        rank = len(shape) if shape is not None else None
        if folded is None or rank is None or rank < 2:
            continue
        s, shift = folded
        t = shift(np.zeros_like(s))
        bshape = (-1,) + (1,) * (rank - 2)
        y = bn.outputs[0]
        mid = gs.Variable(bn.name + "_scaled", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", name=bn.name + "_mul", inputs=[x, gs.Constant(
            bn.name + "_s", s.astype(np.float32).reshape(bshape))], outputs=[mid]))
        graph.nodes.append(gs.Node("Add", name=bn.name + "_add", inputs=[mid, gs.Constant(
            bn.name + "_t", t.astype(np.float32).reshape(bshape))], outputs=[y]))
        bn.inputs, bn.outputs = [], []
        count += 1
    if count:
        report.notes.append(f"batchnorm-to-affine: {count} BatchNormalization(s) as a per-channel multiply-add")
    return from_gs(graph, model)
