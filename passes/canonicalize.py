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
