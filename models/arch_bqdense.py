"""Binary dense prediction with multi-branch upsampling and cheap binary attention, after Ding et
al. 2024 ("The Binary Quantized Neural Network for Dense Prediction via Specially Designed
Upsampling and Attention"). No public code: the paper's ideas are filled in as follows.

Encoder   ReActNet-style: float conv3x3/2 stem, then binary Bi-Real blocks with RSign
          binarizers and RPReLU at 1/4 (w), 1/8 (2w), 1/16 (4w); width/stride changes use
          AvgPool + the parameter-free channel bypass (ReActNet's duplicated shortcut), so the
          encoder has no float convs after the stem.
Attention at 1/16, :class:`BinaryEfficientAttention`: the dot-product attention
          ``softmax(Q K^T) V`` (O((HW)^2 d)) is split into two cheap parts, a global context
          ``G = softmax_hw(K)^T V`` (d_k x d_v per image) and a per-pixel read-out
          ``softmax_c(Q) G`` (Shen et al.'s efficient attention), O(HW d_k d_v) in all: at 1/16 of a
          512x1024 image (HW = 2048, d = 64) about 30x fewer MACs, 100x at 1/8. Q, K, V and the output
          projection are binary 1x1 convs (the MACs that scale with channels^2 run as packed bits);
          the two small products stay float. ``y = x + gamma * BN(proj(.))``, gamma starts at 0.
Decoder   two multi-branch binary upsamplers (1/16 -> 1/8 -> 1/4), each followed by the skip
          connection of the encoder at that scale (added) and one binary refinement block.
Upsampler :class:`MultiBranchUpsample`: parallel binary branches on the same input, each merged
          through a learned sigmoid gate (elementwise product with a per-channel gate, which folds
          into the branch's BatchNorm at inference: free on packed-bit hardware), on top of a
          full-precision bilinear bypass of the (CFB-adapted) input::

              y = up_bilinear(CFB(x)) + sum_b sigmoid(g_b) * BN_b(branch_b(x))

          branches (``branches``): ``"transpose"`` binary 2x2/2 transposed conv (C_in C_out MACs
          per output pixel), ``"shuffle"`` binary 3x3 conv to 4 C_out channels at the low
          resolution + pixel shuffle (9 C_in C_out), ``"bilinear"`` bilinear upsample then binary
          3x3 conv (9 C_in C_out at the high resolution, plus the float interpolation of C_in
          channels). The default keeps the two that compute at the low resolution, the cheapest
          on packed-bit hardware for the same receptive field.
Heads     binary 3x3 + BN + RPReLU, float 1x1, bilinear to input size.

Tasks: the paper evaluates semantic segmentation (Cityscapes) and binary maps (KITTI road,
ECSSD saliency); here ``semseg`` and ``edges`` (the synthetic set's binary per-pixel map,
class-balanced BCE like saliency), chosen in ``tasks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import RPReLU
from .layers import BinaryConv2d, BinaryConvTranspose2d, BiRealBlock, ChannelAdaptiveBypass, crop_to
from .tasks import DEFAULT_CLASSES, task_channels

BRANCHES = ("transpose", "shuffle", "bilinear")


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """``F.pixel_shuffle`` written as Reshape/Transpose (no DepthToSpace in the graph)."""
    n, c, h, w = x.shape
    co = c // (r * r)
    x = x.reshape(n, co, r, r, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, co, h * r, w * r)


class MultiBranchUpsample(nn.Module):
    """2x multi-branch binary upsampler (see the module docstring)."""

    def __init__(self, cin, cout, branches=("transpose", "shuffle"), binarizer="rsign", weight_mode="xnor",
                 pad_value=0.0):
        super().__init__()
        bad = [b for b in branches if b not in BRANCHES]
        if bad or not branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {list(branches)}")
        self.names = list(branches)
        convs = {}
        for b in self.names:
            if b == "transpose":
                convs[b] = BinaryConvTranspose2d(cin, cout, 2, stride=2, binarizer=binarizer, weight_mode=weight_mode)
            elif b == "shuffle":
                convs[b] = BinaryConv2d(cin, 4 * cout, 3, padding=1, binarizer=binarizer, weight_mode=weight_mode,
                                        pad_value=pad_value)
            else:
                convs[b] = BinaryConv2d(cin, cout, 3, padding=1, binarizer=binarizer, weight_mode=weight_mode,
                                        pad_value=pad_value)
        self.convs = nn.ModuleDict(convs)
        self.bns = nn.ModuleDict({b: nn.BatchNorm2d(cout) for b in self.names})
        self.gates = nn.ParameterDict({b: nn.Parameter(torch.zeros(1, cout, 1, 1)) for b in self.names})
        self.cfb = ChannelAdaptiveBypass(cin, cout)

    def forward(self, x, size):
        h, w = int(size[0]), int(size[1])
        y = F.interpolate(self.cfb(x), size=(h, w), mode="bilinear", align_corners=False)
        for b in self.names:
            if b == "transpose":
                z = self.convs[b](x)
            elif b == "shuffle":
                z = pixel_shuffle(self.convs[b](x), 2)
            else:
                z = self.convs[b](F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
            y = y + torch.sigmoid(self.gates[b]) * self.bns[b](crop_to(z, (h, w)))
        return y


class BinaryEfficientAttention(nn.Module):
    """Binary two-part (efficient) attention; see the module docstring."""

    def __init__(self, c, key_dim=None, value_dim=None, binarizer="rsign", weight_mode="xnor"):
        super().__init__()
        dk = key_dim or max(c // 2, 8)
        dv = value_dim or c
        self.dk, self.dv = dk, dv

        def proj(ci, co):
            return nn.Sequential(BinaryConv2d(ci, co, 1, binarizer=binarizer, weight_mode=weight_mode), nn.BatchNorm2d(co))

        self.q, self.k, self.v = proj(c, dk), proj(c, dk), proj(c, dv)
        self.proj = proj(dv, c)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        q = torch.softmax(self.q(x).reshape(n, self.dk, h * w), dim=1)  # over channels, per pixel
        k = torch.softmax(self.k(x).reshape(n, self.dk, h * w), dim=2)  # over positions, per channel
        v = self.v(x).reshape(n, self.dv, h * w)
        ctx = torch.matmul(k, v.transpose(1, 2))  # [n, dk, dv]: the global context (part one)
        y = torch.matmul(ctx.transpose(1, 2), q)  # [n, dv, hw]: per-pixel read-out (part two)
        return x + self.gamma * self.proj(y.reshape(n, self.dv, h, w))

    def bdp_macs(self, inputs, output):
        """Float MACs of the two products (count_macs adds them)."""
        n, _, h, w = inputs[0].shape
        return {"float": 2 * n * h * w * self.dk * self.dv}


class BQDense(nn.Module):
    """Binary encoder-decoder with multi-branch upsampling and binary efficient attention.

    width: encoder widths w, 2w, 4w at 1/4, 1/8, 1/16; blocks: Bi-Real blocks per stage;
    branches: upsampler branches; attention: use the attention module at 1/16.
    """

    def __init__(self, width=32, tasks=("semseg", "edges"), num_classes=DEFAULT_CLASSES, blocks=(1, 1, 2),
                 binarizer="rsign", weight_mode="xnor", pad_value=0.0, branches=("transpose", "shuffle"),
                 attention=True):
        super().__init__()
        self.tasks = list(tasks)
        w = [width, 2 * width, 4 * width]
        bo = dict(binarizer=binarizer, weight_mode=weight_mode, pad_value=pad_value, shortcut="cfb", act="rprelu")
        half = max(width // 2, 8)
        self.stem = nn.Sequential(nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), RPReLU(half))
        stages = []
        cin = half
        for c, n in zip(w, blocks):
            layers = [BiRealBlock(cin, c, stride=2, **bo)] + [BiRealBlock(c, c, **bo) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.attention = BinaryEfficientAttention(w[2], binarizer=binarizer, weight_mode=weight_mode) if attention \
            else nn.Identity()
        up = dict(binarizer=binarizer, weight_mode=weight_mode, pad_value=pad_value)
        self.up1 = MultiBranchUpsample(w[2], w[1], branches, **up)
        self.ref1 = BiRealBlock(w[1], w[1], **bo)
        self.up2 = MultiBranchUpsample(w[1], w[0], branches, **up)
        self.ref2 = BiRealBlock(w[0], w[0], **bo)
        self.heads = nn.ModuleDict({
            t: nn.Sequential(BinaryConv2d(w[0], w[0], 3, padding=1, **up), nn.BatchNorm2d(w[0]), RPReLU(w[0]),
                             nn.Conv2d(w[0], task_channels(t, num_classes), 1)) for t in self.tasks})

    def forward(self, x):
        size = x.shape[-2:]
        f = self.stem(x)
        skips = []
        for s in self.stages:
            f = s(f)
            skips.append(f)
        y = self.attention(skips[2])
        y = self.ref1(self.up1(y, skips[1].shape[-2:]) + skips[1])
        y = self.ref2(self.up2(y, skips[0].shape[-2:]) + skips[0])
        return {t: F.interpolate(h(y), size=size, mode="bilinear", align_corners=False) for t, h in self.heads.items()}
