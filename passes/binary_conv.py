"""Recognise sign + conv and rewrite it to ``bdp.BinaryConv`` with bit-packed weights.

Matched pattern (after canonicalisation)::

    X -> BINARIZE -> [Pad(constant v, H/W only)] -> Conv(W const, [B const]) -> Y

BINARIZE is any form in the table of :mod:`bdp.passes.binarizers` (``Sign``, ``Where`` spellings,
Larq's ``ste_sign``, QONNX ``BipolarQuant``, each optionally times a scalar constant, which folds
into the output scale). ``Sign`` gives 0 at exactly 0; a packed-bit kernel has no 0, so bdp reads
``sgn(0) = +1`` (Larq's and every BNN runtime's convention); the report notes every such node.

W must be ``+/-alpha_m`` in each output channel m (any positive alpha, per channel; BatchNorm
already folded in, so a negative BN scale shows up as flipped signs). Zero padding is the conv's
``pads``; a ``Pad`` with value 1 or -1 in front becomes ``pad_value``. A Conv that does not fit
is left in float, and the report says why.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .core import register_pass
from .graph import attr_str, const_value, from_gs, scalar_value, to_gs
from .ops import BINARY_CONV, DOMAIN, pack_signs


def own_pads(conv: gs.Node):
    """A 2-D Conv's own padding [t, l, b, r] (zeros for auto_pad VALID), or None for SAME_* auto_pad."""
    auto_pad = attr_str(conv.attrs.get("auto_pad"), "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    return [int(p) for p in conv.attrs.get("pads", [0, 0, 0, 0])] if auto_pad == "NOTSET" else [0] * 4


def _pad_attrs(pad: gs.Node):
    """(value, [t, l, b, r]) of a constant Pad on H/W only, else None."""
    if attr_str(pad.attrs.get("mode"), "constant") != "constant":
        return None
    pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return None
    pads = [int(p) for p in pads.reshape(-1)]
    value = 0.0
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = scalar_value(pad.inputs[2])
        if value is None:
            return None
    axes = None
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        axes = const_value(pad.inputs[3])
        if axes is None:
            return None
        axes = [int(a) % 4 for a in axes.reshape(-1)]
    if axes is None:
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
            return None
        begin, end = pads[2:4], pads[6:8]
    else:
        k = len(axes)
        full_b, full_e = [0] * 4, [0] * 4
        for i, a in enumerate(axes):
            full_b[a], full_e[a] = pads[i], pads[k + i]
        if full_b[0] or full_b[1] or full_e[0] or full_e[1]:
            return None
        begin, end = full_b[2:], full_e[2:]
    if any(p < 0 for p in begin + end):
        return None
    return value, [begin[0], begin[1], end[0], end[1]]


def roundoff_tol(alpha):
    """How far a constant-folded +/-alpha may stray from alpha and still be read as alpha.

    Training code writes a binary weight as a straight-through identity, ``(alpha * sign(w)) -
    clip(w) + clip(w)``, which the exporter folds in float32: each add rounds to half an ulp of
    its largest term (the clipped latent weight, |w| <= 1 in ReActNet and Bi-Real Net, a few units
    elsewhere), so the folded value is alpha to about 2^-23 absolute, whatever alpha is. The
    tolerance is that round-off for cancelled terms up to 4 in magnitude (2^-21), or 1e-6 relative,
    and never more than 1e-3 relative (a layer whose weights spread more is not binary)."""
    alpha = np.asarray(alpha, np.float64)
    return np.minimum(np.maximum(1e-6 * alpha, 2.0 ** -21), 1e-3 * alpha)


def sign_scale(w: np.ndarray, rtol=None):
    """(wsign, alpha) if every output channel of W is +/-alpha_m (to float32 round-off of the
    expression that folded it: :func:`roundoff_tol`), else None. alpha_m is the mean |W| of the
    channel."""
    m = w.shape[0]
    flat = np.abs(w.reshape(m, -1).astype(np.float64))
    if not np.all(np.isfinite(flat)):
        return None
    alpha = flat.mean(axis=1) if flat.shape[1] else np.zeros(m)
    tol = roundoff_tol(alpha) if rtol is None else rtol * np.maximum(alpha, 1e-30)
    if np.any(np.abs(flat - alpha[:, None]) > tol[:, None]):
        return None
    wsign = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
    return wsign, alpha.astype(np.float32)


def ternary_zeros(w: np.ndarray) -> int:
    """How many weights are exactly 0 in a W that is +/-alpha per output channel apart from them
    (training code's ``alpha * sign(w)`` where a latent weight was 0), else 0."""
    m = w.shape[0]
    flat = np.asarray(w, np.float32).reshape(m, -1)
    zero = flat == 0
    n = int(zero.sum())
    if n == 0 or n == flat.size:
        return 0
    filled = np.where(zero, np.abs(flat).max(axis=1, keepdims=True), flat)  # a zero read as +alpha
    return n if sign_scale(filled.reshape(w.shape)) is not None else 0


def two_levels(w: np.ndarray):
    """(mu, sig, ws) when every output channel m of W takes two values mu_m -/+ sig_m (to
    :func:`roundoff_tol` of sig_m), ws = +/-1 saying which; or one value (sig_m = 0). Else None."""
    m = w.shape[0]
    flat = w.reshape(m, -1).astype(np.float64)
    if not np.all(np.isfinite(flat)) or flat.shape[1] == 0:
        return None
    mu, sig, ws = np.zeros(m), np.zeros(m), np.ones_like(flat)
    for i, row in enumerate(flat):
        srt = np.sort(row)
        gaps = np.diff(srt)
        if gaps.size == 0 or gaps.max() == 0:
            mu[i] = srt[0]
            continue
        k = int(np.argmax(gaps))
        lo, hi = srt[: k + 1], srt[k + 1:]
        lo_v, hi_v = lo.mean(), hi.mean()
        s = (hi_v - lo_v) / 2.0
        tol = float(roundoff_tol(max(abs(lo_v), abs(hi_v))))
        if lo.max() - lo.min() > 2 * tol or hi.max() - hi.min() > 2 * tol or s <= 2 * tol:
            return None
        mu[i], sig[i] = (hi_v + lo_v) / 2.0, s
        ws[i] = np.where(row > (lo.max() + hi.min()) / 2.0, 1.0, -1.0)
    return mu, sig, ws.reshape(w.shape)


_DEQUANT = ("Mul", "Div", "Add", "Sub")


def quantized_levels(t, depth=6):
    """(bits, lo, hi) when tensor T is fake-quantized: an integer grid ``Round``/``Floor``/``Ceil``
    of a value clamped to ``[lo, hi]`` by constants (``Min``/``Max`` or ``Clip``), then only
    ``Mul``/``Div``/``Add``/``Sub`` by constants (QONNX ``Quant`` after qonnx-to-standard, a
    Brevitas 8-bit input quantizer); ``DequantizeLinear`` gives its integer type's width. Else None."""
    for _ in range(depth):  # the dequantizing affine map
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
            return None
        n = t.inputs[0]
        if n.op == "DequantizeLinear" and n.inputs:
            src = n.inputs[0]
            dt = getattr(src, "dtype", None)
            bits = int(np.dtype(dt).itemsize * 8) if dt is not None and np.dtype(dt).kind in "iu" else 8
            return bits, None, None
        if n.op not in _DEQUANT or len(n.inputs) != 2:
            break
        var = [i for i in n.inputs if const_value(i) is None]
        if len(var) != 1:
            break
        t = var[0]
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    if n.op == "Mul" and len(n.inputs) == 2:  # QONNX's UP/DOWN/HALF_* modes: Sign(y) * Ceil|Floor(...)
        rounded = [i for i in n.inputs if len(i.inputs) == 1 and i.inputs[0].op in ("Ceil", "Floor")]
        n = rounded[0].inputs[0] if rounded else n
    if n.op not in ("Round", "Floor", "Ceil"):
        return None
    lo = hi = None
    t = n.inputs[0]
    for _ in range(4):  # the clamp, Min/Max in either order, or Clip; possibly behind Abs/Add
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
            break
        c = t.inputs[0]
        if c.op == "Clip" and len(c.inputs) >= 3:
            lo_c, hi_c = const_value(c.inputs[1]), const_value(c.inputs[2])
            if lo_c is not None and hi_c is not None:
                lo, hi = float(np.min(lo_c)), float(np.max(hi_c))
            break
        if c.op in ("Min", "Max") and len(c.inputs) == 2:
            var = [i for i in c.inputs if const_value(i) is None]
            if len(var) != 1:
                break
            v = const_value(c.inputs[1] if c.inputs[0] is var[0] else c.inputs[0])
            if c.op == "Min":
                hi = float(np.max(v))
            else:
                lo = float(np.min(v))
            t = var[0]
            continue
        if c.op in ("Abs", "Add", "Sub"):
            t = c.inputs[0]
            continue
        break
    if lo is None or hi is None or hi <= lo:
        return None
    levels = int(round(hi - lo)) + 1
    return max(1, int(np.ceil(np.log2(levels)))), lo, hi


_MOVES = ("Transpose", "Reshape", "Flatten", "Pad", "Identity", "Cast", "Squeeze", "Unsqueeze")


def _origin(t, depth=8):
    """Where float tensor T comes from, for a reason: 'the graph input NAME' when only data
    movement lies between, else 'from OP NAME' (the nearest computing node)."""
    for _ in range(depth):
        if isinstance(t, gs.Constant):
            return "a constant"
        if len(t.inputs) != 1:
            return f"the graph input '{t.name}'"
        n = t.inputs[0]
        if n.op not in _MOVES or not n.inputs:
            return f"from {n.op} {n.name}"
        t = n.inputs[0]
    return f"from {t.name}"


def float_input_reason(node: gs.Node, x=None):
    """Why conv/linear NODE, whose data input X (default: its input 0) is not binarized, runs in
    float, as specifically as the graph tells: a binarized tensor times a non-scalar scale, a
    k-bit quantized input, 1-bit weights behind a float input, or a plain float layer."""
    x = node.inputs[0] if x is None else x
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    wbin = False
    if w is not None and w.ndim >= 2 and w.size:
        if node.op == "ConvTranspose":
            w = np.swapaxes(w, 0, 1)  # [C, M/g, ...]: output channels second
        elif node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transB", 0))):
            w = np.swapaxes(w, -1, -2).reshape(-1, w.shape[-2])  # [.., K, M] -> one row per output
        wbin = sign_scale(np.asarray(w, np.float32)) is not None
    prod = x.inputs[0] if isinstance(x, gs.Variable) and len(x.inputs) == 1 else None
    if prod is not None and prod.op == "Mul" and len(prod.inputs) == 2:
        for a, b in ((0, 1), (1, 0)):
            if binarizers.match(prod.inputs[a]) is not None and binarizers.match(prod.inputs[b]) is None:
                return ("input is a binarized tensor times a non-scalar scale (a per-channel or per-element "
                        "activation scale does not factor out of the binary dot product); runs in float")
    q = quantized_levels(x)
    if q is not None:
        bits, lo, hi = q
        grid = f" ({int(hi - lo) + 1} levels)" if lo is not None else ""
        return (f"input is quantized to {bits} bits{grid}, not 1 bit"
                + (" (its weights are 1-bit)" if wbin else "") + ": a multi-bit layer, runs in float")
    if wbin:
        return (f"1-bit weights, but the input is a float tensor ({_origin(x)}), not a binarizer's output: "
                "runs in float")
    return "input is not binarized (float layer)"


def fuse_binary_convs(model, report, pass_name="fuse-binary-conv"):
    graph = to_gs(model)
    count = 0
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        why = _try_fuse(graph, conv, report, pass_name)
        if why is None:
            count += 1
        elif why:
            report.leave(conv.name, "Conv", why)
    return from_gs(graph, model)


def _try_fuse(graph, conv, report, pass_name):
    """Rewrite CONV in place; returns None when fused, '' when not binary at all, else the reason."""
    x = conv.inputs[0]
    pad_value, pre_pads, pad_node = 0.0, [0, 0, 0, 0], None
    if len(x.inputs) == 1 and x.inputs[0].op == "Pad":
        pad_node = x.inputs[0]
        pa = _pad_attrs(pad_node)
        if pa is None:
            return "input Pad is not a constant pad of H/W"
        pad_value, pre_pads = pa
        x = pad_node.inputs[0]
    bz = binarizers.match(x) if isinstance(x, gs.Variable) else None
    if bz is None:
        return "" if pad_node is None else float_input_reason(conv, x)
    src, thr, act_scale, kind = bz.src, bz.threshold, bz.scale, bz.kind
    pad_value = pad_value / act_scale
    if pad_value not in (0.0, 1.0, -1.0):
        return f"Pad value {pad_value * act_scale:g} is not 0, +/-1 (times the activation scale) in the sign domain"
    w = const_value(conv.inputs[1])
    if w is None:
        return "weights are not constant"
    if w.ndim != 4:
        return f"{w.ndim - 2}-D convolution (only 2-D is binary)"
    ss = sign_scale(w)
    if ss is None:
        zeros = ternary_zeros(w)
        if zeros:
            return (f"input is binarized and the weights are +/-alpha per output channel except {zeros} exactly 0 "
                    "(sign(0) = 0 in the source: a ternary layer, which a packed-bit kernel cannot hold)")
        return "input is binarized but the weights are not +/-alpha per output channel"
    wsign, alpha = ss
    conv_pads = own_pads(conv)
    if conv_pads is None:
        return f"auto_pad={attr_str(conv.attrs.get('auto_pad'))} (run shape inference / export with explicit pads)"
    if any(conv_pads) and pad_value != 0.0:
        return "Pad with a non-zero value followed by a Conv with its own zero padding"
    pads = [a + b for a, b in zip(pre_pads, conv_pads)]
    kshape = list(w.shape[2:])
    group = int(conv.attrs.get("group", 1))
    b = const_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if len(conv.inputs) > 2 and conv.inputs[2].name and b is None:
        return "bias is not constant"
    bias = np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)

    y = conv.outputs[0]
    name = conv.name
    wbits = gs.Constant(name + "_wbits", pack_signs(wsign))
    scale = gs.Constant(name + "_scale", (alpha * np.float32(act_scale)).astype(np.float32))
    bias_c = gs.Constant(name + "_bias", bias)
    node = gs.Node(
        op=BINARY_CONV,
        name=name,
        domain=DOMAIN,
        attrs={
            "kernel_shape": kshape,
            "strides": [int(s) for s in conv.attrs.get("strides", [1, 1])],
            "dilations": [int(d) for d in conv.attrs.get("dilations", [1, 1])],
            "pads": pads,
            "group": group,
            "act_threshold": float(thr),
            "pad_value": float(pad_value),
            "out_sign": 0,
            "out_threshold": 0.0,
        },
        inputs=[src, wbits, scale, bias_c],
        outputs=[y],
    )
    conv.outputs = []
    conv.inputs = []
    graph.nodes.append(node)
    what = f"{kind} + Conv {kshape[0]}x{kshape[1]} -> bdp.BinaryConv ({w.shape[1] * group}->{w.shape[0]} ch)"
    if pad_node is not None:
        what += f", Pad(value={pad_value:g}) folded"
    report.fuse(pass_name, name, what)
    if act_scale != 1.0:
        report.fuse(pass_name, name, f"activation scale {act_scale:g} folded into the output scale")
    if bz.zero_is_zero:
        report.notes.append(f"{name}: Sign read as sgn(0)=+1 (differs from ONNX Sign only where the input is exactly 0)")
    return None


register_pass("fuse-binary-conv", "sign + [Pad] + Conv with +/-alpha weights -> bdp.BinaryConv (packed weights)")(
    fuse_binary_convs)


@register_pass("report-float", "list the nodes left in float with the reason for each")
def report_float(model, report):
    from .ops import DOMAIN as BDP

    graph = to_gs(model)
    for n in graph.nodes:
        if n.domain == BDP or n.op not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        if n.name not in report.left_float:
            binarized = any(binarizers.match(t) is not None for t in n.inputs[:2] if isinstance(t, gs.Variable))
            if binarized and n.op != "Conv":
                report.leave(n.name, n.op, f"binarized {n.op}: bdp has no packed-bit kernel for it yet (runs in float)")
            else:
                report.leave(n.name, n.op, float_input_reason(n))
        if one_bit_weights(n):
            report.one_bit_float[n.name] = report.left_float[n.name][1]
    return model


def one_bit_weights(node) -> bool:
    """NODE (Conv, ConvTranspose, MatMul, Gemm) has constant weights of two values per output
    channel (+/-alpha, or {mu - sig, mu + sig}): a layer its author binarized."""
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 2 or w.size < 2:
        return False
    w = np.asarray(w, np.float32)
    if node.op == "ConvTranspose":
        w = np.swapaxes(w, 0, 1)
    elif node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transB", 0))):
        w = np.swapaxes(w, -1, -2).reshape(-1, w.shape[-2])
    per = w.reshape(w.shape[0], -1)
    if per.shape[1] < 2 or np.all(per == per[:, :1]):
        return False  # one value per channel (a box filter, a mean) is no binarized layer
    if sign_scale(w) is not None or ternary_zeros(w):
        return True
    lv = two_levels(w)
    return lv is not None and bool(np.any(lv[1] > 0))
