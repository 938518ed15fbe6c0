"""Exact rewrites that bring more binary layers into the form ``fuse-binary-conv`` packs.

``binary-convtranspose``: a transposed conv whose kernel equals its stride (the 2x2 / stride 2
up-sampling of binary decoders: BiDense up-blocks, BQ-Dense) has no overlapping taps, so

    ConvTranspose(x, W)[n, m, s*i + a, s*j + b] = sum_c x[n, c, i, j] * W[c, m, a, b]

is a 1x1 conv with ``M*s*s`` output channels ``(m, a, b)`` followed by ``DepthToSpace``
(blocksize s, CRD order). On a binarized input, that 1x1 conv is a binary conv like any other
(weights ``+/-alpha_m``), so it runs packed. A BatchNormalization right after the transposed conv
is folded into the 1x1 conv's weights and bias first (per output channel m, repeated over a, b).
The same terms are summed for every output value, so the rewrite is exact.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .core import register_pass
from .graph import const_value, fold_bn, from_gs, ints as _ints, to_gs


@register_pass("binary-convtranspose", "binarized ConvTranspose with kernel == stride -> 1x1 Conv + DepthToSpace "
                                       "(then packed by fuse-binary-conv)")
def binary_convtranspose(model, report):
    graph = to_gs(model)
    outs = {t.name for t in graph.outputs}
    changed = False
    for ct in [n for n in graph.nodes if n.op == "ConvTranspose"]:
        if not ct.inputs or binarizers.match(ct.inputs[0]) is None:
            continue
        w = const_value(ct.inputs[1]) if len(ct.inputs) > 1 else None
        if w is None or w.ndim != 4:
            continue
        cin, mg, kh, kw = w.shape
        a = ct.attrs
        strides = _ints(a.get("strides"), 2, 1)
        why = None
        if int(a.get("group", 1)) != 1:
            why = "grouped"
        elif not (kh == kw == strides[0] == strides[1]):
            why = f"kernel {kh}x{kw} != stride {strides}"
        elif any(_ints(a.get("pads"), 4, 0)) or any(_ints(a.get("output_padding"), 2, 0)) \
                or a.get("output_shape") is not None or any(d != 1 for d in _ints(a.get("dilations"), 2, 1)):
            why = "pads, output padding, output shape or dilation"
        elif a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            why = "auto_pad"
        if why:
            report.leave(ct.name, "ConvTranspose", f"binarized ConvTranspose ({why}): only kernel == stride, "
                                                   "no padding, runs packed; this one runs in float")
            continue
        k = kh
        b = const_value(ct.inputs[2]) if len(ct.inputs) > 2 and ct.inputs[2].name else None
        if len(ct.inputs) > 2 and ct.inputs[2].name and b is None:
            continue
        bias = np.zeros(mg, np.float64) if b is None else np.asarray(b, np.float64).reshape(-1)
        scale = np.ones(mg, np.float64)
        y = ct.outputs[0]
        final = y
        bn = y.outputs[0] if len(y.outputs) == 1 and y.name not in outs else None
        folded_bn = None
        folded = fold_bn(bn) if bn is not None else None
        if folded is not None:
            scale, bias = folded[0], folded[1](bias)
            final = bn.outputs[0]
            folded_bn = bn
        # W'[(m, a, b), c] = W[c, m, a, b] * scale[m]
        w2 = (np.asarray(w, np.float64) * scale.reshape(1, mg, 1, 1)).transpose(1, 2, 3, 0).reshape(mg * k * k, cin, 1, 1)
        b2 = np.repeat(bias, k * k)
        z = gs.Variable(ct.name + "_s2d", dtype=np.float32)
        conv = gs.Node("Conv", name=ct.name, attrs={"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0]},
                       inputs=[ct.inputs[0], gs.Constant(ct.name + "_w1x1", w2.astype(np.float32)),
                               gs.Constant(ct.name + "_b1x1", b2.astype(np.float32))],
                       outputs=[z])
        d2s = gs.Node("DepthToSpace", name=ct.name + "_d2s", attrs={"blocksize": k, "mode": "CRD"},
                      inputs=[z], outputs=[final])
        ct.inputs, ct.outputs = [], []
        if folded_bn is not None:
            folded_bn.inputs, folded_bn.outputs = [], []
        graph.nodes += [conv, d2s]
        report.fuse("binary-convtranspose", ct.name,
                    f"ConvTranspose {k}x{k}/{k} -> Conv 1x1 ({cin}->{mg * k * k} ch) + DepthToSpace"
                    + (f", {folded_bn.name} folded" if folded_bn is not None else ""))
        changed = True
    if changed:
        graph.cleanup()
    return from_gs(graph, model)


def _node(graph, op, inputs, name, **attrs):
    out = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op, name=name + "_" + op.lower(), attrs=attrs, inputs=inputs, outputs=[out]))
    return out


@register_pass("binary-matmul", "binarized MatMul / Gemm with +/-alpha weight columns -> 1x1 Conv (then packed by "
                                "fuse-binary-conv), data movement in front of the binarizer")
def binary_matmul(model, report):
    """``MatMul(sgn(x), W)`` for x of any rank >= 2 and a constant W [K, M] whose every column is
    ``+/-alpha_m`` (a binary linear layer, an attention projection, a linear layer over the
    channels of an NHWC tensor), and ``Gemm(sgn(x), W, C)`` likewise, become a 1x1 conv: rank 2
    ``[N, K]`` over ``[N, K, 1, 1]``; rank 3 ``[B, T, K]`` over ``[B, K, T, 1]``; rank 4
    ``[N, H, W, K]`` (an NHWC tensor) over ``Transpose -> [N, K, H, W]`` and back (the default
    pipeline's second ``cancel-transposes`` then drops the pair around an NCHW producer and
    consumer); rank r > 4 has its dims 2..r-2 flattened (``Reshape [d0, d1, -1, K]``) into the
    rank-4 path and is reshaped back to ``[d0, ..., M]``. The binarizer is applied after the data
    movement (a sign commutes with moving data); ``fuse-binary-conv`` then packs the conv.
    Exact: the same K products are summed per output."""
    import onnx

    from .binary_conv import sign_scale

    if not any(n.op_type in ("MatMul", "Gemm") for n in model.graph.node):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes stay unknown; ranks are then unknown and nothing is rewritten
        inferred = model
    graph = to_gs(inferred)
    changed = False
    for mm in [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]:
        a_in = mm.inputs[0]
        if not isinstance(a_in, gs.Variable):
            continue
        m = binarizers.match(a_in)
        if m is None:
            continue
        w = const_value(mm.inputs[1])
        attrs = mm.attrs
        alpha_g, beta_g = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        why = None
        if mm.op == "Gemm" and int(attrs.get("transA", 0)):
            why = "Gemm with transA"
        elif w is None or w.ndim != 2:
            why = "weights are not a constant matrix"
        if why is None:
            w = np.asarray(w, np.float32)
            wt = (w if (mm.op == "Gemm" and int(attrs.get("transB", 0))) else w.T) * np.float32(alpha_g)  # [M, K]
            if sign_scale(wt) is None:
                why = "weights are not +/-alpha per output column"
        bias = None
        if why is None and mm.op == "Gemm" and len(mm.inputs) > 2 and mm.inputs[2].name:
            c = const_value(mm.inputs[2])
            mdim = wt.shape[0]
            if c is None or c.size not in (1, mdim) or (c.ndim == 2 and c.shape[0] != 1):
                why = "Gemm bias C is not a constant vector"
            else:
                bias = (np.broadcast_to(np.asarray(c, np.float32).reshape(-1), (mdim,)) * np.float32(beta_g))
        rank = None
        shape = getattr(a_in, "shape", None)
        if shape is not None:
            rank = len(shape)
        if why is None and rank is None:
            why = "input rank unknown (shape inference failed; compile with --input-shape)"
        elif why is None and rank < 2:
            why = f"input of rank {rank} (a vector-matrix product; rank >= 2 runs packed)"
        if mm.op == "Gemm" and why is None and rank != 2:
            why = "Gemm input is not 2-D"
        if why:
            report.leave(mm.name, mm.op, f"binarized {mm.op}: {why}; runs in float")
            continue
        src = m.src
        name = mm.name
        k, mdim = wt.shape[1], wt.shape[0]
        if rank == 2:
            x4 = _node(graph, "Unsqueeze", [src, gs.Constant(name + "_ax23", np.array([2, 3], np.int64))], name + "_x4")
        elif rank == 3:
            xt = _node(graph, "Transpose", [src], name + "_xt", perm=[0, 2, 1])
            x4 = _node(graph, "Unsqueeze", [xt, gs.Constant(name + "_ax3", np.array([3], np.int64))], name + "_x4")
        else:
            x_4 = src
            if rank > 4:  # [d0, d1, d2, ..., K] -> [d0, d1, d2 * ..., K] (Reshape's 0 copies a dim)
                x_4 = _node(graph, "Reshape", [src, gs.Constant(name + "_flat", np.array([0, 0, -1, k], np.int64))],
                            name + "_xr")
            x4 = _node(graph, "Transpose", [x_4], name + "_x4", perm=[0, 3, 1, 2])
        xb = binarizers.emit(graph, x4, m, name + "_xb")
        ins = [xb, gs.Constant(name + "_w1x1", wt.reshape(mdim, k, 1, 1).astype(np.float32))]
        if bias is not None:
            ins.append(gs.Constant(name + "_b1x1", bias.astype(np.float32)))
        y4 = _node(graph, "Conv", ins, name + "_y4", kernel_shape=[1, 1])
        out = mm.outputs[0]
        if rank == 2:
            graph.nodes.append(gs.Node("Squeeze", name=name + "_sq", inputs=[y4, gs.Constant(name + "_sqax", np.array([2, 3], np.int64))],
                                       outputs=[out]))
        elif rank == 3:
            y3 = _node(graph, "Squeeze", [y4, gs.Constant(name + "_sqax", np.array([3], np.int64))], name + "_y3")
            graph.nodes.append(gs.Node("Transpose", name=name + "_yt", attrs={"perm": [0, 2, 1]}, inputs=[y3],
                                       outputs=[out]))
        elif rank == 4:
            graph.nodes.append(gs.Node("Transpose", name=name + "_yt", attrs={"perm": [0, 2, 3, 1]}, inputs=[y4],
                                       outputs=[out]))
        else:
            yt = _node(graph, "Transpose", [y4], name + "_yt", perm=[0, 2, 3, 1])
            graph.nodes.append(gs.Node("Reshape", name=name + "_unflat", outputs=[out],
                                       inputs=[yt, _lead_shape(graph, src, shape, mdim, name)]))
        mm.inputs, mm.outputs = [], []
        report.fuse("binary-matmul", name, f"binarized {mm.op} ({k}->{mdim}) -> 1x1 Conv")
        changed = True
    if changed:
        graph.cleanup()
    return from_gs(graph, model)


def _lead_shape(graph, src, shape, mdim, name):
    """The shape ``[d0, ..., d_{r-2}, MDIM]`` of a MatMul's output from its input SRC of SHAPE
    [d0, ..., K]: a constant when the leading dims are known, else computed with
    ``Shape(src)[:-1] ++ [MDIM]``."""
    lead = list(shape[:-1])
    if all(isinstance(d, int) and d >= 0 for d in lead):
        return gs.Constant(name + "_outshape", np.array(lead + [mdim], np.int64))
    s = gs.Variable(name + "_inshape", dtype=np.int64)
    graph.nodes.append(gs.Node("Shape", name=name + "_shape", inputs=[src], outputs=[s]))
    head = gs.Variable(name + "_lead", dtype=np.int64)
    graph.nodes.append(gs.Node("Slice", name=name + "_lead", outputs=[head],
                               inputs=[s, gs.Constant(name + "_s0", np.array([0], np.int64)),
                                       gs.Constant(name + "_s1", np.array([-1], np.int64))]))
    full = gs.Variable(name + "_outshape", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", name=name + "_outshape", attrs={"axis": 0}, outputs=[full],
                               inputs=[head, gs.Constant(name + "_m", np.array([mdim], np.int64))]))
    return full


def _per_sample(t: gs.Tensor) -> bool:
    """T is a computed (non-constant) tensor with one value per sample: shape [N, 1, ..., 1]."""
    if not isinstance(t, gs.Variable) or const_value(t) is not None or t.shape is None:
        return False
    shape = list(t.shape)
    if all(isinstance(d, int) and d == 1 for d in shape):  # a computed scalar
        return True
    # [N, 1, 1, 1] only: ONNX broadcasting aligns a shorter [N, 1, 1] to the channel axis
    return len(shape) == 4 and all(isinstance(d, int) and d == 1 for d in shape[1:])


@register_pass("factor-sample-scale", "Conv(alpha * sgn(x)) with a per-sample data-dependent alpha -> "
                                      "alpha * Conv(sgn(x)) + bias (the conv then packs)")
def factor_sample_scale(model, report):
    """A per-sample activation scale (BiDense DAB with ``dab_alpha="sample"``: ``alpha [N,1,1,1]``
    computed from the input) is one number for the whole dot product, so it factors out of the
    conv exactly: ``Conv(alpha * B, W) + b = alpha * Conv(B, W) + b`` (zero padding commutes with
    the multiply). The binary conv packs, the multiply and the bias stay two cheap float
    elementwise ops after it. A per-*input-channel* alpha (BiDense's own DAB) does not factor out
    of the popcount; those convs stay float and the report says so."""
    import onnx

    if not any(n.op_type == "Conv" for n in model.graph.node):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    graph = to_gs(inferred)
    changed = False
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        t = conv.inputs[0]
        pad = None
        if len(t.inputs) == 1 and t.inputs[0].op == "Pad":
            pad = t.inputs[0]
            pv = const_value(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2].name else np.zeros(1)
            if pv is None or np.any(pv != 0) or pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
                continue
            t = pad.inputs[0]
        if len(t.inputs) != 1 or t.inputs[0].op != "Mul":
            continue
        mul = t.inputs[0]
        pair = None
        for a, b in ((0, 1), (1, 0)):
            if binarizers.match(mul.inputs[a]) is not None \
                    and _per_sample(mul.inputs[b]):
                pair = (mul.inputs[a], mul.inputs[b])
        if pair is None:
            continue
        bsig, alpha = pair
        w = const_value(conv.inputs[1])
        if w is None or w.ndim != 4:
            continue
        name = conv.name
        m = w.shape[0]
        if pad is not None:  # pad the binarized tensor itself (zero padding either way)
            padded = gs.Variable(name + "_padb", dtype=np.float32)
            graph.nodes.append(gs.Node("Pad", name=name + "_padb", attrs=dict(pad.attrs),
                                       inputs=[bsig] + list(pad.inputs[1:]), outputs=[padded]))
            bsig = padded
        bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        y = conv.outputs[0]
        raw = gs.Variable(name + "_unscaled", dtype=np.float32)
        conv.inputs = [bsig, conv.inputs[1]]
        conv.outputs = [raw]
        scaled = y if bias is None else gs.Variable(name + "_scaled", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", name=name + "_alpha", inputs=[raw, alpha], outputs=[scaled]))
        if bias is not None:
            bv = const_value(bias)
            b4 = gs.Constant(name + "_bias4", np.asarray(bv, np.float32).reshape(1, m, 1, 1)) if bv is not None else bias
            graph.nodes.append(gs.Node("Add", name=name + "_bias", inputs=[scaled, b4], outputs=[y]))
        report.fuse("factor-sample-scale", name, "per-sample activation scale moved after the conv")
        changed = True
    if changed:
        graph.cleanup()
    return from_gs(graph, model)
