"""Packed-bit kernels in TVM TE: the compute definitions of bdp's binary ops.

``bdp.BinaryConv`` lowers to three stages (see :mod:`bdp.passes.ops` for the op's arithmetic):

1. **pack**: binarize the float NCHW input and pack 64 channels per uint64 word, NHWC with the
   channel words innermost, padded spatially: ``Xp[n, g, hp, wp, cw]``. Bit 1 means -1. Padded
   positions and the unused bits of the last word are 0 (the +1 pattern).
2. **popcount**: ``P[n, m, oh, ow] = sum_{r, s, cw} popcount(Xp[...] ^ Wp[m, r, s, cw])`` over
   every tap, the padded ones included (they read as +1).
3. **epilogue**: ``Y = scale[m] * (Cg*kH*kW - 2*P + corr[m, oh, ow]) + bias[m]``. ``Cg*kH*kW - 2*P``
   is the dot product of the signs with the border read as +1; ``corr`` fixes the border taps to
   the op's ``pad_value`` v: each padded tap adds ``(v - 1) * sum_c wsign[m, c, r, s]`` (computed
   from a [M, kH, kW] constant, so zero padding is exact at every border, stride and dilation).

The integer ``D = Cg*kH*kW - 2*P + corr`` is exact; the only float operation is the final
multiply-add, so outputs agree with any float implementation to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from bdp.passes.ops import unpack_signs

WORD = 64


@dataclass
class BinaryConvParams:
    """Everything the kernel needs, derived from one ``bdp.BinaryConv`` node."""

    n: int
    c: int
    h: int
    w: int
    m: int
    kh: int
    kw: int
    strides: tuple
    dilations: tuple
    pads: tuple  # top, left, bottom, right
    group: int
    act_threshold: float
    pad_value: float

    @property
    def cg(self):
        return self.c // self.group

    @property
    def cw(self):
        return (self.cg + WORD - 1) // WORD

    @property
    def out_hw(self):
        t, l, b, r = self.pads
        oh = (self.h + t + b - self.dilations[0] * (self.kh - 1) - 1) // self.strides[0] + 1
        ow = (self.w + l + r - self.dilations[1] * (self.kw - 1) - 1) // self.strides[1] + 1
        return oh, ow

    @property
    def needs_corr(self):
        return self.pad_value != 1.0 and any(self.pads)


def pack_weights(wbits: np.ndarray, p: BinaryConvParams):
    """(Wp uint64 [M, kH, kW, CW], corr_tap int32 [M, kH, kW]) from the op's packed weight rows."""
    wsign = unpack_signs(wbits, (p.m, p.cg, p.kh, p.kw))  # ±1 float
    neg = (wsign < 0).transpose(0, 2, 3, 1)  # [M, kH, kW, Cg]
    padded = np.zeros((p.m, p.kh, p.kw, p.cw * WORD), dtype=bool)
    padded[..., : p.cg] = neg
    bits = padded.reshape(p.m, p.kh, p.kw, p.cw, WORD).astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(WORD, dtype=np.uint64))
    wp = (bits * weights).sum(axis=-1, dtype=np.uint64)
    tap_sum = wsign.sum(axis=1).astype(np.int64)  # [M, kH, kW]: sum_c wsign
    corr_tap = ((p.pad_value - 1.0) * tap_sum).astype(np.int32)
    return wp, corr_tap


def binary_conv_te(X, Wp, scale, bias, corr_tap, p: BinaryConvParams):
    """TE compute of the three stages; returns the float32 output tensor [N, M, OH, OW]."""
    t, l, b, r = p.pads
    hp, wpd = p.h + t + b, p.w + l + r
    oh, ow = p.out_hw
    cg, group = p.cg, p.group
    mg = p.m // group
    thr = tirx.const(p.act_threshold, "float32")

    kb = te.reduce_axis((0, WORD), name="kb")

    def pack(n, g, hh, ww, cw):
        c = cw * WORD + kb
        ih, iw = hh - t, ww - l
        valid = tirx.all(c < cg, ih >= 0, ih < p.h, iw >= 0, iw < p.w)
        cc = te.min(g * cg + c, p.c - 1)
        ihc = te.max(te.min(ih, p.h - 1), 0)
        iwc = te.max(te.min(iw, p.w - 1), 0)
        neg = tirx.all(valid, X[n, cc, ihc, iwc] < thr)
        one = tirx.const(1, "uint64")
        return te.sum(tirx.Select(neg, one << kb.astype("uint64"), tirx.const(0, "uint64")), axis=kb)

    Xp = te.compute((p.n, group, hp, wpd, p.cw), pack, name="bdp_pack")

    rr = te.reduce_axis((0, p.kh), name="r")
    rs = te.reduce_axis((0, p.kw), name="s")
    rc = te.reduce_axis((0, p.cw), name="cw")
    sh, sw = p.strides
    dh, dw = p.dilations

    def popc(n, m, y, x):
        v = Xp[n, m // mg, y * sh + rr * dh, x * sw + rs * dw, rc] ^ Wp[m, rr, rs, rc]
        return te.sum(tirx.popcount(v).astype("int32"), axis=[rr, rs, rc])

    P = te.compute((p.n, p.m, oh, ow), popc, name="bdp_popcount")
    total = cg * p.kh * p.kw

    if p.needs_corr:
        cr = te.reduce_axis((0, p.kh), name="cr")
        cs = te.reduce_axis((0, p.kw), name="cs")

        def corr(m, y, x):
            ih = y * sh + cr * dh
            iw = x * sw + cs * dw
            outside = tirx.any(ih < t, ih >= t + p.h, iw < l, iw >= l + p.w)
            return te.sum(tirx.Select(outside, corr_tap[m, cr, cs], tirx.const(0, "int32")), axis=[cr, cs])

        C = te.compute((p.m, oh, ow), corr, name="bdp_corr")

        def epi(n, m, y, x):
            d = total - 2 * P[n, m, y, x] + C[m, y, x]
            return scale[m] * d.astype("float32") + bias[m]
    else:

        def epi(n, m, y, x):
            d = total - 2 * P[n, m, y, x]
            return scale[m] * d.astype("float32") + bias[m]

    return te.compute((p.n, p.m, oh, ow), epi, name="bdp_binary_conv")
