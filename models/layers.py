"""Binary layer primitives.

``BinaryConv2d`` is a ``Conv2d`` whose input is binarized by a binarizer from
:mod:`bdp.models.binarize` and whose weights are ``alpha_c * sgn(W)`` per output channel.

Padding: ``pad_value`` says what the padded border holds *after* binarization. ``0`` (default)
is zero padding of the signed tensor: a border tap contributes nothing, exactly what
``Conv2d(padding=p)`` on a ±1 tensor computes. ``1`` (or ``-1``) pads the signed tensor with
+1 (or -1), which a packed-bit kernel does with no correction (Larq's ``pad_values=1``). Both
export faithfully: zero padding as ``Conv(pads=...)``, one padding as ``Pad(value=1)`` + ``Conv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import binarize_weight, make_binarizer


class BinaryConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, binarizer="ste", pad_value=0.0, binarizer_kwargs=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        if pad_value not in (0.0, 1.0, -1.0):
            raise ValueError("pad_value must be 0, 1 or -1")
        self.pad_value = float(pad_value)
        self.act = make_binarizer(binarizer, channels=in_channels, **(binarizer_kwargs or {}))

    def binary_weight(self) -> torch.Tensor:
        return binarize_weight(self.weight)

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


class BiRealBlock(nn.Module):
    """Bi-Real Net block: ``y = BN(BinaryConv3x3(x)) + shortcut(x)``.

    The shortcut keeps the real-valued activations flowing past every binary conv. When the
    block changes stride or width the shortcut is AvgPool (stride) then a float 1x1 conv + BN
    (width), as in Bi-Real Net / ReActNet.
    """

    def __init__(self, cin, cout, stride=1, dilation=1, binarizer="ste", pad_value=0.0):
        super().__init__()
        self.conv = BinaryConv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                                 binarizer=binarizer, pad_value=pad_value)
        self.bn = nn.BatchNorm2d(cout)
        short = []
        if stride != 1:
            short.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        if cin != cout:
            short += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.shortcut = nn.Sequential(*short)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + self.shortcut(x))
