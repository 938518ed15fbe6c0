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
