"""The registry of built-in architectures (``bdp models``).

Each entry builds a ``torch.nn.Module`` whose ``forward(x)`` returns ``{task: tensor}`` at the
input's resolution. Configs are plain dicts of ints, floats, strings and lists so that a
checkpoint holding one loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BinaryConv2d, BiRealBlock
from .tasks import DEFAULT_CLASSES, task_channels


@dataclass
class Arch:
    name: str
    build: Callable[..., nn.Module]
    description: str
    defaults: dict = field(default_factory=dict)

    def make(self, **overrides) -> nn.Module:
        cfg = {**self.defaults, **overrides}
        model = self.build(**cfg)
        model.bdp_arch = self.name
        model.bdp_config = cfg
        return model


ARCHITECTURES: dict[str, Arch] = {}


def register_arch(name, description, **defaults):
    def deco(fn):
        ARCHITECTURES[name] = Arch(name, fn, description, defaults)
        return fn

    return deco


def build(name: str, **overrides) -> nn.Module:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name].make(**overrides)


def count_macs(model: nn.Module, input_shape=(1, 3, 256, 320)) -> dict:
    """Binary and float multiply-accumulates of convolutions and linear layers for one forward."""
    macs = {"binary": 0, "float": 0}
    hooks = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.weight.numel() // mod.out_channels  # (C/g) * kh * kw
            n = out.numel() * k
        elif isinstance(mod, nn.ConvTranspose2d):
            n = inp[0].numel() * mod.weight.numel() // mod.weight.shape[0]
        elif isinstance(mod, nn.Linear):
            n = out.numel() * mod.in_features
        else:
            return
        macs["binary" if getattr(mod, "bdp_binary", False) or isinstance(mod, BinaryConv2d) else "float"] += n

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_shape))
    model.train(was)
    for h in hooks:
        h.remove()
    return macs


class TinyBiReal(nn.Module):
    """A small binary dense predictor: float stem, Bi-Real binary body, float 1x1 heads.

    stem: conv3x3/2 + BN + PReLU (float) -> stage 1 at 1/2 (binary, ``width`` channels),
    stage 2 at 1/4 (binary, 2*width), stage 3 at 1/8 (binary, 4*width, dilated) -> per task a
    float 1x1 conv -> bilinear upsampling to the input size.
    """

    def __init__(self, width=32, tasks=("semseg", "depth"), num_classes=DEFAULT_CLASSES, blocks=2,
                 binarizer="ste", pad_value=0.0):
        super().__init__()
        self.tasks = list(tasks)
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.PReLU(w))
        layers = []
        cin = w
        for i, (c, s, d) in enumerate([(w, 1, 1), (2 * w, 2, 1), (4 * w, 2, 1)]):
            for j in range(blocks):
                layers.append(BiRealBlock(cin, c, stride=s if j == 0 else 1, dilation=d if j else 1,
                                          binarizer=binarizer, pad_value=pad_value))
                cin = c
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Conv2d(cin, task_channels(t, num_classes), 1) for t in self.tasks})

    def forward(self, x):
        f = self.body(self.stem(x))
        size = x.shape[-2:]
        return {t: F.interpolate(h(f), size=size, mode="bilinear", align_corners=False) for t, h in self.heads.items()}


@register_arch("bireal-tiny", "small Bi-Real binary dense predictor (float stem and heads): semseg + depth",
               width=32, tasks=["semseg", "depth"], num_classes=DEFAULT_CLASSES, blocks=2,
               binarizer="ste", pad_value=0.0)
def _bireal_tiny(**cfg):
    return TinyBiReal(**cfg)
