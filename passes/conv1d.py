"""``binary-conv1d``: a binarized 1-D convolution as a 2-D one over ``[N, C, 1, L]``.

A ``Conv`` with a 1-D kernel (weights ``[M, C/g, k]``, what ``torch.nn.Conv1d`` and Keras
``Conv1D`` export) computes, for every output position, the same sum as a 2-D conv with kernel
``1 x k`` on the input with a unit height axis inserted:

    Conv1d(x, W)[n, m, l] = Conv2d(x[:, :, None, :], W[:, :, None, :])[n, m, 0, l]

with the strides, dilations and pads of the length axis, and none on the new one. So a
binarized 1-D conv becomes ``Unsqueeze(axis 2) -> binarizer -> [Pad] -> Conv 1xk -> Squeeze``;
the binarizer is re-emitted after the Unsqueeze (:func:`bdp.passes.binarizers.emit`: a sign
commutes with moving data) and a constant ``Pad`` of the length axis in front of the conv keeps
its place, its pads re-laid out for rank 4. ``fuse-binary-conv`` then packs the 2-D conv like any
other. Exact: the same products are summed per output value.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .core import register_pass
from .graph import attr_str, const_value, from_gs, ints as _ints, to_gs


def _pads_4d(pad: gs.Node):
    """The pads of a constant-mode Pad of a rank-3 tensor, re-laid out for the same tensor with a
    unit axis inserted at 2: a constant [8] array, or None when the pads are not constant."""
    pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        axes = const_value(pad.inputs[3])
        if axes is None:
            return None
        axes = [int(a) % 3 for a in np.asarray(axes).reshape(-1)]
        begin, end = [0] * 3, [0] * 3
        for i, a in enumerate(axes):
            begin[a], end[a] = pads[i], pads[len(axes) + i]
    elif len(pads) == 6:
        begin, end = pads[:3], pads[3:]
    else:
        return None
    return np.array(begin[:2] + [0, begin[2]] + end[:2] + [0, end[2]], np.int64)


@register_pass("binary-conv1d", "binarized 1-D Conv -> Unsqueeze + binarizer + Conv 1xk + Squeeze (then packed by "
                                "fuse-binary-conv)")
def binary_conv1d(model, report):
    graph = to_gs(model)
    changed = False
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        w = const_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w is None or w.ndim != 3:
            continue
        x, pad = conv.inputs[0], None
        if isinstance(x, gs.Variable) and len(x.inputs) == 1 and x.inputs[0].op == "Pad":
            pad = x.inputs[0]
            x = pad.inputs[0]
        bz = binarizers.match(x) if isinstance(x, gs.Variable) else None
        if bz is None:
            continue  # a float 1-D conv: fuse-binary-conv / report-float say why it stays float
        name = conv.name
        pads4 = None
        if pad is not None:
            pads4 = _pads_4d(pad)
            if pads4 is None or attr_str(pad.attrs.get("mode"), "constant") != "constant":
                report.leave(name, "Conv", "binarized 1-D convolution behind a Pad that is not a constant pad with "
                                           "constant pads; runs in float")
                continue
        a = conv.attrs
        attrs = {"kernel_shape": [1, int(w.shape[2])], "strides": [1] + _ints(a.get("strides"), 1, 1),
                 "dilations": [1] + _ints(a.get("dilations"), 1, 1), "group": int(a.get("group", 1))}
        auto_pad = attr_str(a.get("auto_pad"), "NOTSET")
        if auto_pad == "NOTSET":
            p = _ints(a.get("pads"), 2, 0)
            attrs["pads"] = [0, p[0], 0, p[1]]
        else:  # SAME_* / VALID act per axis; the unit axis with kernel 1 and stride 1 gets no padding
            attrs["auto_pad"] = auto_pad
        x4 = gs.Variable(name + "_x4", dtype=np.float32)
        graph.nodes.append(gs.Node("Unsqueeze", name=name + "_x4", outputs=[x4],
                                   inputs=[bz.src, gs.Constant(name + "_ax2", np.array([2], np.int64))]))
        xb = binarizers.emit(graph, x4, bz, name + "_xb")
        if pad is not None:
            xp = gs.Variable(name + "_xp", dtype=np.float32)
            extra = [pad.inputs[2]] if len(pad.inputs) > 2 and pad.inputs[2].name else []
            graph.nodes.append(gs.Node("Pad", name=name + "_pad4", attrs={"mode": "constant"}, outputs=[xp],
                                       inputs=[xb, gs.Constant(name + "_pads4", pads4)] + extra))
            xb = xp
        ins = [xb, gs.Constant(name + "_w1xk", np.ascontiguousarray(w[:, :, None, :]))] + list(conv.inputs[2:])
        y4 = gs.Variable(name + "_y4", dtype=np.float32)
        graph.nodes.append(gs.Node("Conv", name=name + "_1xk", attrs=attrs, inputs=ins, outputs=[y4]))
        graph.nodes.append(gs.Node("Squeeze", name=name + "_sq", outputs=list(conv.outputs),
                                   inputs=[y4, gs.Constant(name + "_sqax", np.array([2], np.int64))]))
        conv.inputs, conv.outputs = [], []
        report.fuse("binary-conv1d", name, f"binarized 1-D Conv (kernel {w.shape[2]}) -> Conv 1x{w.shape[2]} "
                                           "over [N, C, 1, L]")
        changed = True
    if changed:
        graph.cleanup()
    return from_gs(graph, model)
