"""The ONNX ``bdp`` domain: bdp's binary operators.

Every op here has three things:

* an ONNX ``OpSchema`` registered with ``onnx.defs`` (so ``onnx.checker`` accepts graphs using it);
* an ONNX *function body* made of standard ops, stored as a model-local function in any model
  that uses the op, so stock onnxruntime runs a ``bdp`` graph without bdp's compiler;
* a numpy reference (:func:`binary_conv_reference`) that states the arithmetic exactly.

``bdp.BinaryConv`` (version 1)
------------------------------

Inputs

* ``X``     float32 [N, C, H, W]: the real-valued activations, binarized inside the op.
* ``Wbits`` uint8 [M, ceil(C/group*kH*kW / 8)]: packed weight signs. Row ``m`` holds the
  flattened ``(c, r, s)`` weight signs of output channel ``m`` (C-order over C/group, kH, kW),
  8 to a byte, most significant bit first, bit 1 meaning -1 and bit 0 meaning +1; the unused low
  bits of the last byte are 0.
* ``scale`` float32 [M]: per-output-channel multiplier (``mean|W|`` times any folded BatchNorm
  scale, activation scale or per-channel ``Mul`` after the conv; may be negative).
* ``bias``  float32 [M]: per-output-channel bias (conv bias, folded BatchNorm shift).

Attributes

* ``kernel_shape`` [kH, kW], ``strides`` [sH, sW], ``dilations`` [dH, dW],
  ``pads`` [top, left, bottom, right], ``group`` (as ONNX ``Conv``).
* ``act_threshold`` (float, default 0): the binarizer is ``sgn(x) = +1 if x >= t else -1``.
  Note ``sgn(t) = +1`` (binary networks' convention; ONNX ``Sign`` gives 0 at 0).
* ``pad_value`` (float, default 0): the value that padded positions take *in the sign domain*.
  ``0`` is zero padding of the signed tensor (what ``Conv(pads=...)`` after ``Sign`` computes:
  a padded tap contributes nothing); ``1`` is one padding (Larq's ``padding="same"`` with
  ``pad_values=1``, or ``Pad(value=1)`` before the conv); ``-1`` is minus-one padding.

Output

* ``Y`` float32 [N, M, OH, OW] (±1 with ``out_sign=1``), otherwise
  ``Y[n,m,oh,ow] = scale[m] * D[n,m,oh,ow] + bias[m]`` and
  ``D = sum_{c,r,s} P(sgn(X))[n, g*C/group + c, oh*sH + r*dH, ow*sW + s*dW] * wsign[m, c, r, s]``,
  where ``P`` pads the signed tensor with ``pad_value`` and ``g = m // (M/group)``.
  ``D`` is an integer; a packed-bit kernel computes it exactly with XOR and popcount.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "bdp"
VERSION = 1

BINARY_CONV = "BinaryConv"

# ---------------------------------------------------------------------------------------------
# Bit packing


def pack_signs(wsign: np.ndarray) -> np.ndarray:
    """Pack a ±1 weight tensor [M, ...] into ``Wbits`` uint8 [M, ceil(K/8)] (bit 1 = -1)."""
    m = wsign.shape[0]
    flat = (np.asarray(wsign).reshape(m, -1) < 0).astype(np.uint8)
    return np.packbits(flat, axis=1, bitorder="big")


def unpack_signs(wbits: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`pack_signs`: ±1 float32 tensor of ``shape`` ([M, C/group, kH, kW])."""
    m = shape[0]
    k = int(np.prod(shape[1:]))
    bits = np.unpackbits(np.asarray(wbits, dtype=np.uint8), axis=1, bitorder="big")[:, :k]
    return (1.0 - 2.0 * bits.astype(np.float32)).reshape(m, *shape[1:])


def binary_conv_attrs(node: onnx.NodeProto) -> dict:
    """The attributes of a ``bdp.BinaryConv`` node with their defaults filled in."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    out = {
        "kernel_shape": list(a["kernel_shape"]),
        "strides": list(a.get("strides", [1, 1])),
        "dilations": list(a.get("dilations", [1, 1])),
        "pads": list(a.get("pads", [0, 0, 0, 0])),
        "group": int(a.get("group", 1)),
        "act_threshold": float(a.get("act_threshold", 0.0)),
        "pad_value": float(a.get("pad_value", 0.0)),
        "out_sign": int(a.get("out_sign", 0)),
        "out_threshold": float(a.get("out_threshold", 0.0)),
    }
    return out


def binary_conv_reference(x, wbits, scale, bias, *, kernel_shape, strides=(1, 1), dilations=(1, 1),
                          pads=(0, 0, 0, 0), group=1, act_threshold=0.0, pad_value=0.0, out_sign=0,
                          out_threshold=0.0):
    """Numpy reference of ``bdp.BinaryConv`` (slow, exact: integer accumulation)."""
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    m = wbits.shape[0]
    cg = c // group
    kh, kw = kernel_shape
    ws = unpack_signs(wbits, (m, cg, kh, kw)).astype(np.int64)
    xs = np.where(x >= act_threshold, 1, -1).astype(np.int64)
    t, l, b, r = pads
    xp = np.full((n, c, h + t + b, w + l + r), int(pad_value), dtype=np.int64)
    xp[:, :, t:t + h, l:l + w] = xs
    sh, sw = strides
    dh, dw = dilations
    oh = (h + t + b - dh * (kh - 1) - 1) // sh + 1
    ow = (w + l + r - dw * (kw - 1) - 1) // sw + 1
    d = np.zeros((n, m, oh, ow), dtype=np.int64)
    mg = m // group
    for g in range(group):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = ws[g * mg:(g + 1) * mg]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                d[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch, wg[:, :, i, j])
    y = scale.reshape(1, m, 1, 1).astype(np.float32) * d.astype(np.float32)
    y = (y + bias.reshape(1, m, 1, 1).astype(np.float32)).astype(np.float32)
    if out_sign:
        y = np.where(y >= np.float32(out_threshold), 1.0, -1.0).astype(np.float32)
    return y


def sign_thresholds(scale, bias, out_threshold, k):
    """Integer form of ``scale[m]*D + bias[m] >= out_threshold`` for integer D in [-K, K].

    Returns ``(flip, T)``, int arrays [M], such that for every such D the float32 comparison
    (multiply, round, add, round: what onnxruntime and the reference compute) is true exactly
    when ``flip[m] * D >= T[m]``. ``flip`` is -1 for a negative scale (the comparison turns
    around: a negative multiplier), else +1. Found by evaluating the float32 expression at every
    D, so no rounding argument can be wrong: ``fl(fl(s*D) + b)`` is monotone in D.
    """
    scale = np.asarray(scale, np.float32).reshape(-1)
    bias = np.asarray(bias, np.float32).reshape(-1)
    d = np.arange(-k, k + 1, dtype=np.int64)
    y = (scale[:, None] * d.astype(np.float32)[None, :]).astype(np.float32) + bias[:, None]
    plus = y.astype(np.float32) >= np.float32(out_threshold)  # [M, 2K+1]
    flip = np.where(scale < 0, -1, 1).astype(np.int64)
    thr = np.empty(scale.size, np.int64)
    for m in range(scale.size):
        fd = flip[m] * d
        hit = fd[plus[m]]
        # plus is monotone in flip*D: true exactly for flip*D >= min(hit); none true -> K+1
        thr[m] = hit.min() if hit.size else k + 1
        if hit.size and not np.array_equal(plus[m], fd >= thr[m]):
            raise AssertionError("sign threshold is not monotone")  # cannot happen for finite s, b
    return flip, thr


# ---------------------------------------------------------------------------------------------
# Schema (for onnx.checker) and function body (for onnxruntime)


def _schema():
    P = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        BINARY_CONV,
        DOMAIN,
        VERSION,
        doc=__doc__,
        inputs=[
            P("X", "T", "real-valued input, binarized inside the op"),
            P("Wbits", "B", "packed weight signs, bit 1 = -1, MSB first"),
            P("scale", "T", "per-output-channel multiplier"),
            P("bias", "T", "per-output-channel bias"),
        ],
        outputs=[P("Y", "T", "scale * integer dot product + bias")],
        type_constraints=[("T", ["tensor(float)"], "float32"), ("B", ["tensor(uint8)"], "packed bits")],
        attributes=[
            A("kernel_shape", AT.INTS, "kH, kW"),
            A("strides", AT.INTS, "sH, sW", required=False),
            A("dilations", AT.INTS, "dH, dW", required=False),
            A("pads", AT.INTS, "top, left, bottom, right", required=False),
            A("group", AT.INT, "groups", required=False),
            A("act_threshold", AT.FLOAT, "binarizer threshold: x >= t gives +1", required=False),
            A("pad_value", AT.FLOAT, "value of padded positions in the sign domain: 0, 1 or -1", required=False),
            A("out_sign", AT.INT, "1: binarize the output (+1 where Y >= out_threshold, else -1)", required=False),
            A("out_threshold", AT.FLOAT, "threshold of the output binarizer (out_sign=1)", required=False),
        ],
    )


_registered = False


def register_schemas():
    """Register the ``bdp`` schemas with onnx (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        onnx.defs.get_schema(BINARY_CONV, VERSION, DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(_schema())
    _registered = True


def _ref(name, attr_type, ref):
    a = onnx.AttributeProto()
    a.name = name
    a.type = attr_type
    a.ref_attr_name = ref
    return a


FUNCTION_MIN_OPSET = 18  # Pad with axes, BitwiseAnd


def binary_conv_function(opset=FUNCTION_MIN_OPSET) -> onnx.FunctionProto:
    """``bdp.BinaryConv`` as an ONNX function of standard ops, importing the default domain at
    OPSET (18 or newer: the model's own, which ONNX requires a function to share)."""
    AP = onnx.AttributeProto
    nodes = []

    def node(op, inputs, outputs, attrs=(), **kw):
        n = helper.make_node(op, inputs, outputs, **kw)
        n.attribute.extend(attrs)
        nodes.append(n)
        return n

    # binarize: +1 where X >= t else -1
    node("Constant", [], ["t"], [_ref("value_float", AP.FLOAT, "act_threshold")])
    node("CastLike", ["t", "X"], ["tx"])
    node("GreaterOrEqual", ["X", "tx"], ["ge"])
    node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    node("Constant", [], ["mone"], value=helper.make_tensor("mone", TensorProto.FLOAT, [], [-1.0]))
    node("Where", ["ge", "one", "mone"], ["xs"])
    # pad the signed tensor with pad_value on H and W
    node("Constant", [], ["pads"], [_ref("value_ints", AP.INTS, "pads")])
    node("Constant", [], ["pv"], [_ref("value_float", AP.FLOAT, "pad_value")])
    node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]))
    node("Pad", ["xs", "pads", "pv", "axes"], ["xp"], mode="constant")
    # unpack the weight bits: [M, B] -> [M, B, 8] -> [M, 8B] -> first K -> ±1 -> [M, C/g, kH, kW]
    node("Constant", [], ["shifts"], value=helper.make_tensor("shifts", TensorProto.UINT8, [8], [7, 6, 5, 4, 3, 2, 1, 0]))
    node("Constant", [], ["ax2"], value=helper.make_tensor("ax2", TensorProto.INT64, [1], [2]))
    node("Unsqueeze", ["Wbits", "ax2"], ["wb3"])
    node("BitShift", ["wb3", "shifts"], ["wsh"], direction="RIGHT")
    node("Constant", [], ["u1"], value=helper.make_tensor("u1", TensorProto.UINT8, [], [1]))
    node("BitwiseAnd", ["wsh", "u1"], ["wbit"])
    node("Shape", ["Wbits"], ["wshape"], start=0, end=1)
    node("Constant", [], ["m1"], value=helper.make_tensor("m1", TensorProto.INT64, [1], [-1]))
    node("Concat", ["wshape", "m1"], ["flat_shape"], axis=0)
    node("Reshape", ["wbit", "flat_shape"], ["wflat"])
    # K = (C / group) * kH * kW
    node("Shape", ["X"], ["c"], start=1, end=2)
    node("Constant", [], ["g"], [_ref("value_int", AP.INT, "group")])
    node("Div", ["c", "g"], ["cg"])
    node("Constant", [], ["ks"], [_ref("value_ints", AP.INTS, "kernel_shape")])
    node("Concat", ["cg", "ks"], ["kshape"], axis=0)
    node("ReduceProd", ["kshape"], ["k"], keepdims=1)
    node("Constant", [], ["z1"], value=helper.make_tensor("z1", TensorProto.INT64, [1], [0]))
    node("Constant", [], ["a1"], value=helper.make_tensor("a1", TensorProto.INT64, [1], [1]))
    node("Slice", ["wflat", "z1", "k", "a1"], ["wk"])
    node("Cast", ["wk"], ["wkf"], to=TensorProto.FLOAT)
    node("Constant", [], ["m2"], value=helper.make_tensor("m2", TensorProto.FLOAT, [], [-2.0]))
    node("Mul", ["wkf", "m2"], ["wk2"])
    node("Add", ["wk2", "one"], ["wpm"])
    node("Concat", ["wshape", "kshape"], ["wfull_shape"], axis=0)
    node("Reshape", ["wpm", "wfull_shape"], ["wsign"])
    node("CastLike", ["wsign", "X"], ["wsx"])
    node("Conv", ["xp", "wsx"], ["d"], [
        _ref("strides", AP.INTS, "strides"),
        _ref("dilations", AP.INTS, "dilations"),
        _ref("group", AP.INT, "group"),
    ])
    node("Constant", [], ["cshape"], value=helper.make_tensor("cshape", TensorProto.INT64, [4], [1, -1, 1, 1]))
    node("Reshape", ["scale", "cshape"], ["s4"])
    node("Reshape", ["bias", "cshape"], ["b4"])
    node("Mul", ["d", "s4"], ["ds"])
    node("Add", ["ds", "b4"], ["yf"])
    # out_sign: Y = yf >= out_threshold ? 1 : -1, else Y = yf
    node("Constant", [], ["ot"], [_ref("value_float", AP.FLOAT, "out_threshold")])
    node("CastLike", ["ot", "X"], ["otx"])
    node("GreaterOrEqual", ["yf", "otx"], ["yge"])
    node("Where", ["yge", "one", "mone"], ["ys"])
    node("Constant", [], ["osg"], [_ref("value_int", AP.INT, "out_sign")])
    node("Cast", ["osg"], ["osb"], to=TensorProto.BOOL)
    node("Where", ["osb", "ys", "yf"], ["Y"])
    return helper.make_function(
        DOMAIN,
        BINARY_CONV,
        ["X", "Wbits", "scale", "bias"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", max(FUNCTION_MIN_OPSET, int(opset)))],
        attributes=["kernel_shape", "strides", "dilations", "pads", "group", "act_threshold",
                    "pad_value", "out_sign", "out_threshold"],
    )


def make_binary_conv_node(name, inputs, output, *, kernel_shape, strides, dilations, pads, group,
                          act_threshold=0.0, pad_value=0.0, out_sign=0, out_threshold=0.0) -> onnx.NodeProto:
    """A ``bdp.BinaryConv`` node with every attribute set (the function body needs them all)."""
    return helper.make_node(
        BINARY_CONV,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        kernel_shape=list(kernel_shape),
        strides=list(strides),
        dilations=list(dilations),
        pads=list(pads),
        group=int(group),
        act_threshold=float(act_threshold),
        pad_value=float(pad_value),
        out_sign=int(out_sign),
        out_threshold=float(out_threshold),
    )


FUNCTIONS = {BINARY_CONV: binary_conv_function}


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make MODEL self-describing: opset import for ``bdp`` and a function body for each bdp op
    used, importing the model's own opset of the default domain (ONNX requires a function and its
    model to agree). A model older than opset 18 (what the function bodies need) is converted to
    18 first with ONNX's version converter, so its other nodes keep their meaning. Returns the
    model (MODEL itself, or the converted copy)."""
    register_schemas()
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    if not used:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), FUNCTION_MIN_OPSET)
    if opset < FUNCTION_MIN_OPSET:
        model = _upgrade_opset(model, FUNCTION_MIN_OPSET)
        opset = FUNCTION_MIN_OPSET
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    for op in sorted(used):
        model.functions.append(FUNCTIONS[op](opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model


def _upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """MODEL converted to default-domain opset VERSION (ONNX's version converter; the bdp nodes,
    of another domain, pass through); InputError where the converter cannot."""
    from onnx import version_converter

    from bdp.errors import InputError

    try:
        return version_converter.convert_version(model, version)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # what the C++ converter raises
        raise InputError(f"cannot convert the model from its opset to {version} for the bdp function bodies "
                         f"({str(e).strip().splitlines()[0][:160]}); export with opset_version>={version}") from None
