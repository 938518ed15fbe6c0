"""Binarizers: the sign function with a surrogate gradient, one registry for all of them.

Every binarizer maps a real tensor to {-1, +1} with ``sgn(x) = +1 if x >= 0 else -1`` in the
forward pass (sign(0) = +1, the binary-network convention; ``torch.sign`` gives 0 there).
They differ only in the backward pass. In eval mode each returns ``torch.where(x >= 0, 1, -1)``
so that the exported ONNX graph holds the plain ``GreaterOrEqual`` + ``Where`` form that bdp's
passes recognise.

Register a new one with :func:`register_binarizer`; build one by name with :func:`make_binarizer`.
"""

from __future__ import annotations

import torch
from torch import nn

BINARIZERS: dict[str, type] = {}


def register_binarizer(name):
    def deco(cls):
        BINARIZERS[name] = cls
        cls.binarizer_name = name
        return cls

    return deco


def make_binarizer(name: str, channels: int | None = None, **kwargs) -> nn.Module:
    if name not in BINARIZERS:
        raise KeyError(f"unknown binarizer '{name}'; known: {', '.join(sorted(BINARIZERS))}")
    return BINARIZERS[name](channels=channels, **kwargs)


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """sgn(x) = +1 for x >= 0, -1 otherwise (same dtype as x)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _ClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return hard_sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


@register_binarizer("ste")
class SignSTE(nn.Module):
    """Clipped straight-through estimator (BinaryConnect / XNOR-Net / BNN).

    forward:  y = sgn(x)
    backward: dL/dx = dL/dy * 1{|x| <= 1}
    """

    def __init__(self, channels: int | None = None):
        super().__init__()

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return _ClippedSTE.apply(x)
        return hard_sign(x)


class _WeightSTE(torch.autograd.Function):
    """sgn(W) forward, identity backward (weights are latent reals; BinaryConnect)."""

    @staticmethod
    def forward(ctx, w):
        return hard_sign(w)

    @staticmethod
    def backward(ctx, g):
        return g


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net weights: ``alpha_c * sgn(W)`` with ``alpha_c = mean |W[c]|`` per output channel
    (alpha detached, as in XNOR-Net++ / Bi-Real / ReActNet practice); identity gradient to W."""
    alpha = w.detach().abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    if torch.is_grad_enabled() and w.requires_grad:
        return alpha * _WeightSTE.apply(w)
    return alpha * hard_sign(w)
