"""bdp's legalizations of Relax operators that TOPI lowers wastefully."""

from __future__ import annotations

def legalize_conv2d_transpose(bb, call):
    """conv2d_transpose whose kernel equals its stride (no padding, groups 1): every input pixel
    makes its own kH x kW output block, so it is kH*kW 1x1 convs (one per output phase, all
    reading the input as it lies) and an interleave - instead of TOPI's conv over a zero-dilated
    input, which multiplies by zero for 1 - 1/(sH*sW) of its work. Any other case: TOPI's."""
    from tvm import te
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d_transpose

    a = call.attrs
    try:
        kshape = [int(v) for v in call.args[1].ty.shape.values]
        ok = (a.data_layout == "NCHW" and a.kernel_layout == "IOHW" and a.out_layout == "NCHW"
              and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
              and all(int(q) == 0 for q in a.padding) and all(int(o) == 0 for o in a.output_padding)
              and [int(v) for v in a.strides] == kshape[2:])
    except (AttributeError, TypeError, ValueError, IndexError):  # attributes of another form: TOPI's
        ok = False
    if not ok:
        return _nn_conv2d_transpose(bb, call)
    out_dtype = str(call.ty.dtype)

    def te_fn(data, kernel):
        n, c, h, w = data.shape
        _, f, kh, kw = kernel.shape
        rc = te.reduce_axis((0, c), name="rc")
        phase = te.compute(
            (n, f, kh, kw, h, w),
            lambda b, o, p, q, i, j: te.sum(data[b, rc, i, j].astype(out_dtype) * kernel[rc, o, p, q].astype(out_dtype),
                                            axis=rc),
            name="conv2d_transpose_phase")
        return te.compute((n, f, h * kh, w * kw),
                          lambda b, o, y, x: phase[b, o, y % kh, x % kw, y // kh, x // kw],
                          name="conv2d_transpose_interleave")

    return bb.call_te(te_fn, call.args[0], call.args[1], primfunc_name_hint="conv2d_transpose")


PAD_POSITIONS = True


def legalize_conv2d(spec):
    """The conv2d legalization for CPU SPEC: TOPI's, except for an NCHW float conv whose
    channel tiles (:mod:`bdp.targets.schedules.float_tile`) would end in a partial tile of
    output positions - odd sizes such as 7x7, 13x13, 13x17. Such a conv is computed over its
    positions (rows x columns, in the bands the tiles use) padded up to whole tiles, from an
    input padding stage with the few extra zero rows those positions read, then cropped: every
    tile runs the same straight code, with no bounds check on any position (a partial tile's
    checks stay inside the reduction loops, and LLVM hoists them out only sometimes: 2x slower
    when it does not). The conv block carries its tile as the annotation
    ``bdp.channel_tile = (uv, xt)``. Not on targets that compute such a conv with vectors over
    its output columns (:func:`bdp.targets.schedules.float_cpu.columns_first`, rows of whole
    vectors)."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    from .float_cpu import columns_first
    from .float_tile import CHANNEL_TILE_ATTR, conv_tile_plan
    from .tir_util import choose_vec

    lanes, regs = spec.vector_lanes(32), spec.vector_registers

    def legalize(bb, call):
        a = call.attrs
        try:
            n, c, h, w = (int(v) for v in call.args[0].ty.shape.values)
            m, cg, kh, kw = (int(v) for v in call.args[1].ty.shape.values)
            sh, sw = (int(v) for v in a.strides)
            dh, dw = (int(v) for v in a.dilation)
            pt, pl, pb, pr = (int(v) for v in a.padding)
            ok = (a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and a.out_layout == "NCHW"
                  and int(a.groups) == 1 and cg == c and str(call.args[0].ty.dtype) == "float32"
                  and str(call.args[1].ty.dtype) == "float32" and str(call.ty.dtype) == "float32")
        except (AttributeError, TypeError, ValueError):  # symbolic shapes, other attributes: TOPI's
            ok = False
        if not ok or m % lanes or not PAD_POSITIONS:
            return _nn_conv2d(bb, call)
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        xv = choose_vec(ow, lanes)
        if columns_first(spec, c * kh * kw, m) and xv is not None and xv >= lanes:
            return _nn_conv2d(bb, call)  # vectors over its output columns, no channel tiles
        uv, xt, nb = conv_tile_plan(n, m, oh, ow, c * kh * kw, lanes, regs, padded=True)
        if uv is None or (oh // nb * ow) % xt == 0:
            return _nn_conv2d(bb, call)
        rows = oh // nb
        pband = -(-(rows * ow) // xt) * xt
        last_row = (nb - 1) * rows + (pband - 1) // ow  # the padded positions' last output row
        hp = max(h + pt + pb, last_row * sh + dh * (kh - 1) + 1)
        wp = w + pl + pr

        def te_fn(data, kernel):
            from tvm import te, tirx

            pad = te.compute(
                (n, c, hp, wp),
                lambda b, ci, y, x: tirx.if_then_else(
                    tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w), data[b, ci, y - pt, x - pl],
                    tirx.const(0.0, "float32")), name="pad_temp")
            rc = te.reduce_axis((0, c), name="rc")
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            conv = te.compute(
                (n, m, nb, pband),
                lambda b, k, band, p: te.sum(
                    pad[b, rc, (band * rows + p // ow) * sh + ry * dh, p % ow * sw + rx * dw] * kernel[k, rc, ry, rx],
                    axis=[rc, ry, rx]),
                name="conv2d_nchw_padded", attrs={CHANNEL_TILE_ATTR: [uv, xt]})
            return te.compute((n, m, oh, ow), lambda b, k, y, x: conv[b, k, y // rows, y % rows * ow + x],
                              name="conv2d_nchw")

        return bb.call_te(te_fn, call.args[0], call.args[1], primfunc_name_hint="conv2d")

    return legalize


def legalize_softmax(bb, call):
    """float32 softmax as onnxruntime computes it (MLAS: the sum's reciprocal once per position,
    every element multiplied by it) instead of TOPI's divide of every element by the sum: a vector
    divide is 7-18 cycles a vector on AVX2 and the Cortex-A72 against one for a multiply, and
    MTI-Net's softmax over its tasks divided each of T elements per position (3.7 ms of bi-mtdp's
    estimated 84 on a Pi 4). The round-off is onnxruntime's (one rounding more than a divide).
    Other dtypes: TOPI's."""
    import tvm
    from tvm import te
    from tvm.relax.transform.legalize_ops.nn import _nn_softmax

    dtype = str(call.ty.dtype)
    if dtype != "float32":
        return _nn_softmax(bb, call)
    axis = int(call.attrs.axis)

    def te_fn(data):
        shape = list(data.shape)
        ax = axis % len(shape)
        reduced = [d for i, d in enumerate(shape) if i != ax]

        def full(idx, k):
            return tuple(idx[:ax]) + (k,) + tuple(idx[ax:])

        def part(idx):
            return tuple(v for i, v in enumerate(idx) if i != ax)

        k1 = te.reduce_axis((0, shape[ax]), name="k")
        k2 = te.reduce_axis((0, shape[ax]), name="k")
        mx = te.compute(reduced, lambda *i: te.max(data[full(i, k1)], axis=k1), name="T_softmax_maxelem")
        ex = te.compute(shape, lambda *i: te.exp(data[i] - mx[part(i)]), name="T_softmax_exp")
        sm = te.compute(reduced, lambda *i: te.sum(ex[full(i, k2)], axis=k2), name="T_softmax_expsum")
        rc = te.compute(reduced, lambda *i: tvm.tirx.const(1.0, dtype) / sm[i], name="T_softmax_recip")
        return te.compute(shape, lambda *i: ex[i] * rc[part(i)], name="T_softmax_norm", attrs={"axis": ax})

    return bb.call_te(te_fn, call.args[0], primfunc_name_hint="softmax")
