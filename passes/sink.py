"""``sink-binarizers``: move a binarizer past the data movement between it and its conv.

A binarizer is elementwise, so it commutes with every op that only moves, copies or selects
values: ``D(b(x)) = b(D(x))`` for Transpose, Reshape, Flatten, Squeeze/Unsqueeze, Identity,
Slice, Gather with constant indices, Tile, Expand, DepthToSpace/SpaceToDepth, a nearest Resize
and a Pad in edge/reflect mode. A few more commute with care:

* ``MaxPool`` / ``GlobalMaxPool``: ``max(b(x)) = b(max(x))`` for an increasing binarizer (its
  padding never wins a max);
* a constant ``Pad`` whose value is ``+s`` or ``-s`` (``s`` the binarizer's scale): pad ``x`` with
  a value the binarizer maps to it (the threshold, or the float just below it); a zero Pad stays
  (the binary conv's own ``pad_value`` handles it when it is next to the conv);
* ``Concat`` of tensors binarized with the same scale: ``b(concat(x_i - t_i))`` at threshold 0
  (``x - t >= 0`` exactly when ``x >= t`` in IEEE arithmetic).

A binarizer is moved only where the moved data reaches a Conv, ConvTranspose, MatMul or Gemm
through such ops, so that ``fuse-binary-conv`` (and the MatMul / ConvTranspose rewrites) then find
it directly in front of the layer and pack it. The original binarizer stays for any other reader.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .binary_conv import own_pads
from .core import register_pass
from .graph import attr_str, const_value, from_gs, to_gs

MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather", "Tile", "Expand",
         "DepthToSpace", "SpaceToDepth"}
LAYERS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def _commutes(node: gs.Node, b: binarizers.Binarized) -> bool:
    """Does NODE, reading B's output as its data input 0, commute with B?"""
    op = node.op
    if op in MOVES:
        return op != "Gather" or const_value(node.inputs[1]) is not None
    if op in ("Resize", "Upsample"):
        return attr_str(node.attrs.get("mode"), "nearest") == "nearest"
    if op in ("MaxPool", "GlobalMaxPool"):
        return b.increasing and len(node.outputs) == 1
    if op == "Pad":
        mode = attr_str(node.attrs.get("mode"), "constant")
        if mode in ("edge", "reflect", "wrap"):
            return True
        y = node.outputs[0] if node.outputs else None
        if y is not None and y.outputs and all(
                c.op == "Conv" and c.inputs and c.inputs[0] is y and (p := own_pads(c)) is not None and not any(p)
                for c in y.outputs):
            return False  # sign -> Pad -> unpadded Conv: fuse-binary-conv folds the Pad into the packed conv
        v = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
        return v is not None and np.asarray(v).size == 1 and float(np.asarray(v).reshape(-1)[0]) in (b.scale, -b.scale)
    return False


def _reaches_layer(t: gs.Tensor, depth=16) -> bool:
    frontier = [t]
    for _ in range(depth):
        nxt = []
        for u in frontier:
            for c in u.outputs:
                if c.op in LAYERS and c.inputs and c.inputs[0] is u:
                    return True
                if (c.op in MOVES or c.op in ("Resize", "Upsample", "MaxPool", "GlobalMaxPool", "Pad", "Concat")) \
                        and c.outputs:
                    nxt.append(c.outputs[0])
        frontier = nxt
    return False


def _preimage(b: binarizers.Binarized, v: float) -> float:
    """A float the binarizer maps to V (= +scale or -scale) exactly, ONNX ``Sign`` included."""
    plus = (v / b.scale) > 0  # the x >= threshold side
    t = np.float32(b.threshold)
    if plus:
        return float(np.nextafter(t, np.float32(np.inf))) if b.zero_is_zero else float(t)
    return float(np.nextafter(t, np.float32(-np.inf)))


def _sink_one(graph, node, b, k):
    """Rewrite NODE(b(x), ...) -> b(NODE(x, ...)); returns True."""
    y = node.outputs[0]
    inner = gs.Variable(f"{y.name}_prebin{k}", dtype=np.float32)
    ins = [b.src] + list(node.inputs[1:])
    if node.op == "Pad" and attr_str(node.attrs.get("mode"), "constant") == "constant":
        v = float(np.asarray(const_value(node.inputs[2])).reshape(-1)[0]) if len(node.inputs) > 2 and node.inputs[2].name \
            else 0.0
        ins[2:3] = [gs.Constant(f"{node.name}_value{k}", np.array(_preimage(b, v), np.float32))]
    graph.nodes.append(gs.Node(node.op, name=node.name, domain=node.domain, attrs=dict(node.attrs), inputs=ins,
                               outputs=[inner]))
    node.inputs, node.outputs = [], []
    binarizers.emit(graph, inner, b, f"{node.name}_bin{k}", out=y)
    return True


def _sink_concat(graph, node, k):
    """Concat of binarized tensors with one scale -> one binarizer after a Concat of the inputs
    shifted by their thresholds; True when done."""
    bs = [binarizers.match(t) for t in node.inputs]
    if not bs or any(b is None for b in bs) or len({b.scale for b in bs}) != 1:
        return False
    same = len({(b.threshold, b.zero_is_zero) for b in bs}) == 1
    srcs = []
    for i, b in enumerate(bs):
        if same or b.threshold == 0.0:
            srcs.append(b.src)
            continue
        shifted = gs.Variable(f"{node.name}_shift{k}_{i}", dtype=np.float32)
        graph.nodes.append(gs.Node("Sub", name=f"{node.name}_shift{k}_{i}",
                                   inputs=[b.src, gs.Constant(f"{node.name}_t{k}_{i}", np.array(b.threshold, np.float32))],
                                   outputs=[shifted]))
        srcs.append(shifted)
    y = node.outputs[0]
    inner = gs.Variable(f"{y.name}_prebin{k}", dtype=np.float32)
    graph.nodes.append(gs.Node("Concat", name=node.name, attrs=dict(node.attrs), inputs=srcs, outputs=[inner]))
    node.inputs, node.outputs = [], []
    form = bs[0].form if len({b.zero_is_zero for b in bs}) == 1 else binarizers.WHERE
    proto = bs[0] if same else binarizers.Binarized(None, 0.0, form, [], bs[0].scale)
    binarizers.emit(graph, inner, proto, f"{node.name}_bin{k}", out=y)
    return True


@register_pass("sink-binarizers", "move binarizers past data movement (Transpose, Reshape, Slice, nearest Resize, "
                                  "MaxPool, +/-1 Pad, Concat, ...) to the conv or matmul they feed")
def sink_binarizers(model, report):
    graph = to_gs(model)
    k = 0
    for _ in range(64):
        changed = False
        for node in list(graph.nodes):
            if not node.inputs or not node.outputs:
                continue
            if node.op == "Concat":
                if _reaches_layer(node.outputs[0]) and _sink_concat(graph, node, k):
                    report.fuse("sink-binarizers", node.name, "binarizers moved after the concatenation")
                    changed, k = True, k + 1
                continue
            x = node.inputs[0]
            if not isinstance(x, gs.Variable) or len(node.outputs) != 1:
                continue
            b = binarizers.match(x)
            if b is None or not _commutes(node, b) or not _reaches_layer(node.outputs[0]):
                continue
            _sink_one(graph, node, b, k)
            report.fuse("sink-binarizers", node.name, f"binarizer ({b.kind}) moved after the {node.op}")
            changed, k = True, k + 1
        graph.cleanup()
        if not changed:
            break
    return from_gs(graph, model)
