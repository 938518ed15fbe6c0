"""Binarized networks as their training code writes them, written here in the styles of the public
ReActNet, Bi-Real Net, IR-Net, FDA, AdaBin and XNOR-Net code (not copied from it): binarizers
are straight-through identities (``sign(x).detach() - p(x).detach() + p(x)``), signs inside a
``torch.autograd.Function``, two-valued activations, weights with scales folded by the exporter.

``build(style, width, blocks)`` returns an eval-mode ``nn.Module`` with trained-like statistics
(BatchNorm running stats from a calibration batch, learnable shifts and slopes drawn away from
their init), NCHW float input. ``export(model, x, how, path)`` writes it as a user would: torch.onnx
(TorchScript exporter, opset 13 or 17), the dynamo exporter, or ``torch.export.save`` (.pt2).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

STYLES = ("reactnet", "bireal", "irnet", "fda", "adabin", "autograd", "xnor")
EXPORTS = ("onnx13", "onnx17", "dynamo", "pt2")


# ------------------------------------------------------------------------------ activations
class ReActSign(nn.Module):
    """ReActNet / Bi-Real Net: sign forward, piecewise-polynomial gradient."""

    def forward(self, x):
        out_forward = torch.sign(x)
        mask1 = x < -1
        mask2 = x < 0
        mask3 = x < 1
        out1 = (-1) * mask1.type(torch.float32) + (x * x + 2 * x) * (1 - mask1.type(torch.float32))
        out2 = out1 * mask2.type(torch.float32) + (-x * x + 2 * x) * (1 - mask2.type(torch.float32))
        out3 = out2 * mask3.type(torch.float32) + 1 * (1 - mask3.type(torch.float32))
        return out_forward.detach() - out3.detach() + out3


class TanhSign(nn.Module):
    """IR-Net's EDE: sign forward, k * tanh(t x) gradient (t, k fixed at export)."""

    def __init__(self, t=3.0, k=1.2):
        super().__init__()
        self.t, self.k = t, k

    def forward(self, x):
        proxy = self.k * torch.tanh(self.t * x)
        return torch.sign(x).detach() - proxy.detach() + proxy


class SineSign(nn.Module):
    """FDA: sign forward, a truncated Fourier (sine) series of the square wave as gradient."""

    def __init__(self, terms=4, omega=math.pi / 2):
        super().__init__()
        self.terms, self.omega = terms, omega

    def forward(self, x):
        proxy = 0
        for i in range(self.terms):
            n = 2 * i + 1
            proxy = proxy + (4 / math.pi) * torch.sin(n * self.omega * x) / n
        return torch.sign(x).detach() - proxy.detach() + proxy


class _SignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class FnSign(nn.Module):
    def forward(self, x):
        return _SignFn.apply(x)


class AdaBinAct(nn.Module):
    """AdaBin: activations binarized to {c - b, c + b} with a learnable center c and width b."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(1.0))
        self.c = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        s = torch.sign(x - self.c)
        ste = s.detach() - torch.clamp(x - self.c, -1, 1).detach() + torch.clamp(x - self.c, -1, 1)
        return self.b * ste + self.c


class LearnableBias(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.bias.expand_as(x)


class RPReLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.b0, self.b1 = LearnableBias(c), LearnableBias(c)
        self.prelu = nn.PReLU(c)

    def forward(self, x):
        return self.b1(self.prelu(self.b0(x)))


# ------------------------------------------------------------------------------ binary convs
class STEConv(nn.Conv2d):
    """A conv whose weights are binarized in forward, the way each style writes it."""

    def __init__(self, cin, cout, k=3, stride=1, padding=1, groups=1, style="reactnet"):
        super().__init__(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.style = style
        nn.init.normal_(self.weight, 0, 0.4)  # some latent weights near and past the clip

    def binary_weight(self):
        w = self.weight
        if self.style in ("reactnet", "autograd", "fda", "xnor"):
            s = torch.mean(torch.mean(torch.mean(abs(w), dim=3, keepdim=True), dim=2, keepdim=True), dim=1, keepdim=True)
            s = s.detach()
            bw = s * torch.sign(w)
            cw = torch.clamp(w, -1.0, 1.0)
            return bw.detach() - cw.detach() + cw
        if self.style == "bireal":
            s = torch.mean(abs(w), dim=(1, 2, 3), keepdim=True).detach()
            cliped = torch.clamp(w, -1.0, 1.0)
            return (s * torch.sign(w)).detach() - cliped.detach() + cliped
        if self.style == "irnet":
            bw = w - w.view(w.size(0), -1).mean(-1).view(w.size(0), 1, 1, 1)
            bw = bw / bw.view(bw.size(0), -1).std(-1).view(bw.size(0), 1, 1, 1)
            sw = torch.pow(torch.tensor([2.0] * bw.size(0)),
                           (torch.log(bw.abs().view(bw.size(0), -1).mean(-1)) / math.log(2)).round().float()
                           ).view(bw.size(0), 1, 1, 1).detach()
            return torch.sign(bw) * sw
        if self.style == "adabin":
            mu = w.mean(dim=(1, 2, 3), keepdim=True)
            sig = (w - mu).std(dim=(1, 2, 3), keepdim=True)
            bw = torch.sign(w - mu)
            bw = torch.where(bw == 0, torch.ones_like(bw), bw)
            return (mu + sig * bw).detach() - w.detach() + w
        raise ValueError(self.style)

    def forward(self, x):
        return F.conv2d(x, self.binary_weight(), None, self.stride, self.padding, self.dilation, self.groups)


def _act(style):
    return {"reactnet": ReActSign, "bireal": ReActSign, "irnet": TanhSign, "fda": SineSign, "autograd": FnSign,
            "adabin": AdaBinAct, "xnor": ReActSign}[style]()


class BinaryBlock(nn.Module):
    """One binary conv with its style's glue: ReActNet's shift + RPReLU, Bi-Real's shortcut,
    XNOR-Net's K map (mean |x| over channels, box-filtered)."""

    def __init__(self, cin, cout, stride, style, groups=1):
        super().__init__()
        self.style = style
        self.shift = LearnableBias(cin) if style in ("reactnet", "adabin") else nn.Identity()
        self.act = _act(style)
        self.conv = STEConv(cin, cout, 3, stride, 1, groups=groups, style=style)
        self.bn = nn.BatchNorm2d(cout)
        self.out = RPReLU(cout) if style == "reactnet" else nn.Identity()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                      nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.conv(self.act(self.shift(x)))
        if self.style == "xnor":
            k = torch.mean(torch.abs(x), dim=1, keepdim=True)
            k = F.avg_pool2d(k, 3, self.conv.stride, 1, count_include_pad=True)
            y = y * k
        y = self.bn(y)
        short = x if self.down is None else self.down(x)
        return self.out(y + short)


class STENet(nn.Module):
    """A float stem, binary blocks, a float head (dense: per-pixel logits)."""

    def __init__(self, style, width=16, blocks=4, classes=5):
        super().__init__()
        # no ReLU before the first binarizer: its exact zeros would sit on the sign's threshold
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width))
        layers, c = [], width
        for i in range(blocks):
            stride = 2 if i in (1, 3) else 1
            cout = c * 2 if stride == 2 else c
            layers.append(BinaryBlock(c, cout, stride, style))
            c = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def n_binary(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, STEConv))


def build(style, width=16, blocks=4, seed=0, size=(32, 32)):
    torch.manual_seed(seed)
    return _trained_like(STENet(style, width, blocks), seed, size, batches=3, batch=4)


def export(model, x, how, path):
    """Write MODEL as HOW: onnx13 / onnx17 (TorchScript exporter), dynamo (opset 20), pt2."""
    if how == "pt2":
        ep = torch.export.export(model, (x,))
        torch.export.save(ep, path)
    elif how == "dynamo":
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=20, input_names=["x"], external_data=False)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=int(how[4:]), input_names=["x"])
    return path


# ------------------------------------------------------------------ full-size networks (bench)
class ReActBlock(nn.Module):
    """ReActNet-A's block (MobileNetV1 layout): a binary 3x3 conv of in -> in channels (stride 1
    or 2, average-pooled shortcut), then binary 1x1 conv(s) to the output width (two side by side,
    concatenated, where the width doubles); learnable shifts and RPReLU around each."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, self.double = stride, cout == 2 * cin
        assert cout in (cin, 2 * cin)
        self.move11, self.act = LearnableBias(cin), ReActSign()
        self.binary_3x3 = STEConv(cin, cin, 3, stride, 1, style="reactnet")
        self.bn1 = nn.BatchNorm2d(cin)
        self.rp1 = RPReLU(cin)
        self.move21 = LearnableBias(cin)
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        if self.double:
            self.pw1, self.pw2 = STEConv(cin, cin, 1, 1, 0, style="reactnet"), STEConv(cin, cin, 1, 1, 0, style="reactnet")
            self.bn21, self.bn22 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cin)
        else:
            self.pw = STEConv(cin, cout, 1, 1, 0, style="reactnet")
            self.bn2 = nn.BatchNorm2d(cout)
        self.rp2 = RPReLU(cout)

    def forward(self, x):
        out1 = self.bn1(self.binary_3x3(self.act(self.move11(x)))) + self.pool(x)
        out1 = self.rp1(out1)
        b = self.act(self.move21(out1))
        if self.double:
            out2 = torch.cat([self.bn21(self.pw1(b)) + out1, self.bn22(self.pw2(b)) + out1], 1)
        else:
            out2 = self.bn2(self.pw(b)) + out1
        return self.rp2(out2)


class ReActNetA(nn.Module):
    """ReActNet-A's layout: float 3x3/2 stem of 32, 13 blocks (31 binary convs), float head."""

    WIDTHS = [(32, 64, 2), (64, 128, 1), (128, 128, 2), (128, 256, 1), (256, 256, 2), (256, 512, 1)] + \
        [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]

    def __init__(self, classes=1000, scale=1.0):
        super().__init__()
        w = lambda c: max(8, int(c * scale))  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, w(32), 3, 2, 1, bias=False), nn.BatchNorm2d(w(32)))
        strides = [s for _, _, s in self.WIDTHS]
        self.body = nn.Sequential(*[ReActBlock(w(a), w(b), s) for (a, b, _), s in zip(self.WIDTHS, strides)])
        self.head = nn.Linear(w(1024), classes)

    def forward(self, x):
        y = self.body(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class BiRealBlock(nn.Module):
    """Bi-Real Net's unit: sign -> binary 3x3 conv -> BN, plus the real-valued shortcut around
    every binary conv (average pool + float 1x1 conv + BN where the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.act = ReActSign()
        self.conv = STEConv(cin, cout, 3, stride, 1, style="bireal")
        self.bn = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity(),
                                      nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.bn(self.conv(self.act(x))) + (x if self.down is None else self.down(x))


class BiReal18(nn.Module):
    """Bi-Real-Net-18's layout: 7x7/2 float stem + max pool, 16 binary 3x3 convs, float head."""

    def __init__(self, classes=1000, scale=1.0):
        super().__init__()
        w = lambda c: max(8, int(c * scale))  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, w(64), 7, 2, 3, bias=False), nn.BatchNorm2d(w(64)),
                                  nn.MaxPool2d(3, 2, 1))
        units, c = [], w(64)
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(4):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(BiRealBlock(c, w(width), stride))
                c = w(width)
        self.body = nn.Sequential(*units)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        y = self.body(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


FULL = {"reactnet-a": ReActNetA, "bireal-18": BiReal18}


def build_full(name, size=224, seed=0, scale=1.0, classes=1000):
    """A full-size network of FULL with trained-like statistics (as :func:`build`)."""
    torch.manual_seed(seed)
    model = FULL[name](classes=classes, scale=scale)
    _trained_like(model, seed, (size, size))
    return model


def _trained_like(model, seed, size, batches=1, batch=2):
    """Trained-like statistics: learnable shifts, AdaBin's b and c, PReLU slopes drawn away from
    their init; BatchNorm running stats from BATCHES calibration batches, then random gamma/beta."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():  # torch's normal_ can draw an exact 0: sign(0) = 0, a ternary weight
            if isinstance(m, STEConv):
                m.weight[m.weight == 0] = 1e-3
        for n, p in model.named_parameters():
            if "bias" in n and p.dim() == 4:  # learnable shifts
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if n.endswith(".b"):
                p.fill_(0.5 + float(torch.rand((), generator=g)))
            if n.endswith(".c"):
                p.fill_(0.2 * float(torch.randn((), generator=g)))
            if "prelu" in n:
                p.copy_(0.25 + 0.1 * torch.randn(p.shape, generator=g))
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, *size, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return model.eval()
