"""Binary layer primitives.

``BinaryConv2d`` is a ``Conv2d`` whose input is binarized by a binarizer from
:mod:`bdp.models.binarize` and whose weights are ``alpha_c * sgn(W)`` per output channel.

Padding: ``pad_value`` says what the padded border holds *after* binarization. ``0`` (default)
is zero padding of the signed tensor: a border tap contributes nothing, exactly what
``Conv2d(padding=p)`` on a ±1 tensor computes. ``1`` (or ``-1``) pads the signed tensor with
+1 (or -1), which a packed-bit kernel does with no correction (Larq's ``pad_values=1``). Both
export faithfully: zero padding as ``Conv(pads=...)``, one padding as ``Pad(value=1)`` + ``Conv``.

Also here: ``BinaryConvTranspose2d`` (sign input, ``alpha * sgn(W)`` weights), BiDense's
Channel-adaptive Full-precision Bypass (:func:`channel_adaptive_bypass`, ``ChannelAdaptiveBypass``),
``BiDenseConv`` (``BN(conv(DAB(x))) + CFB(x)``), the binary down-sampling block with an AvgPool
bypass (``BinaryDownBlock``) and the up-sampling block with a nearest-upsample bypass
(``BinaryUpBlock``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import (EDESign, LearnableBias, RPReLU, binarize_weight, make_binarizer,  # noqa: F401
                       weight_mode_kwargs)


class _BinaryWeights:
    """What binary convs and transposed convs share: the activation binarizer and
    ``alpha_c * sgn(W)`` weights (``alpha`` per output channel, axis ``_out_axis`` of the weight)."""

    _out_axis = 0

    def _init_binary(self, in_channels, binarizer, binarizer_kwargs, weight_mode):
        self.weight_mode = weight_mode
        self._wkw = weight_mode_kwargs(weight_mode)
        self.act = make_binarizer(binarizer, channels=in_channels, **(binarizer_kwargs or {}))

    def binary_weight(self) -> torch.Tensor:
        kw = dict(self._wkw)
        if self.weight_mode == "irnet" and isinstance(self.act, EDESign):
            kw["ede"] = (self.act.k, self.act.t)
        return binarize_weight(self.weight, channel_dim=self._out_axis, **kw)


class BinaryConv2d(_BinaryWeights, nn.Conv2d):
    """Binary conv: ``conv(binarizer(x), alpha_c * sgn(W))``.

    ``weight_mode``: ``"xnor"`` (default, ``alpha_c = mean|W[c]|``) or ``"irnet"`` (IR-Net:
    per-channel standardised W, power-of-two ``alpha_c``; with the ``ede`` binarizer the weight
    sign gets the same EDE surrogate as the activations, as in IR-Net).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, binarizer="ste", pad_value=0.0, binarizer_kwargs=None, weight_mode="xnor"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        if pad_value not in (0.0, 1.0, -1.0):
            raise ValueError("pad_value must be 0, 1 or -1")
        self.pad_value = float(pad_value)
        self._init_binary(in_channels, binarizer, binarizer_kwargs, weight_mode)

    def forward(self, x):
        xb = self.act(x)
        w = self.binary_weight()
        ph, pw = self.padding if isinstance(self.padding, tuple) else (self.padding, self.padding)
        if self.pad_value != 0.0 and (ph or pw):
            xb = F.pad(xb, (pw, pw, ph, ph), value=self.pad_value)
            ph = pw = 0
        return F.conv2d(xb, w, self.bias, self.stride, (ph, pw), self.dilation, self.groups)

    def extra_repr(self):
        return super().extra_repr() + f", binarizer={self.act.binarizer_name}, pad_value={self.pad_value:g}"


class BinaryConvTranspose2d(_BinaryWeights, nn.ConvTranspose2d):
    """Binary transposed conv: ``conv_transpose(binarizer(x), alpha_c * sgn(W))``, ``alpha_c`` the
    mean |W| of output channel c (axis 1 of a ConvTranspose weight). Counted as binary MACs by
    :func:`bdp.models.zoo.count_macs` (``bdp_binary``). A transposed conv has no input padding,
    so the signed tensor's border needs no convention."""

    bdp_binary = True
    _out_axis = 1

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 groups=1, bias=False, dilation=1, binarizer="ste", binarizer_kwargs=None, weight_mode="xnor"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, groups=groups, bias=bias, dilation=dilation)
        self._init_binary(in_channels, binarizer, binarizer_kwargs, weight_mode)

    def forward(self, x):
        return F.conv_transpose2d(self.act(x), self.binary_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def extra_repr(self):
        return super().extra_repr() + f", binarizer={self.act.binarizer_name}"


# ---------------------------------------------------------------------------------------------
# BiDense: Channel-adaptive Full-precision Bypass


def channel_adaptive_bypass(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """BiDense's CFB: map the real-valued ``x`` [N, C_in, H, W] to ``out_channels`` channels with
    no parameters and no multiplies.

    fusion-up (C_out >= C_in): tile x ``r = C_out // C_in`` times, then append ``m = C_out % C_in``
    channels, each the mean of a group of input channels; fusion-down (C_out < C_in): r = 0 and
    all C_out channels are group means. Grouping follows BiDense's code: the first
    ``(C_in // m) * (m - 1)`` channels are split into ``m - 1`` interleaved groups (channel j of
    the group output averages input channels j, j + (m-1), j + 2(m-1), ...), the remaining channels
    form the last group. When ``m`` divides C_in this is ``m`` interleaved groups of C_in / m.
    Exports as Concat / Reshape / ReduceMean.
    """
    cin = x.shape[1]
    r, m = divmod(out_channels, cin)
    parts = []
    if r > 0:
        parts.extend([x] * r)
    if m > 0:
        if cin % m == 0:
            parts.append(x.unflatten(1, (cin // m, m)).mean(1))
        elif m == 1:
            parts.append(x.mean(1, keepdim=True))
        else:
            regular = (cin // m) * (m - 1)
            parts.append(x[:, :regular].unflatten(1, (regular // (m - 1), m - 1)).mean(1))
            parts.append(x[:, regular:].mean(1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ChannelAdaptiveBypass(nn.Module):
    """Module form of :func:`channel_adaptive_bypass` (``cin -> cout``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout

    def forward(self, x):
        if self.cin == self.cout:
            return x
        return channel_adaptive_bypass(x, self.cout)

    def extra_repr(self):
        return f"{self.cin} -> {self.cout}"


def _pool_ceil_mode(kernel_size: int, stride: int, padding: int) -> bool:
    """AvgPool(stride, stride) ceil_mode that matches a conv's output size: a conv with
    ``k - 2p < s`` gives ceil(n / s) outputs, otherwise floor(n / s)."""
    return (kernel_size - 2 * padding) < stride


class BiDenseConv(nn.Module):
    """BiDense conv layer: ``y = BN(BinaryConv(DAB(x))) + CFB(x)``.

    With ``stride > 1`` the bypass is ``CFB(AvgPool_stride(x))`` (BiDense's down-sampling
    transition); ``bypass=False`` drops the bypass. The binary conv is a :class:`BinaryConv2d`
    (binarizer ``dab`` by default) so bdp's compiler finds it. Weights start from N(0, 1e-3^2) as
    in BiDense's code when ``small_init`` (their scale does not matter to the sign; the BN after
    the conv sets the output scale).
    """

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=None, dilation=1, groups=1, bypass=True,
                 binarizer="dab", pad_value=0.0, weight_mode="xnor", small_init=True, binarizer_kwargs=None):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = BinaryConv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, binarizer=binarizer, pad_value=pad_value, weight_mode=weight_mode,
                                 binarizer_kwargs=binarizer_kwargs)
        if small_init:
            nn.init.normal_(self.conv.weight, std=1e-3)
        self.bn = nn.BatchNorm2d(cout)
        self.cout = cout
        self.bypass = bool(bypass)
        self.pool = None
        if bypass and stride > 1:
            self.pool = nn.AvgPool2d(stride, stride, ceil_mode=_pool_ceil_mode(kernel_size, stride, padding),
                                     count_include_pad=False)
        self.cfb = ChannelAdaptiveBypass(cin, cout)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if not self.bypass:
            return y
        z = self.pool(x) if self.pool is not None else x
        return y + self.cfb(z)


class BinaryDownBlock(nn.Module):
    """Binary down-sampling block: ``y = BN(BinaryConv_{k, stride}(x)) + CFB(AvgPool_stride(x))``.

    Default 2x2 stride-2 conv (BiDense's transition); the AvgPool uses ceil mode exactly when the
    conv's output size is ceil(n / stride), so the two paths always agree in size.
    """

    def __init__(self, cin, cout, stride=2, kernel_size=2, padding=None, binarizer="dab", weight_mode="xnor",
                 pad_value=0.0, binarizer_kwargs=None):
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 if kernel_size % 2 else 0
        self.conv = BinaryConv2d(cin, cout, kernel_size, stride=stride, padding=padding, binarizer=binarizer,
                                 weight_mode=weight_mode, pad_value=pad_value, binarizer_kwargs=binarizer_kwargs)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=_pool_ceil_mode(kernel_size, stride, padding),
                                 count_include_pad=False)
        self.cfb = ChannelAdaptiveBypass(cin, cout)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.cfb(self.pool(x))


class BinaryUpBlock(nn.Module):
    """Binary up-sampling block: ``y = BN(BinaryConvTranspose_{scale x scale, stride scale}(x)) +
    CFB(nearest_upsample_scale(x))``. With ``size`` given to forward, the result is cropped to it
    (an odd-sized skip connection at the finer scale)."""

    def __init__(self, cin, cout, scale=2, binarizer="dab", weight_mode="xnor", binarizer_kwargs=None):
        super().__init__()
        self.scale = int(scale)
        self.conv = BinaryConvTranspose2d(cin, cout, self.scale, stride=self.scale, binarizer=binarizer,
                                          weight_mode=weight_mode, binarizer_kwargs=binarizer_kwargs)
        self.bn = nn.BatchNorm2d(cout)
        self.cfb = ChannelAdaptiveBypass(cin, cout)

    def forward(self, x, size=None):
        y = self.bn(self.conv(x)) + self.cfb(F.interpolate(x, scale_factor=self.scale, mode="nearest"))
        return crop_to(y, size)


def crop_to(x: torch.Tensor, size=None) -> torch.Tensor:
    """Crop the bottom/right of ``x`` to ``size`` (H, W) when it is larger (static shapes only)."""
    if size is None:
        return x
    h, w = int(size[0]), int(size[1])
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    return x[..., :h, :w]


# ---------------------------------------------------------------------------------------------
# Bi-Real block (kept as it was, with optional extensions)


class BiRealBlock(nn.Module):
    """Bi-Real Net block: ``y = act(BN(BinaryConv3x3(x)) + shortcut(x))``.

    The shortcut keeps the real-valued activations flowing past every binary conv. When the
    block changes stride or width the shortcut is AvgPool (stride) then a float 1x1 conv + BN
    (width), as in Bi-Real Net (``shortcut="conv"``, default), or AvgPool then BiDense's
    parameter-free channel-adaptive bypass (``shortcut="cfb"``; with C_out = 2 C_in this is
    ReActNet's duplicated shortcut). ``act``: ``"prelu"`` (default), ``"rprelu"`` (ReActNet) or
    ``"none"``.
    """

    def __init__(self, cin, cout, stride=1, dilation=1, binarizer="ste", pad_value=0.0, shortcut="conv",
                 act="prelu", weight_mode="xnor", binarizer_kwargs=None):
        super().__init__()
        self.conv = BinaryConv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                                 binarizer=binarizer, pad_value=pad_value, weight_mode=weight_mode,
                                 binarizer_kwargs=binarizer_kwargs)
        self.bn = nn.BatchNorm2d(cout)
        short = []
        if stride != 1:
            short.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        if cin != cout:
            if shortcut == "conv":
                short += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            elif shortcut == "cfb":
                short.append(ChannelAdaptiveBypass(cin, cout))
            else:
                raise ValueError(f"unknown shortcut '{shortcut}' (conv, cfb)")
        self.shortcut = nn.Sequential(*short)
        if act == "prelu":
            self.act = nn.PReLU(cout)
        elif act == "rprelu":
            self.act = RPReLU(cout)
        elif act == "none":
            self.act = nn.Identity()
        else:
            raise ValueError(f"unknown activation '{act}' (prelu, rprelu, none)")

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + self.shortcut(x))
