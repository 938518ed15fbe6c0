"""Binarizers: the sign function with a surrogate gradient, one registry for all of them.

Every binarizer maps a real tensor to {-1, +1} with ``sgn(x) = +1 if x >= 0 else -1`` in the
forward pass (sign(0) = +1, the binary-network convention; ``torch.sign`` gives 0 there).
They differ in the backward pass and in what they subtract or multiply around the sign. In eval
mode each returns the plain form ``torch.where(x - beta >= 0, 1, -1)`` (optionally times a
scale ``alpha``), written with :func:`hard_sign`, so that the exported ONNX graph reads
``Sub -> GreaterOrEqual -> Where [-> Mul]``, the form bdp's passes recognise. ``beta`` is 0 for
``ste`` / ``approxsign`` / ``ede``, a per-channel parameter for ``rsign`` and a per-sample,
per-channel statistic for ``dab``.

=============  ===========================================  ============================================
name           forward (training and eval)                  backward dL/dx (g = dL/dy)
=============  ===========================================  ============================================
``ste``        y = sgn(x)                                   g * 1{|x| <= 1}                 (clipped STE)
``approxsign`` y = sgn(x)                                   g * (2 + 2x) on [-1, 0), g * (2 - 2x) on
                                                            [0, 1], 0 outside               (Bi-Real)
``ede``        y = sgn(x)                                   g * k * t * (1 - tanh(t x)^2)   (IR-Net)
``rsign``      y = sgn(x - beta_c)                          ApproxSign'(x - beta_c) * g; dL/dbeta_c =
                                                            -sum of that over N, H, W       (ReActNet)
``dab``        s = x - (k_c mean_hw(x) + b_c),              g * alpha * ApproxSign'(s); statistics
               alpha = exp(a_c (mean_hw|s| - 1)),           detached; k, b, a get their chain-rule
               y = alpha * sgn(s)                           gradients                       (BiDense)
=============  ===========================================  ============================================

Register a new one with :func:`register_binarizer`; build one by name with :func:`make_binarizer`.
Progress-dependent binarizers (``ede``) expose ``set_progress(p)``; :func:`set_training_progress`
calls it on every module of a model.

Weights: :func:`binarize_weight` gives ``alpha_c * sgn(W)`` per output channel (XNOR-Net), or
with ``standardize=True, pow2=True`` IR-Net's variant (per-channel standardisation of W before the
sign, ``alpha_c`` rounded to a power of two). Either way the exported weight is a constant
``alpha_c * (+-1)`` per output channel.
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
    """sgn(x) = +1 for x >= 0, -1 otherwise (same dtype as x).

    Exports as ``GreaterOrEqual(x, 0) -> Where(., 1, -1)`` with scalar constants (a full-shape
    ``ones_like`` would put an activation-sized constant into the ONNX file for every sign)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def _use_surrogate(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------
# Surrogate gradients (closed forms, also used by the tests)


def ste_grad(x: torch.Tensor) -> torch.Tensor:
    """d sgn(x)/dx of the clipped STE: 1{|x| <= 1}."""
    return (x.abs() <= 1).to(x.dtype)


def approxsign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real ApproxSign derivative: 2 + 2x on [-1, 0), 2 - 2x on [0, 1], 0 elsewhere."""
    neg = (x >= -1) & (x < 0)
    pos = (x >= 0) & (x <= 1)
    return torch.where(neg, 2 + 2 * x, torch.zeros_like(x)) + torch.where(pos, 2 - 2 * x, torch.zeros_like(x))


def ede_grad(x: torch.Tensor, k: float, t: float) -> torch.Tensor:
    """IR-Net Error Decay Estimator derivative: k * t * (1 - tanh(t x)^2)."""
    return k * t * (1 - torch.tanh(t * x) ** 2)


class _ClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return hard_sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return hard_sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * approxsign_grad(x).to(g.dtype)


class _EDESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, t):
        ctx.save_for_backward(x)
        ctx.k, ctx.t = float(k), float(t)
        return hard_sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ede_grad(x, ctx.k, ctx.t).to(g.dtype), None, None


# ---------------------------------------------------------------------------------------------
# Activation binarizers


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


@register_binarizer("approxsign")
class ApproxSign(nn.Module):
    """Bi-Real Net's ApproxSign (Liu et al., 2018).

    forward:  y = sgn(x)
    backward: dL/dx = dL/dy * F'(x), the derivative of the piecewise quadratic
              F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0), 2x - x^2 (0 <= x < 1), 1 (x >= 1):
              F'(x) = 2 + 2x on [-1, 0), 2 - 2x on [0, 1], 0 outside.
    """

    def __init__(self, channels: int | None = None):
        super().__init__()

    def forward(self, x):
        if _use_surrogate(self):
            return _ApproxSign.apply(x)
        return hard_sign(x)


@register_binarizer("ede")
class EDESign(nn.Module):
    """IR-Net's Error Decay Estimator (Qin et al., 2020).

    forward:  y = sgn(x)
    backward: dL/dx = dL/dy * k * t * (1 - tanh(t x)^2)
    schedule: ``set_progress(p)`` with p in [0, 1] (fraction of training done) sets
              ``t = t_min * (t_max / t_min) ** p`` and ``k = max(1 / t, 1)``.

    Early in training (small t) the estimator is the identity (k t = 1, tanh flat): every weight
    gets gradient; late (large t) it approaches the true sign derivative. The defaults
    ``t_min=1e-3, t_max=10`` follow the project notes; IR-Net's paper and released code use
    ``T_min = 0.1, T_max = 10`` (pass ``t_min=0.1`` for that). ``t``/``k`` are plain attributes,
    not state: :func:`bdp.models.train.train` sets them from the epoch at every step.
    """

    def __init__(self, channels: int | None = None, t_min: float = 1e-3, t_max: float = 10.0):
        super().__init__()
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.set_progress(0.0)

    def set_progress(self, p: float):
        p = min(max(float(p), 0.0), 1.0)
        self.t = self.t_min * (self.t_max / self.t_min) ** p
        self.k = max(1.0 / self.t, 1.0)

    def forward(self, x):
        if _use_surrogate(self):
            return _EDESign.apply(x, self.k, self.t)
        return hard_sign(x)

    def extra_repr(self):
        return f"t={self.t:.4g}, k={self.k:.4g}"


@register_binarizer("rsign")
class RSign(nn.Module):
    """ReActNet's RSign (Liu et al., 2020): sign with a learnable per-channel threshold.

    forward:  y = sgn(x - beta_c)        (beta: parameter [1, C, 1, 1], initialised to 0)
    backward: dL/dx = dL/dy * ApproxSign'(x - beta_c); dL/dbeta_c = -sum_{n,h,w} of the same.

    Eval form ``hard_sign(x - beta)``: Sub -> GreaterOrEqual -> Where, the threshold a constant
    per channel. The surrogate is ApproxSign as in ReActNet's code.
    """

    def __init__(self, channels: int | None = None):
        super().__init__()
        if channels is None:
            raise ValueError("rsign needs the number of channels")
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        s = x - self.beta
        if _use_surrogate(self):
            return _ApproxSign.apply(s)
        return hard_sign(s)


@register_binarizer("dab")
class DAB(nn.Module):
    """BiDense's Distribution-adaptive Binarizer (Yin et al., 2024).

    Per sample n and channel c, statistics over H x W, detached (no gradient through them)::

        beta  = k_c * mean_hw(x) + b_c
        s     = x - beta
        alpha = exp(a_c * (mean_hw(|s|) - 1))
        y     = alpha * sgn(s)

    backward: dL/dx = dL/dy * alpha * ApproxSign'(s); dL/db_c = -sum(dL/dy * alpha * ApproxSign'(s));
    dL/dk_c = -sum(dL/dy * alpha * ApproxSign'(s) * mean_hw(x));
    dL/da_c = sum(dL/dy * sgn(s) * alpha * (mean_hw|s| - 1)).

    ``k`` and ``a`` start near 0 (N(0, init_std^2), BiDense uses 1e-3), ``b`` at 0. At inference
    the graph needs a per-sample, per-channel global mean of the input before each binary conv
    (ReduceMean); ``|s|`` is computed as ``s * sgn(s)`` so the graph keeps to Mul (no Abs).

    ``alpha``: ``"channel"`` (the paper: one scale per sample and input channel), ``"sample"``
    (one learned ``a`` and ``mean |s|`` over C, H, W: a per-sample scalar, which a packed-bit conv
    can apply to its output; a per-input-channel scale cannot be pulled out of the popcount) or
    ``"none"`` (``y = sgn(s)``).
    """

    def __init__(self, channels: int | None = None, init_std: float = 1e-3, alpha: str = "channel"):
        super().__init__()
        if channels is None:
            raise ValueError("dab needs the number of channels")
        if alpha not in ("channel", "sample", "none"):
            raise ValueError(f"dab alpha must be 'channel', 'sample' or 'none', not '{alpha}'")
        self.alpha_mode = alpha
        self.k = nn.Parameter(torch.randn(1, channels, 1, 1) * init_std)
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if alpha != "none":
            self.a = nn.Parameter(torch.randn(1, channels if alpha == "channel" else 1, 1, 1) * init_std)

    def forward(self, x):
        m = x.detach().mean(dim=(2, 3), keepdim=True)
        s = x - (self.k * m + self.b)
        sg = hard_sign(s)
        y = _ApproxSign.apply(s) if _use_surrogate(self) else sg
        if self.alpha_mode == "none":
            return y
        dims = (2, 3) if self.alpha_mode == "channel" else (1, 2, 3)
        mabs = (s.detach() * sg.detach()).mean(dim=dims, keepdim=True)
        return torch.exp(self.a * (mabs - 1)) * y


def set_training_progress(model: nn.Module, p: float) -> None:
    """Tell every progress-dependent binarizer (``set_progress``) of MODEL that a fraction P of
    training is done (EDE's ``t``/``k`` schedule)."""
    for m in model.modules():
        fn = getattr(m, "set_progress", None)
        if callable(fn):
            fn(p)


# ---------------------------------------------------------------------------------------------
# Activation modules of binary nets


class LearnableBias(nn.Module):
    """``y = x + b_c`` (ReActNet's "move")."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``y = PReLU_c(x - gamma_c) + zeta_c`` (shift, PReLU, shift).

    gamma and zeta start at 0, the PReLU slope at ``init`` (0.25, PyTorch's default).
    Exports as Sub -> PRelu -> Add.
    """

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.prelu = nn.PReLU(channels, init=init)
        self.zeta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return self.prelu(x - self.gamma) + self.zeta


class BinaryGate(nn.Module):
    """A binarized attention gate, ``bool(z) = (sgn(z) + 1) / 2`` in {0, 1} (Bi-MTDP's binary
    attention). Built on a registry binarizer, whose surrogate gives the backward (halved)."""

    def __init__(self, channels: int, binarizer: str = "ste", **kwargs):
        super().__init__()
        self.act = make_binarizer(binarizer, channels=channels, **kwargs)

    def forward(self, z):
        return 0.5 * (self.act(z) + 1.0)


# ---------------------------------------------------------------------------------------------
# Weights


class _WeightSTE(torch.autograd.Function):
    """sgn(W) forward, identity backward (weights are latent reals; BinaryConnect)."""

    @staticmethod
    def forward(ctx, w):
        return hard_sign(w)

    @staticmethod
    def backward(ctx, g):
        return g


def binarize_weight(w: torch.Tensor, standardize: bool = False, pow2: bool = False, ede=None,
                    channel_dim: int = 0) -> torch.Tensor:
    """XNOR-Net weights: ``alpha_c * sgn(W)`` with ``alpha_c = mean |W[c]|`` per output channel
    (alpha detached, as in XNOR-Net++ / Bi-Real / ReActNet practice); identity gradient to W.

    IR-Net options: ``standardize`` replaces W by ``(W - mean_c) / std_c`` before the sign (the
    gradient flows through the standardisation, as in IR-Net's Libra-PB), ``pow2`` rounds
    ``alpha_c`` to the nearest power of two ``2^round(log2 mean|W_std[c]|)`` (a bit shift on
    integer hardware); ``ede=(k, t)`` uses the EDE surrogate for the weight's sign instead of the
    identity. ``channel_dim`` is the output-channel axis (1 for ConvTranspose weights).
    """
    dims = tuple(d for d in range(w.dim()) if d != channel_dim)
    if standardize:
        w = w - w.mean(dim=dims, keepdim=True)
        w = w / (w.std(dim=dims, keepdim=True) + 1e-8)
    alpha = w.detach().abs().mean(dim=dims, keepdim=True)
    if pow2:
        alpha = torch.exp2(torch.round(torch.log2(alpha.clamp_min(1e-12))))
    if torch.is_grad_enabled() and w.requires_grad:
        if ede is not None:
            return alpha * _EDESign.apply(w, ede[0], ede[1])
        return alpha * _WeightSTE.apply(w)
    return alpha * hard_sign(w)


def weight_mode_kwargs(mode: str) -> dict:
    """Keyword arguments of :func:`binarize_weight` for a weight mode name: ``xnor`` (mean |W|
    per channel) or ``irnet`` (standardised W, power-of-two scale)."""
    if mode == "xnor":
        return {}
    if mode == "irnet":
        return {"standardize": True, "pow2": True}
    raise ValueError(f"unknown weight mode '{mode}' (xnor, irnet)")


__all__ = ["BINARIZERS", "register_binarizer", "make_binarizer", "hard_sign", "SignSTE", "ApproxSign",
           "EDESign", "RSign", "DAB", "set_training_progress", "LearnableBias", "RPReLU", "BinaryGate",
           "binarize_weight", "weight_mode_kwargs", "ste_grad", "approxsign_grad", "ede_grad"]
