"""BiDense (Yin et al., 2024) and the two baselines of its comparison, on one skeleton: a small
UperNet on a binary ConvNeXt.

Skeleton (``variant`` picks the binary conv unit)::

    stem       float conv4x4/4 + BN (BiDense keeps the stem full precision)      -> dims[0] @ 1/4
    stages     depths[i] ConvNeXt blocks at dims[i]; between stages a binary 2x2/2 down-sampling
               conv (BiDense: + AvgPool -> CFB bypass)                            -> 1/8, 1/16, 1/32
    block      binary depthwise 7x7 -> binary 1x1 (d -> 4d) -> shift + PReLU -> binary 1x1 (4d -> d)
    decoder    UperNet-lite: global-context branch on the coarsest features (the PPM with the
               single bin 1: ReduceMean -> binary 1x1 -> broadcast by nearest resize), FPN with binary
               1x1 laterals and binary 3x3 smoothing, fusion of the four levels by a binary 3x3,
               then a binary 3x3 to ``features`` channels at 1/4
    heads      per task binary 3x3 + ReLU then a float 1x1 (BiDense's heads); depth ends in
               ``sigmoid * max_depth`` (its 1x1 starts with weights x0.1 and the bias at
               logit(3 m / max_depth): predictions start near 3 m, not in the sigmoid's flat ends);
               logits bilinearly resized to the input size

Variants:

* ``bidense``: every binary conv is a :class:`~bdp.models.layers.BiDenseConv`
  (``BN(conv(DAB(x))) + CFB(x)``; the CFB bypass replaces the residual connections, as in BiDense's
  ConvNeXt), activations ``LearnableBias + PReLU``.
* ``bnn``: ``BN(BinaryConv(sgn_STE(x)))`` units, ConvNeXt residuals (``x + BN(dw(x))`` and
  ``x + block(x)``), ReLU in the block (BiDense's BNN baseline uses GELU; ReLU keeps to opset ops
  the compiler handles), no bypass across down-sampling or channel changes.
* ``reactnet``: as ``bnn`` with RSign binarizers and RPReLU activations (ReActNet).

Choices where the paper is silent or where the 2-core budget rules: the PPM keeps only its global
bin (adaptive pooling to 2/3/6 bins does not export for arbitrary sizes); heads run at 1/4 and the
logits are resized (BiDense resizes features to full size first; ``head_at_full_res=True`` does
that); semseg and depth share one decoder here (BiDense trains one model per task).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import LearnableBias, RPReLU
from .layers import BiDenseConv, BinaryConv2d, BinaryDownBlock
from .tasks import DEFAULT_CLASSES, task_channels

VARIANTS = ("bidense", "bnn", "reactnet")


def _resize(x, size, mode="bilinear"):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _Plain(nn.Module):
    """BN(BinaryConv(x)) with the variant's binarizer (bnn / reactnet units)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, binarizer="ste", weight_mode="xnor", pad_value=0.0):
        super().__init__()
        self.conv = BinaryConv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2 if stride == 1 else 0,
                                 groups=groups, binarizer=binarizer, weight_mode=weight_mode, pad_value=pad_value)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class _Units:
    def __init__(self, variant, weight_mode, pad_value, dab_alpha="channel"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant '{variant}' ({', '.join(VARIANTS)})")
        self.variant = variant
        self.weight_mode = weight_mode
        self.pad_value = pad_value
        self.binarizer = {"bidense": "dab", "bnn": "ste", "reactnet": "rsign"}[variant]
        self.bkw = {"alpha": dab_alpha} if variant == "bidense" else {}

    def conv(self, cin, cout, k, groups=1):
        """The variant's binary conv unit (stride 1): BiDense adds its CFB bypass."""
        if self.variant == "bidense":
            return BiDenseConv(cin, cout, k, groups=groups, weight_mode=self.weight_mode, pad_value=self.pad_value,
                               binarizer_kwargs=self.bkw)
        return _Plain(cin, cout, k, groups=groups, binarizer=self.binarizer, weight_mode=self.weight_mode,
                      pad_value=self.pad_value)

    def down(self, cin, cout):
        if self.variant == "bidense":
            return BinaryDownBlock(cin, cout, stride=2, kernel_size=2, weight_mode=self.weight_mode,
                                   binarizer_kwargs=self.bkw)
        return _Plain(cin, cout, 2, stride=2, binarizer=self.binarizer, weight_mode=self.weight_mode)

    def act(self, c):
        if self.variant == "bidense":
            return nn.Sequential(LearnableBias(c), nn.PReLU(c))
        if self.variant == "reactnet":
            return RPReLU(c)
        return nn.ReLU()

    @property
    def residual(self):
        return self.variant != "bidense"


class ConvNeXtBlock(nn.Module):
    def __init__(self, u: _Units, dim, kernel_size=7, expand=4):
        super().__init__()
        self.residual = u.residual
        self.dw = u.conv(dim, dim, kernel_size, groups=dim)
        self.pw1 = u.conv(dim, expand * dim, 1)
        self.act = u.act(expand * dim)
        self.pw2 = u.conv(expand * dim, dim, 1)

    def forward(self, x):
        if self.residual:
            y = x + self.dw(x)
            return x + self.pw2(self.act(self.pw1(y)))
        return self.pw2(self.act(self.pw1(self.dw(x))))


class BinaryConvNeXt(nn.Module):
    def __init__(self, u: _Units, dims, depths, kernel_size=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))
        self.down = nn.ModuleList([u.down(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(u, d, kernel_size) for _ in range(n)])
                                     for d, n in zip(dims, depths)])

    def forward(self, x):
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.down[i - 1](x)
            x = stage(x)
            out.append(x)
        return out


class UperNetLite(nn.Module):
    def __init__(self, u: _Units, dims, fpn, features):
        super().__init__()
        top = dims[-1]
        q = max(top // 4, 8)
        self.ppm = nn.Sequential(u.conv(top, q, 1), u.act(q))
        self.ppm_fuse = nn.Sequential(u.conv(top + q, fpn, 3), u.act(fpn))
        self.lateral = nn.ModuleList([u.conv(d, fpn, 1) for d in dims[:-1]])
        self.smooth = nn.ModuleList([u.conv(fpn, fpn, 3) for _ in dims[:-1]])
        self.fuse = nn.Sequential(u.conv(len(dims) * fpn, fpn, 3), u.act(fpn))
        self.out = nn.Sequential(u.conv(fpn, features, 3), u.act(features))

    def forward(self, feats):
        top = feats[-1]
        g = self.ppm(top.mean(dim=(2, 3), keepdim=True))
        p_top = self.ppm_fuse(torch.cat([top, _resize(g, top.shape[-2:], "nearest")], 1))
        lat = [l(f) for l, f in zip(self.lateral, feats[:-1])] + [p_top]
        for i in range(len(lat) - 2, -1, -1):  # top-down
            lat[i] = lat[i] + _resize(lat[i + 1], lat[i].shape[-2:])
        ps = [s(p) for s, p in zip(self.smooth, lat[:-1])] + [lat[-1]]
        size = ps[0].shape[-2:]
        x = self.fuse(torch.cat([_resize(p, size) for p in ps], 1))
        return self.out(x)


class DenseHead(nn.Module):
    """Binary 3x3 conv unit + ReLU, float 1x1 classifier; depth: sigmoid * max_depth."""

    def __init__(self, u: _Units, cin, hidden, cout, max_depth=None, depth_init=3.0):
        super().__init__()
        self.conv = u.conv(cin, hidden, 3)
        self.cls = nn.Conv2d(hidden, cout, 1)
        self.max_depth = max_depth
        if max_depth is not None:  # start near depth_init everywhere, away from the sigmoid's flat ends
            q = min(max(depth_init / max_depth, 1e-3), 1 - 1e-3)
            with torch.no_grad():
                self.cls.weight.mul_(0.1)
                self.cls.bias.fill_(math.log(q / (1 - q)))

    def forward(self, x):
        y = self.cls(F.relu(self.conv(x)))
        if self.max_depth is not None:
            y = torch.sigmoid(y) * self.max_depth
        return y


class BinaryUperNet(nn.Module):
    """Binary ConvNeXt + UperNet-lite dense predictor (see the module docstring).

    width: dims = [w, 2w, 4w, 8w]; depths: blocks per stage; features: decoder output channels;
    max_depth: the depth head's range in metres (sigmoid * max_depth); kernel_size: depthwise kernel;
    dab_alpha: the DAB scale ("channel" as in BiDense, "sample" or "none"; see
    :class:`~bdp.models.binarize.DAB`; only the bidense variant uses it).
    """

    def __init__(self, variant="bidense", width=32, depths=(1, 1, 2, 1), tasks=("semseg", "depth"),
                 num_classes=DEFAULT_CLASSES, features=64, max_depth=10.0, kernel_size=7, weight_mode="xnor",
                 pad_value=0.0, head_at_full_res=False, dab_alpha="channel"):
        super().__init__()
        u = _Units(variant, weight_mode, pad_value, dab_alpha)
        self.tasks = list(tasks)
        dims = [width, 2 * width, 4 * width, 8 * width]
        self.backbone = BinaryConvNeXt(u, dims, depths, kernel_size)
        self.decoder = UperNetLite(u, dims, dims[0], features)
        self.head_at_full_res = head_at_full_res
        self.heads = nn.ModuleDict({
            t: DenseHead(u, features, features if t == "semseg" else 32, task_channels(t, num_classes),
                         max_depth=float(max_depth) if t == "depth" else None) for t in self.tasks})

    def forward(self, x):
        size = x.shape[-2:]
        f = self.decoder(self.backbone(x))
        if self.head_at_full_res:
            f = _resize(f, size)
            return {t: h(f) for t, h in self.heads.items()}
        return {t: _resize(h(f), size) for t, h in self.heads.items()}
