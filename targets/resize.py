"""Integer-factor up-sampling (the decoders' Resize) as cheap, separable TE computes.

Dense-prediction decoders up-sample by 2, 4 or 8 all the time (bilinear ``half_pixel``, the
PyTorch default ``align_corners=False``; nearest with ``asymmetric``/``floor``, PyTorch's
``mode="nearest"``). TVM's generic ``resize2d`` recomputes the source coordinate, its floor,
clamps and weights for every output value; here, for an integer factor s, output index
``o = s*i + p`` has the fixed phase weights of ``p``, and bilinear is separable:

1. columns, on the input rows: ``T[n, c, y, ox] = (1 - wx) * X[n, c, y, x0] + wx * X[n, c, y, x1]``
   (the gathering stage, run on H rows rather than s*H),
2. rows: ``Y[n, c, oy, ox] = (1 - wy) * T[n, c, y0, ox] + wy * T[n, c, y1, ox]``, a contiguous
   vector blend along ox (``y0``, ``y1``, ``wy`` are per-row scalars).

At the border the source index is clamped to the edge exactly as ONNX ``Resize`` (linear) and
PyTorch ``interpolate`` do. The weights are the same numbers onnxruntime uses; the sums are
formed in a different order, so results agree to float round-off.

Anything else (other modes and coordinate transforms, non-integer or down-scaling factors,
cubic) goes through TVM's own converter.
"""

from __future__ import annotations

import numpy as np


def integer_factors(in_hw, out_hw):
    """(sH, sW) if OUT is an integer multiple (>= 1) of IN in both axes, else None."""
    f = []
    for i, o in zip(in_hw, out_hw):
        if i <= 0 or o % i:
            return None
        f.append(o // i)
    return tuple(f) if all(s >= 1 for s in f) and any(s > 1 for s in f) else None


def _phase_table(s: int, n_in: int):
    """Per output index o in [0, s*n_in): (i0, i1, w) with out = (1-w)*in[i0] + w*in[i1],
    half_pixel source coordinate ``(o + 0.5)/s - 0.5`` clamped to [0, n_in - 1]."""
    o = np.arange(s * n_in, dtype=np.float64)
    src = np.clip((o + 0.5) / s - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    return i0, i1, w


def bilinear_te(X, factors):
    """TE of a half_pixel bilinear up-sampling of X [N, C, H, W] by integer FACTORS (sH, sW)."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in X.shape)
    sh, sw = factors
    oh, ow = h * sh, w * sw

    def axis_terms(o, s, size):
        # source coordinate (o + 0.5)/s - 0.5 = i + f_p with i = o // s, p = o % s
        p = o % s
        i = o // s
        f = (p.astype("float32") + tirx.const(0.5, "float32")) / tirx.const(float(s), "float32") \
            - tirx.const(0.5, "float32")
        neg = f < tirx.const(0.0, "float32")
        lo = tirx.Select(neg, i - 1, i)
        wt = tirx.Select(neg, f + tirx.const(1.0, "float32"), f)
        i0 = te.max(lo, 0)
        i1 = te.min(lo + 1, size - 1)
        # below the first sample the coordinate clamps to 0: weight on in[0] only
        wt = tirx.Select(lo < 0, tirx.const(0.0, "float32"), wt)
        return i0, i1, wt

    # columns first, on the H input rows (the gathering stage, s_W times fewer values than on
    # the output rows), then rows: contiguous vector blends of two column-scaled rows. The column
    # stage is laid out [N, C, H, W, sW], phase innermost (the same memory as [N, C, H, sW*W]):
    # a vector over the phases of one input column reads its three neighbours as broadcasts and
    # picks per lane (phase) which two it blends - the source indices never vary across a vector,
    # so there is no gather; the values are exactly those of axis_terms' form
    if sw > 1:
        def cols(b, ch, y, i, p):
            f = (p.astype("float32") + tirx.const(0.5, "float32")) / tirx.const(float(sw), "float32") \
                - tirx.const(0.5, "float32")
            neg = f < tirx.const(0.0, "float32")  # phase left of its column: blends i-1 and i
            xm = X[b, ch, y, te.max(i - 1, 0)]
            x0 = X[b, ch, y, i]
            xp = X[b, ch, y, te.min(i + 1, w - 1)]
            a = tirx.Select(neg, xm, x0)
            wt = tirx.Select(neg, f + tirx.const(1.0, "float32"), f)
            wt = tirx.Select(tirx.all(neg, i == 0), tirx.const(0.0, "float32"), wt)  # clamped to in[0]
            return a + wt * (tirx.Select(neg, x0, xp) - a)

        T5 = te.compute((n, c, h, w, sw), cols, name="bdp_resize_cols")

        def tread(b, ch, y, x):
            return T5[b, ch, y, x // sw, x % sw]
    else:
        def tread(b, ch, y, x):
            return X[b, ch, y, x]

    def rows(b, ch, y, x):
        y0, y1, wy = axis_terms(y, sh, h)
        a = tread(b, ch, y0, x)
        return a + wy * (tread(b, ch, y1, x) - a)

    if sh == 1:
        return te.compute((n, c, oh, ow), tread, name="bdp_resize_cols_flat")
    return te.compute((n, c, oh, ow), rows, name="bdp_resize_rows")


def nearest_te(X, factors):
    """TE of nearest up-sampling (asymmetric coordinates, floor) by integer FACTORS."""
    from tvm import te

    n, c, h, w = (int(d) for d in X.shape)
    sh, sw = factors
    return te.compute((n, c, h * sh, w * sw), lambda b, ch, y, x: X[b, ch, y // sh, x // sw],
                      name="bdp_resize_nearest")


def fast_case(attr, in_shape, out_hw):
    """"linear" / "nearest" when the Resize is one bdp computes itself, else None."""
    def s(key, default):
        v = attr.get(key, default)
        return v.decode("ascii") if isinstance(v, bytes) else v

    if len(in_shape) != 4 or integer_factors(in_shape[2:], out_hw) is None:
        return None
    if int(attr.get("antialias", 0)):
        return None
    mode = s("mode", "nearest")
    coord = s("coordinate_transformation_mode", "half_pixel")
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel"):
        return "linear"
    if mode == "nearest" and coord == "asymmetric" and s("nearest_mode", "round_prefer_floor") == "floor":
        return "nearest"
    return None


def resize_converter():
    """A Relax ONNX ``Resize`` converter: bdp's TE for the fast cases, TVM's otherwise."""
    import tvm
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    base = fe.Resize

    class FastResize(base):
        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            x = inputs[0]
            try:
                in_shape = [int(d) for d in x.ty.shape]
            except (TypeError, ValueError, AttributeError):  # a dynamic shape: TVM's converter
                return base._impl_v18(bb, inputs, attr, params)
            scales = fe.get_constant(inputs[2], params) if len(inputs) > 2 and inputs[2] is not None else None
            sizes = fe.get_constant(inputs[3], params) if len(inputs) > 3 and inputs[3] is not None else None
            out_hw = None
            if isinstance(scales, tvm.ir.GenericConst) and scales.value.numpy().size == 4:
                sc = scales.value.numpy().astype(np.float64)
                if sc[0] == 1 and sc[1] == 1 and np.all(sc[2:] == np.round(sc[2:])):
                    out_hw = [int(round(d * f)) for d, f in zip(in_shape[2:], sc[2:])]
            elif isinstance(sizes, tvm.ir.GenericConst) and sizes.value.numpy().size == 4:
                sz = [int(v) for v in sizes.value.numpy()]
                if sz[:2] == in_shape[:2]:
                    out_hw = sz[2:]
            roi = inputs[1] if len(inputs) > 1 else None
            roi_const = fe.get_constant(roi, params) if roi is not None else None
            if roi_const is not None and not isinstance(roi_const, tvm.ir.GenericConst):
                out_hw = None  # a dynamic ROI: leave it to TVM
            kind = fast_case(attr, in_shape, out_hw) if out_hw is not None else None
            if kind is None:
                return base._impl_v18(bb, inputs, attr, params)
            factors = integer_factors(in_shape[2:], out_hw)
            fn = bilinear_te if kind == "linear" else nearest_te
            return bb.emit_te(lambda X: fn(X, factors), x, primfunc_name_hint=f"bdp_resize_{kind}")

    return FastResize
