"""Packed-bit kernels in TVM TE: the compute definitions of bdp's binary ops.

``bdp.BinaryConv`` lowers to three (or four) stages, all in one PrimFunc (see
:mod:`bdp.passes.ops` for the op's arithmetic):

1. **pack** (``bdp_pack``): binarize the float NCHW input and pack the channels of a group into
   words of ``p.word`` bits (64; or 32/16/8 for groups narrow enough that a smaller word wastes
   clearly fewer bits, e.g. 32 channels -> uint32, 16 -> uint16, depthwise -> uint8):
   ``Xu[n, g, cw, h, w]``, bit ``b`` of word ``cw`` is channel ``word*cw + b`` of group ``g``;
   bit 1 means -1 (``not x >= act_threshold``), bit 0 means +1. The unused bits of a group's last
   word are 0. Rows of words are contiguous along ``w``, so the pack is a vectorized loop over
   ``w`` reading the float rows as they lie in memory.
2. **pad** (``bdp_pad``, only when the conv pads or strides along W): the packed words padded
   spatially with 0 words (the +1 pattern) and split by column phase,
   ``Xp[n, g, cw, hp, ph, q] = padded[n, g, cw, hp, q*sW + ph]``, so that the taps of consecutive
   output columns ``x*sW + s*dW`` are consecutive words for every stride
   (``q = x + (s*dW) // sW``, ``ph = (s*dW) % sW``). The words are 8-64x fewer than the floats.
3. **popcount** (``bdp_popcount``): ``P[n, m, oh, ow] = sum_{r, s, cw} popcount(Xp[...] ^
   Wp[r, s, cw, m])`` over every tap, padded ones included (they read as +1); int64 for 64-bit
   words (``vpopcntq`` results add without conversion), int32/int16 for narrower ones. The
   weights ``Wp[kH, kW, CW, M]`` have the output channel innermost, so a run of output channels
   is one vector load and one output channel is one scalar load.
4. **epilogue** (``bdp_binary_conv``): ``Y = scale[m] * D + bias[m]`` with the exact integer
   ``D = Dt - 2*P``. ``Dt`` is ``Cg*kH*kW`` plus the border correction: every padded tap was read
   as +1 and must be read as ``pad_value`` v, which adds ``(v - 1) * sum_c wsign[m, c, r, s]``. The
   set of padded taps of an output position only depends on its row's class (which kernel rows
   fall outside the input) and its column's class, so the correction is a small table
   ``Dt[row class, column class, M]`` (int16, or int32 if needed; computed at compile time) and
   the classes are compile-time ``Select`` chains on ``oh`` and ``ow``: no gather, exact at every
   border, stride and dilation. With ``pad_value`` 1 or no padding there is no table.

The only float operation is the final multiply-add, so outputs agree with any float
implementation of the op to round-off. The compute is target-independent; the schedules
(:mod:`bdp.targets.schedules`) tile the popcount stage into registers and fuse the epilogue
into it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from tvm import te, tirx

from bdp.passes.ops import unpack_signs

WORD = 64
BDP_KERNEL_ATTR = "bdp.kernel"  # PrimFunc attribute of bdp's kernels: "binary_conv" or "pack"


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
    in_packed: bool = False  # X is packed bits uint8 [N, ceil(C/8), H, W] from another binary conv
    in_words: bool = False  # X is this kernel's packed words [N, G, CW, H, W], made by its own
    # pack function (:func:`pack_te`) that Relax fuses with the producers (resize, concatenation)
    out_mode: str = "float"  # "float": scale*D + bias; "sign": ±1 float; "bits": packed uint8
    word_bits: int = 0  # bits per packed word chosen for the target (:func:`bdp.targets.schedules.binary_word`);
    # 0: the target-independent rule of ``word``

    @property
    def k(self):
        """|D| <= K: taps per output value."""
        return self.cg * self.kh * self.kw

    @property
    def cg(self):
        return self.c // self.group

    @property
    def mg(self):
        return self.m // self.group

    @property
    def word(self):
        """Bits per packed word: ``word_bits`` when the target chose it, else 64, or 32/16/8 when
        that saves enough padding bits on a narrow group (fewer lanes per word are worth a little
        less: the weights below)."""
        if self.word_bits:
            return self.word_bits
        return self.default_word

    @property
    def default_word(self):
        eff = {64: 1.0, 32: 0.9, 16: 0.8, 8: 0.7}
        return min((-(-self.cg // b) * b / eff[b], -b, b) for b in eff)[2]

    @property
    def pack_bits(self):
        """Bits the pack stage fills per word (fewer than ``word`` for a group narrower than it)."""
        return min(self.word, self.cg) if self.cw == 1 else self.word

    @property
    def cw(self):
        return (self.cg + self.word - 1) // self.word

    @property
    def popcount_bits(self):
        """Bits one output's popcount reads: every tap's words, the unused bits of a group's last
        word included (they are 0 in both operands)."""
        return self.cw * self.word * self.kh * self.kw

    @property
    def word_dtype(self):
        return f"uint{self.word}"

    @property
    def acc_dtype(self):
        """Popcount accumulator: int64 for 64-bit words (vpopcntq adds), else the narrowest exact."""
        if self.word == 64:
            return "int64"
        if self.depthwise and self.kh * self.kw < 256:
            return "uint8"  # depthwise: at most kH*kW ones are added, no popcount (see popc)
        if self.word <= 16 and self.popcount_bits < 2 ** 15:
            return "int16"
        return "int32"

    @property
    def padded_hw(self):
        t, l, b, r = self.pads
        return self.h + t + b, self.w + l + r

    @property
    def out_hw(self):
        hp, wp = self.padded_hw
        oh = (hp - self.dilations[0] * (self.kh - 1) - 1) // self.strides[0] + 1
        ow = (wp - self.dilations[1] * (self.kw - 1) - 1) // self.strides[1] + 1
        return oh, ow

    @property
    def depthwise(self):
        """One input channel per group: taps are 0/1 bytes added along whole rows (no popcount)."""
        return self.cg == 1

    @property
    def ow_padded(self):
        """Output columns the popcount stage computes: depthwise rows are rounded up to whole
        vectors of 32 (16 for narrow rows) bytes; the extra columns read padding and are dropped."""
        _, ow = self.out_hw
        if not self.depthwise:
            return ow
        v = 16 if ow <= 16 else 32
        return -(-ow // v) * v

    @property
    def needs_pad_stage(self):
        return any(self.pads) or self.strides[1] != 1 or self.ow_padded != self.out_hw[1]

    @property
    def needs_corr(self):
        return self.pad_value != 1.0 and any(self.pads)

    @property
    def binary_macs(self):
        oh, ow = self.out_hw
        return self.n * self.m * oh * ow * self.cg * self.kh * self.kw

    def __post_init__(self):
        if self.word_bits not in (0, 8, 16, 32, 64):
            raise ValueError(f"word_bits {self.word_bits}: expected 0, 8, 16, 32 or 64")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "BinaryConvParams":
        d = json.loads(s)
        for k in ("strides", "dilations", "pads"):
            d[k] = tuple(d[k])
        return cls(**d)


def _outside_patterns(n_out, n_taps, stride, dil, lo, size):
    """Per output index: the tuple of taps that fall outside [lo, lo + size) of the padded axis."""
    return [tuple(not (lo <= o * stride + k * dil < lo + size) for k in range(n_taps)) for o in range(n_out)]


def border_classes(p: BinaryConvParams):
    """(row_class[oh], row_patterns, col_class[ow], col_patterns): class 0 is the most common one."""
    oh, ow = p.out_hw
    t, l, _, _ = p.pads

    def classify(pats):
        counts = {}
        for q in pats:
            counts[q] = counts.get(q, 0) + 1
        order = sorted(counts, key=lambda q: (-counts[q], pats.index(q)))
        index = {q: i for i, q in enumerate(order)}
        return [index[q] for q in pats], order

    rc, rpat = classify(_outside_patterns(oh, p.kh, p.strides[0], p.dilations[0], t, p.h))
    cc, cpat = classify(_outside_patterns(ow, p.kw, p.strides[1], p.dilations[1], l, p.w))
    return rc, rpat, cc, cpat


def pack_weights(wbits: np.ndarray, p: BinaryConvParams):
    """(Wp [kH, kW, CW, M] of ``p.word_dtype``, Dt int16/int32 [row classes, column classes, M] or None).

    ``Wp[r, s, cw, m]`` bit ``b`` is 1 where weight ``(m, word*cw + b, r, s)`` is -1 (channel
    index within m's group); ``Dt`` is ``Cg*kH*kW`` plus the padded-tap correction per border
    class.
    """
    wsign = unpack_signs(wbits, (p.m, p.cg, p.kh, p.kw))  # ±1 float
    neg = (wsign < 0).transpose(2, 3, 1, 0)  # [kH, kW, Cg, M]
    word = p.word
    padded = np.zeros((p.kh, p.kw, p.cw * word, p.m), dtype=np.uint64)
    padded[:, :, : p.cg, :] = neg
    bits = padded.reshape(p.kh, p.kw, p.cw, word, p.m)
    shifts = np.arange(word, dtype=np.uint64).reshape(1, 1, 1, word, 1)
    wp = np.bitwise_or.reduce(np.left_shift(bits, shifts), axis=3).astype(p.word_dtype)
    if not p.needs_corr:
        return np.ascontiguousarray(wp), None
    tap_sum = wsign.sum(axis=1).astype(np.int64)  # [M, kH, kW]: sum_c wsign
    corr_tap = np.rint((p.pad_value - 1.0) * tap_sum).astype(np.int64)
    _, rpat, _, cpat = border_classes(p)
    total = p.cg * p.kh * p.kw
    dt = np.empty((len(rpat), len(cpat), p.m), dtype=np.int64)
    for i, rp in enumerate(rpat):
        for j, cp in enumerate(cpat):
            out = np.logical_or(np.array(rp)[:, None], np.array(cp)[None, :])  # [kH, kW]
            dt[i, j] = total + (corr_tap * out[None]).sum(axis=(1, 2))
    small = np.abs(dt).max() < 2 ** 15
    return np.ascontiguousarray(wp), dt.astype(np.int16 if small else np.int32)


def threshold_dtype(p: BinaryConvParams) -> str:
    """Integer type of the popcount thresholds of P: its accumulator's (int16 for the byte counts
    of depthwise convs, which are compared widened)."""
    return "int16" if p.acc_dtype == "uint8" else p.acc_dtype


def popcount_thresholds(flip, tt, dt, p: BinaryConvParams):
    """(A, inv): the ±1 / packed-bit output test ``flip[m] * D >= T[m]`` (:func:`bdp.passes.ops.
    sign_thresholds`) on ``D = Dt - 2*P`` restated on the popcount P itself, so the kernel
    compares its integer counts with no conversion:

    - flip +1: ``Dt - 2P >= T``  <=>  ``P <= floor((Dt - T) / 2)``;
    - flip -1: ``2P - Dt >= T``  <=>  ``P >= ceil((T + Dt) / 2)``  <=>  not ``P <= ceil(...) - 1``.

    So the output is +1 exactly when ``(P <= A[row class, column class, m]) != inv[m]``, with
    ``Dt`` the border table of :func:`pack_weights` (or ``Cg*kH*kW`` everywhere when it is None:
    A then has one class). A is clamped to [-1, popcount_bits] (P's range: the test is the same)
    and typed :func:`threshold_dtype`; inv is uint8 0/1."""
    total = p.cg * p.kh * p.kw
    base = dt.astype(np.int64) if dt is not None else np.full((1, 1, p.m), total, np.int64)
    flip = np.asarray(flip, np.int64).reshape(1, 1, -1)
    tt = np.asarray(tt, np.int64).reshape(1, 1, -1)
    a = np.where(flip > 0, np.floor_divide(base - tt, 2), -np.floor_divide(-(tt + base), 2) - 1)
    a = np.clip(a, -1, p.popcount_bits)
    return np.ascontiguousarray(a.astype(threshold_dtype(p))), (flip.reshape(-1) < 0).astype(np.uint8)


def _class_select(var, classes):
    """A Select chain mapping index VAR to its class (class 0 for every index not listed)."""
    expr = tirx.const(0, "int32")
    by_class = {}
    for i, k in enumerate(classes):
        if k:
            by_class.setdefault(k, []).append(i)
    for k, idx in sorted(by_class.items(), reverse=True):
        cond = tirx.any(*[var == i for i in idx]) if len(idx) > 1 else var == idx[0]
        expr = tirx.Select(cond, tirx.const(k, "int32"), expr)
    return expr


def packed_channels(c: int) -> int:
    """Bytes per pixel of a packed-bit tensor of C channels."""
    return -(-c // 8)


def pack_te(X, p: BinaryConvParams):
    """The pack stage: X (float [N, C, H, W] binarized at ``act_threshold``, or packed bits when
    ``in_packed``) as words [N, G, CW, H, W] of ``word_dtype``, channel ``c*word + k`` of group
    g in bit k, bit 1 meaning -1, the bits past the group's channels 0."""
    cg, group, cw = p.cg, p.group, p.cw
    thr = tirx.const(p.act_threshold, "float32")
    word, wdt = p.word, p.word_dtype
    u0 = tirx.const(0, wdt)

    kb = te.reduce_axis((0, p.pack_bits), name="kb")
    ragged = cg % p.pack_bits != 0

    def pack(n, g, c, y, x):
        ch = c * word + kb
        src = X[n, te.min(g * cg + ch, p.c - 1) if ragged else g * cg + ch, y, x]
        neg = tirx.Not(src >= thr)  # NaN packs as -1 like the reference's where(x >= t, 1, -1)
        if ragged:
            neg = tirx.all(ch < cg, neg)
        return te.sum(tirx.Select(neg, tirx.const(1, wdt) << kb.astype(wdt), u0), axis=kb)

    nbytes = packed_channels(p.c)
    if p.in_packed and cg % 8 == 0 and word >= 8:
        # byte-aligned groups: a word is its bytes side by side (little-endian bit order)
        kb = te.reduce_axis((0, word // 8), name="kb")
        ragged_b = (cg // 8) % (word // 8) != 0

        def pack(n, g, c, y, x):  # noqa: F811
            byte = c * (word // 8) + kb
            src = X[n, te.min(g * (cg // 8) + byte, nbytes - 1) if ragged_b else g * (cg // 8) + byte, y, x]
            v = src.astype(wdt) << (kb * 8).astype(wdt)
            if ragged_b:
                v = tirx.Select(byte < cg // 8, v, u0)
            return te.sum(v, axis=kb)
    elif p.in_packed:
        def pack(n, g, c, y, x):  # noqa: F811
            ch = c * word + kb
            gch = g * cg + ch
            src = X[n, te.min(gch // 8, nbytes - 1), y, x]
            bit = (src >> (gch % 8).astype("uint8")) & tirx.const(1, "uint8")
            neg = bit == tirx.const(1, "uint8")
            if ragged:
                neg = tirx.all(ch < cg, neg)
            return te.sum(tirx.Select(neg, tirx.const(1, wdt) << kb.astype(wdt), u0), axis=kb)

    return te.compute((p.n, group, cw, p.h, p.w), pack, name="bdp_pack")


def binary_conv_te(X, Wp, scale, bias, Dt, p: BinaryConvParams, thresholds=None):
    """TE compute of the stages; returns the output tensor: float32 [N, M, OH, OW] (``out_mode``
    "float" or "sign") or uint8 [N, ceil(M/8), OH, OW] ("bits").

    ``Dt`` is None when :func:`pack_weights` returned no table. ``thresholds`` is ``(A, inv)`` of
    :func:`popcount_thresholds`, for the "sign" and "bits" modes.

    Packed bits (the link between two binary convs): byte ``b`` of pixel (n, y, x) holds channels
    ``8b .. 8b+7``, channel ``8b + j`` in bit ``j`` (value ``1 << j``), bit 1 meaning -1; the
    unused high bits of the last byte are 0.
    """
    t, l, b, r = p.pads
    hp, wpd = p.padded_hw
    oh, ow = p.out_hw
    cg, mg, group, cw = p.cg, p.mg, p.group, p.cw
    sh, sw = p.strides
    dh, dw = p.dilations
    wdt, acc = p.word_dtype, p.acc_dtype
    u0 = tirx.const(0, wdt)

    Xu = X if p.in_words else pack_te(X, p)

    if p.needs_pad_stage:
        wq = max(-(-wpd // sw), p.ow_padded + (p.dilations[1] * (p.kw - 1)) // sw + 1)

        def pad(n, g, c, y, ph, q):
            col = q * sw + ph
            inside = tirx.all(y >= t, y < t + p.h, col >= l, col < l + p.w)
            iy = te.max(te.min(y - t, p.h - 1), 0)
            ix = te.max(te.min(col - l, p.w - 1), 0)
            return tirx.Select(inside, Xu[n, g, c, iy, ix], u0)

        Xp = te.compute((p.n, group, cw, hp, sw, wq), pad, name="bdp_pad")

        def xread(n, g, c, iy, s, x):
            return Xp[n, g, c, iy, (s * dw) % sw, x + (s * dw) // sw]
    else:

        def xread(n, g, c, iy, s, x):  # stride 1 along W here
            return Xu[n, g, c, iy, x + s * dw]

    rr = te.reduce_axis((0, p.kh), name="r")
    rs = te.reduce_axis((0, p.kw), name="s")
    rc = te.reduce_axis((0, cw), name="cw")

    def popc(n, m, y, x):
        g = m // mg if group > 1 else 0
        v = xread(n, g, rc, y * sh + rr * dh, rs, x) ^ Wp[rr, rs, rc, m]
        if p.depthwise:  # one channel per group: the word is 0 or 1, its own popcount
            return te.sum(v.astype(acc), axis=[rr, rs, rc])
        return te.sum(tirx.popcount(v).astype(acc), axis=[rr, rs, rc])

    # the parameters ride on the block as well as on the PrimFunc: after Relax fuses elementwise
    # consumers into the kernel (FuseOps/FuseTIR) only block annotations survive
    P = te.compute((p.n, p.m, oh, p.ow_padded), popc, name="bdp_popcount",
                   attrs={"bdp.params": p.to_json()})
    total = cg * p.kh * p.kw
    # the float output: D = Dt - 2*P, an integer, converted to float for the multiply-add (LLVM
    # narrows the int32 to the vector's lanes); the ±1 / packed-bit outputs test P itself against
    # integer thresholds (popcount_thresholds), with no conversion at all
    edt = "int64" if acc == "int64" else "int32"
    two = tirx.const(2, edt)
    if Dt is not None:
        rcls, _, ccls, _ = border_classes(p)
        col_idx = {}
        for i, k in enumerate(ccls):
            if k:
                col_idx.setdefault(k, []).append(i)

    def by_class(table, m, y, x):
        """TABLE[row class of y, column class of x, m] (Select chains on compile-time classes)."""
        if Dt is None:
            return table[0, 0, m]
        ry = _class_select(y, rcls)
        expr = table[ry, 0, m]
        for k, idx in sorted(col_idx.items(), reverse=True):
            cond = tirx.any(*[x == i for i in idx]) if len(idx) > 1 else x == idx[0]
            expr = tirx.Select(cond, table[ry, k, m], expr)
        return expr

    def dbase(m, y, x):
        return by_class(Dt, m, y, x).astype(edt) if Dt is not None else tirx.const(total, edt)

    def dval(n, m, y, x):
        return dbase(m, y, x) - two * P[n, m, y, x].astype(edt)

    if p.out_mode == "float":
        def epi(n, m, y, x):
            return scale[m] * dval(n, m, y, x).astype("float32") + bias[m]

        return te.compute((p.n, p.m, oh, ow), epi, name="bdp_binary_conv")

    athr, inv = thresholds
    tdt = threshold_dtype(p)

    def plus(n, m, y, x):  # the output is +1: (P <= A) != inv, integers (popcount_thresholds)
        le = P[n, m, y, x].astype(tdt) <= by_class(athr, m, y, x)
        return tirx.Select(inv[m] == tirx.const(1, "uint8"), tirx.Not(le), le)

    if p.out_mode == "sign":
        def epi(n, m, y, x):  # noqa: F811
            return tirx.Select(plus(n, m, y, x), tirx.const(1.0, "float32"), tirx.const(-1.0, "float32"))

        return te.compute((p.n, p.m, oh, ow), epi, name="bdp_binary_conv")

    jb = te.reduce_axis((0, 8), name="jb")
    mbytes = packed_channels(p.m)
    ragged_m = p.m % 8 != 0

    def bits(n, b, y, x):
        m = b * 8 + jb
        neg = tirx.Not(plus(n, te.min(m, p.m - 1) if ragged_m else m, y, x))
        if ragged_m:
            neg = tirx.all(m < p.m, neg)
        return te.sum(tirx.Select(neg, tirx.const(1, "uint8") << jb.astype("uint8"), tirx.const(0, "uint8")),
                      axis=jb)

    return te.compute((p.n, mbytes, oh, ow), bits, name="bdp_binary_conv")
