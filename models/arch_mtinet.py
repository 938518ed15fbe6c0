"""MTI-Net (Vandenhende et al., ECCV 2020) and its binarizations Bi-MTDP / -C / -F (Shang et al.,
CVPR 2024).

Structure (one class, :class:`MTINet`, parts switched binary by the ``binary`` list)::

    backbone   float stem (conv3x3/2 + BN + ReLU + maxpool/2), then four stages at 1/4, 1/8, 1/16,
               1/32 with widths w, 2w, 4w, 8w (``blocks`` basic blocks each; the first block of a
               stage strides 2). HRNet-W18 in MTI-Net; a small ResNet here (``width`` 16 gives
               16/32/64/128, close to HRNet-W18's 18/36/72/144).
    [VIB]      Bi-MTDP-F only: per scale mu = conv1x1(f), logvar = conv1x1(f); z = mu + eps *
               exp(logvar / 2) when training, z = mu in eval; KL(N(mu, sigma) || N(0, I)) loss.
    ITP        per scale s (coarse to fine) and task t: input = cat(f_s, up(FPM_{s+1}[t])) (the
               coarsest scale gets f_3 alone), two basic blocks -> features x_{s,t}, a 1x1 conv ->
               the initial (deep-supervision) prediction of t at scale s.
    FPM        feature propagation from scale s to s-1 (s = 3, 2, 1): concat of all tasks'
               features, two blocks + 1x1 -> per-task softmax mask over tasks, masked concat, a
               block reducing to one task's width, then per task SE(shared) + x_{s,t}.
    MMD        multi-modal distillation per scale: out_t = x_t + sum_{a != t} SA_{t,a}(x_a),
               SA(x) = conv3x3(x) * sigmoid(conv3x3(x)) (float, PAD-Net/MTI-Net). Binary (Bi-MTDP):
               out_t = x_t + sum_{a != t} A_t * BN(BinConv_{t,a}(x_a)) with the binary attention
               A_t = bool(BN(BinConv_t(x_t))) in {0, 1} (Bi-MTDP eq. 2-3: the gate comes from the
               target task's features; ``gate_from="source"`` takes it from x_a instead, as in the
               float module).
    heads      per task: upsample the four MMD outputs to 1/4, concat, 1x1 conv + BN + ReLU
               (binary: BinaryConv1x1 + BN + PReLU), float 1x1 conv to the task's channels,
               bilinear resize to the input size.

Binary parts use Bi-Real blocks (a basic block is two BiRealBlocks, each binary 3x3 conv + BN +
real-valued shortcut + PReLU); width/stride changes use Bi-Real's float AvgPool + 1x1 conv + BN
shortcut (``shortcut="conv"``) or the parameter-free CFB bypass (``shortcut="cfb"``). The first
conv (stem), the 1x1 task decoders, the final 1x1 classifiers, the SE gates (on pooled vectors)
and the VIB projections stay in float, the field's usual practice for first/last layers. The
outer ``sign[...]`` of Bi-MTDP eq. 3 is applied by the binarizer of the binary head conv that
consumes the MMD output (``mmd_sign=True`` applies it explicitly).

Default binarizer: ``approxsign`` (Bi-Real; the paper trains with Bi-Real / IR-Net estimators,
``binarizer="ede", weight_mode="irnet"`` gives IR-Net).

``forward(x)`` returns ``{task: [N, C_t, H, W]}``; ``forward(x, return_aux=True)`` returns
``(outputs, aux)`` with ``aux["deep_supervision"] = {scale: {task: tensor at that scale}}``,
``aux["features"] = {name: tensor}`` (``backbone.s`` and ``mmd.s.task``, the layers feature
distillation matches against an ``mtinet`` teacher) and ``aux["vib"] = [(mu, logvar), ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import BinaryGate, hard_sign
from .distributed import randn_like_batch
from .layers import BinaryConv2d, BiRealBlock
from .tasks import DEFAULT_CLASSES, task_channels

PARTS = ("backbone", "itp", "fpm", "mmd", "heads")


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """ResNet basic block: ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class BinaryBasicBlock(nn.Sequential):
    """Bi-Real basic block: two BiRealBlocks (each conv has its own real-valued shortcut)."""

    def __init__(self, cin, cout, stride=1, **bopts):
        super().__init__(BiRealBlock(cin, cout, stride=stride, **bopts), BiRealBlock(cout, cout, **bopts))


class _Ctx:
    """Build options shared by the parts of one MTINet."""

    def __init__(self, binary_parts, binarizer, weight_mode, pad_value, shortcut):
        self.binary_parts = set(binary_parts)
        self.bopts = dict(binarizer=binarizer, weight_mode=weight_mode, pad_value=pad_value, shortcut=shortcut)
        self.binarizer = binarizer
        self.weight_mode = weight_mode
        self.pad_value = pad_value

    def block(self, part, cin, cout, stride=1):
        if part in self.binary_parts:
            return BinaryBasicBlock(cin, cout, stride, **self.bopts)
        return BasicBlock(cin, cout, stride)

    def conv_bn(self, part, cin, cout, k):
        """BN(conv_k(x)) (binary or float)."""
        if part in self.binary_parts:
            conv = BinaryConv2d(cin, cout, k, padding=k // 2, binarizer=self.binarizer,
                                weight_mode=self.weight_mode, pad_value=self.pad_value)
        else:
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(cout))


class Backbone(nn.Module):
    def __init__(self, ctx: _Ctx, widths, blocks):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages = []
        cin = w0
        for i, c in enumerate(widths):
            layers = [ctx.block("backbone", cin, c, stride=1 if i == 0 else 2)]
            layers += [ctx.block("backbone", c, c) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


class VIB(nn.Module):
    """Variational information bottleneck on a feature map (Bi-MTDP-F).

    ``mu = conv1x1(f)``, ``logvar = conv1x1(f)`` (float, or binary with ``binary=True``); training:
    ``z = mu + eps * exp(logvar / 2)``, eps ~ N(0, I); eval: ``z = mu``. The mu projection starts
    as the identity and logvar's bias at ``logvar_init`` (-6: little noise at first) so that the
    layer starts transparent.
    """

    def __init__(self, channels, binary=False, logvar_init=-6.0, binarizer="approxsign", weight_mode="xnor"):
        super().__init__()
        if binary:
            self.mu = nn.Sequential(BinaryConv2d(channels, channels, 1, binarizer=binarizer, weight_mode=weight_mode),
                                    nn.BatchNorm2d(channels))
        else:
            self.mu = nn.Conv2d(channels, channels, 1)
            with torch.no_grad():
                self.mu.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
                self.mu.bias.zero_()
        self.logvar = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.logvar.weight.mul_(0.01)
            self.logvar.bias.fill_(logvar_init)

    def forward(self, f):
        mu = self.mu(f)
        logvar = self.logvar(f)
        if self.training:
            z = mu + randn_like_batch(mu) * torch.exp(0.5 * logvar)  # data-parallel: the global batch's noise
        else:
            z = mu
        return z, mu, logvar


class InitialTaskPrediction(nn.Module):
    def __init__(self, ctx: _Ctx, tasks, cin, c, num_classes):
        super().__init__()
        self.tasks = list(tasks)
        self.refine = nn.ModuleDict({t: nn.Sequential(ctx.block("itp", cin, c), ctx.block("itp", c, c))
                                     for t in self.tasks})
        self.decode = nn.ModuleDict({t: nn.Conv2d(c, task_channels(t, num_classes), 1) for t in self.tasks})

    def forward(self, f, prev=None):
        feats, preds = {}, {}
        for t in self.tasks:
            x = f if prev is None else torch.cat([f, _resize(prev[t], f.shape[-2:])], 1)
            feats[t] = self.refine[t](x)
            preds[t] = self.decode[t](feats[t])
        return feats, preds


class SEBlock(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 mean_hw(x))) (float; on pooled vectors)."""

    def __init__(self, c, reduction=4):
        super().__init__()
        h = max(c // reduction, 4)
        self.fc1 = nn.Conv2d(c, h, 1)
        self.fc2 = nn.Conv2d(h, c, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class FPM(nn.Module):
    """Feature propagation module: task-attention over the concatenated task features.

    MTI-Net's code reshapes the concat to [B, C/N, N, H, W], which mixes channels of neighbouring
    tasks; here the softmax runs over the task axis of [B, N, C, H, W] (the module's stated intent).
    """

    def __init__(self, ctx: _Ctx, tasks, c):
        super().__init__()
        self.tasks = list(tasks)
        n = len(self.tasks)
        shared = n * c
        q = max(shared // 4, 4)
        last = ctx.conv_bn("fpm", q, shared, 1) if "fpm" in ctx.binary_parts else nn.Conv2d(q, shared, 1)
        self.non_linear = nn.Sequential(ctx.block("fpm", shared, q), ctx.block("fpm", q, q), last)
        self.reduce = ctx.block("fpm", shared, c)
        self.se = nn.ModuleDict({t: SEBlock(c) for t in self.tasks})
        self.n, self.c = n, c

    def forward(self, feats):
        concat = torch.cat([feats[t] for t in self.tasks], 1)
        b, _, h, w = concat.shape
        mask = torch.softmax(self.non_linear(concat).reshape(b, self.n, self.c, h, w), dim=1)
        shared = (mask * concat.reshape(b, self.n, self.c, h, w)).reshape(b, self.n * self.c, h, w)
        shared = self.reduce(shared)
        return {t: self.se[t](shared) + feats[t] for t in self.tasks}


class SABlock(nn.Module):
    """PAD-Net/MTI-Net spatial attention: conv3x3(x) * sigmoid(conv3x3(x)) (float)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.att = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.att(x))


class MultiModalDistillation(nn.Module):
    def __init__(self, ctx: _Ctx, tasks, c, gate_from="target", mmd_sign=False):
        super().__init__()
        self.tasks = list(tasks)
        self.binary = "mmd" in ctx.binary_parts
        self.gate_from = gate_from
        self.mmd_sign = mmd_sign
        if gate_from not in ("target", "source"):
            raise ValueError("gate_from must be 'target' or 'source'")
        pairs = [(t, a) for t in self.tasks for a in self.tasks if a != t]
        if not self.binary:
            self.sa = nn.ModuleDict({f"{t}__{a}": SABlock(c) for t, a in pairs})
            return
        self.feat = nn.ModuleDict({f"{t}__{a}": ctx.conv_bn("mmd", c, c, 3) for t, a in pairs})
        keys = self.tasks if gate_from == "target" else [f"{t}__{a}" for t, a in pairs]
        self.gate_conv = nn.ModuleDict({k: ctx.conv_bn("mmd", c, c, 3) for k in keys})
        self.gate = nn.ModuleDict({k: BinaryGate(c, ctx.binarizer) for k in keys})

    def forward(self, x):
        out = {}
        for t in self.tasks:
            y = x[t]
            if not self.binary:
                for a in self.tasks:
                    if a != t:
                        y = y + self.sa[f"{t}__{a}"](x[a])
            else:
                if self.gate_from == "target":
                    g_t = self.gate[t](self.gate_conv[t](x[t]))
                for a in self.tasks:
                    if a == t:
                        continue
                    k = f"{t}__{a}"
                    g = g_t if self.gate_from == "target" else self.gate[k](self.gate_conv[k](x[a]))
                    y = y + g * self.feat[k](x[a])
                if self.mmd_sign:
                    y = hard_sign(y)
            out[t] = y
        return out


class Head(nn.Module):
    """HRNet-style head: upsample all scales to the finest, concat, 1x1-BN-act, 1x1 to outputs."""

    def __init__(self, ctx: _Ctx, widths, cout):
        super().__init__()
        c = sum(widths)
        if "heads" in ctx.binary_parts:
            self.mix = nn.Sequential(BinaryConv2d(c, c, 1, binarizer=ctx.binarizer, weight_mode=ctx.weight_mode),
                                     nn.BatchNorm2d(c), nn.PReLU(c))
        else:
            self.mix = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.out = nn.Conv2d(c, cout, 1)

    def forward(self, feats):
        size = feats[0].shape[-2:]
        x = torch.cat([_resize(f, size) for f in feats], 1)
        return self.out(self.mix(x))


class MTINet(nn.Module):
    """MTI-Net with switchable binary parts; see the module docstring.

    width: base width w (scales w, 2w, 4w, 8w); tasks: outputs (every task is also an auxiliary
    task of the initial predictions, as in MTI-Net's NYUD setup); blocks: basic blocks per
    backbone stage; binary: which of backbone / itp / fpm / mmd / heads are binary; vib: add the
    variational information bottleneck after the backbone (Bi-MTDP-F); vib_binary: binary mu
    projection; gate_from: where the binary MMD attention comes from ("target" per Bi-MTDP eq. 2,
    or "source"); shortcut: "conv" (Bi-Real float 1x1) or "cfb" for binary width changes.
    """

    def __init__(self, width=16, tasks=("semseg", "depth", "normals", "edges"), num_classes=DEFAULT_CLASSES,
                 blocks=1, binary=(), binarizer="approxsign", weight_mode="xnor", pad_value=0.0, vib=False,
                 vib_binary=False, gate_from="target", mmd_sign=False, shortcut="conv"):
        super().__init__()
        bad = [p for p in binary if p not in PARTS]
        if bad:
            raise ValueError(f"unknown binary part(s) {bad}; parts: {', '.join(PARTS)}")
        self.tasks = list(tasks)
        self.widths = [width, 2 * width, 4 * width, 8 * width]
        ctx = _Ctx(binary, binarizer, weight_mode, pad_value, shortcut)
        self.backbone = Backbone(ctx, self.widths, blocks)
        self.vib = nn.ModuleList([VIB(c, binary=vib_binary, binarizer=binarizer, weight_mode=weight_mode)
                                  for c in self.widths]) if vib else None
        w = self.widths
        self.itp = nn.ModuleList([
            InitialTaskPrediction(ctx, self.tasks, w[s] + (w[s + 1] if s < 3 else 0), w[s], num_classes)
            for s in range(4)])
        self.fpm = nn.ModuleList([FPM(ctx, self.tasks, w[s]) for s in (1, 2, 3)])  # fpm[s-1] propagates s -> s-1
        self.mmd = nn.ModuleList([MultiModalDistillation(ctx, self.tasks, w[s], gate_from, mmd_sign) for s in range(4)])
        self.heads = nn.ModuleDict({t: Head(ctx, w, task_channels(t, num_classes)) for t in self.tasks})

    def forward(self, x, return_aux: bool = False):
        size = x.shape[-2:]
        feats = self.backbone(x)
        aux = {"features": {}, "vib": [], "deep_supervision": {}}
        for s, f in enumerate(feats):
            aux["features"][f"backbone.{s}"] = f
        if self.vib is not None:
            zs = []
            for f, v in zip(feats, self.vib):
                z, mu, logvar = v(f)
                zs.append(z)
                aux["vib"].append((mu, logvar))
            feats = zs
        task_feats = [None] * 4
        prev = None
        for s in (3, 2, 1, 0):
            tf, preds = self.itp[s](feats[s], prev)
            task_feats[s] = tf
            aux["deep_supervision"][f"scale_{s}"] = preds
            if s > 0:
                prev = self.fpm[s - 1](tf)
        distilled = [self.mmd[s](task_feats[s]) for s in range(4)]
        for s in range(4):
            for t in self.tasks:
                aux["features"][f"mmd.{s}.{t}"] = distilled[s][t]
        out = {t: _resize(self.heads[t]([distilled[s][t] for s in range(4)]), size) for t in self.tasks}
        if return_aux:
            return out, aux
        return out
