"""The registry of built-in architectures (``bdp models``).

Each entry builds a ``torch.nn.Module`` whose ``forward(x)`` returns ``{task: tensor}`` at the
input's resolution. Configs are plain dicts of ints, floats, strings and lists so that a
checkpoint holding one loads with ``torch.load(weights_only=True)``.

Architectures:

=====================  ==========================================================================
``bireal-tiny``        demo: float stem, Bi-Real binary body, float 1x1 heads (semseg, depth)
``mtinet``             full-precision MTI-Net (semseg, depth, normals, edges)
``bi-mtdp``            MTI-Net with binary backbone, initial predictions, FPM, distillation, heads
``bi-mtdp-c``          float backbone, binary multi-modal distillation (binary attention)
``bi-mtdp-f``          ``bi-mtdp`` + variational information bottleneck (train with an ``mtinet``
                       teacher for feature distillation)
``bidense``            binary ConvNeXt + UperNet-lite with DAB + CFB (semseg, depth)
``bq-dense``           ReActNet encoder, binary efficient attention, multi-branch binary upsampling
                       (semseg, edges)
``bnn-baseline``       the ``bidense`` skeleton with plain sign-STE binary convs (semseg, depth)
``reactnet-baseline``  the ``bidense`` skeleton with RSign + RPReLU (semseg, depth)
=====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bdp.errors import first_line

from .arch_bidense import BinaryUperNet
from .arch_bqdense import BQDense
from .arch_mtinet import MTINet
from .layers import BinaryConv2d, BiRealBlock
from .tasks import DEFAULT_CLASSES, TASKS, task_channels


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


# ---------------------------------------------------------------------------------------------
# Configs from files: checked before anything is built (a checkpoint is untrusted input)

# integer settings a config may give, (min, max); a list of integers takes each element's range
INT_RANGES = {"width": (1, 512), "blocks": (1, 16), "num_classes": (1, 1000), "features": (1, 1024),
              "kernel_size": (1, 15), "depths": (1, 16)}
MAX_LIST = 16
MAX_PARAM_BYTES = 1 << 30  # float32 parameters of one model


def validate_config(name: str, cfg, where="config") -> dict:
    """CFG checked against architecture NAME's settings: known keys only, each of its default's
    type (int, float, bool, str, list), integers in :data:`INT_RANGES`, finite floats, short
    strings and lists. InputError naming WHERE and the key on any fault."""
    from bdp.errors import InputError

    if name not in ARCHITECTURES:
        raise InputError(f"{where}: unknown architecture '{name}' (known: {', '.join(sorted(ARCHITECTURES))})")
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: config is not a mapping")
    defaults = ARCHITECTURES[name].defaults
    out = {}
    for key, v in cfg.items():
        if key not in defaults:
            raise InputError(f"{where}: config does not fit architecture '{name}': '{str(key)[:40]}' is not one "
                             f"of its settings ({', '.join(sorted(defaults))})")
        out[key] = _check_value(where, key, v, defaults[key])
    return out


def _show(v):
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check_value(where, key, v, default):
    import math

    from bdp.errors import InputError

    def bad(what):
        raise InputError(f"{where}: setting '{key}' must be {what}, got {_show(v)}")

    if isinstance(default, bool):
        if not isinstance(v, bool):
            bad("true or false")
        return v
    if isinstance(default, int):
        lo, hi = INT_RANGES.get(key, (0, 4096))
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            bad(f"an integer from {lo} to {hi}")
        return v
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e6:
            bad("a finite number")
        if key == "pad_value" and v not in (-1, 0, 1):
            bad("0, 1 or -1")
        if key == "max_depth" and v <= 0:
            bad("a positive number")
        return float(v)
    if isinstance(default, str):
        if not isinstance(v, str) or not 0 < len(v) <= 32 or not v.replace("-", "_").isidentifier():
            bad("a short name")
        return v
    if isinstance(default, list):
        if not isinstance(v, (list, tuple)) or len(v) > MAX_LIST:
            bad(f"a list of at most {MAX_LIST} items")
        kind = type(default[0]) if default else str
        items = [_check_value(where, key, x, default[0] if default else "") for x in v] if kind is not str else v
        if kind is str:
            for x in v:
                if not isinstance(x, str) or not 0 < len(x) <= 32 or not x.replace("-", "_").isidentifier():
                    bad("a list of short names")
            if key == "tasks":
                unknown = [t for t in v if t not in TASKS]
                if unknown or not v or len(set(v)) != len(v):
                    bad(f"a list of distinct tasks from {', '.join(TASKS)}")
        return list(items)
    bad(f"like its default {_show(default)}")


def build_checked(name: str, overrides, where="config", device=None) -> nn.Module:
    """``build`` for a config from a file or the command line: :func:`validate_config`, then the
    model built on torch's meta device (no memory) to count its parameters, refused above
    :data:`MAX_PARAM_BYTES`; then (unless DEVICE is 'meta') built for real. The architecture's
    own checks (ValueError, ...) become InputError too."""
    from bdp.errors import InputError

    cfg = validate_config(name, overrides, where)
    try:
        with torch.device("meta"):
            meta = build(name, **cfg)
    except (ValueError, TypeError, KeyError, AssertionError, IndexError, RuntimeError) as e:
        raise InputError(f"{where}: config does not fit architecture '{name}' "
                         f"({first_line(e, 160)})") from None
    nbytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in meta.buffers())
    if nbytes > MAX_PARAM_BYTES:
        raise InputError(f"{where}: this config of '{name}' has {nbytes / 2**30:.1f} GiB of weights; bdp builds "
                         f"models up to {MAX_PARAM_BYTES / 2**30:.0f} GiB")
    if device == "meta":
        return meta
    return build(name, **cfg)


def forward_bytes(model: nn.Module, input_shape, probe=64) -> int:
    """About how many bytes the tensors of one forward pass at INPUT_SHAPE take: every tensor
    any operator makes, summed (an upper bound of the activation memory a forward, an export or
    a compile needs). Counted at the operator level on a real forward at 1 x C x PROBE x PROBE
    and scaled by the number of pixels (the networks are fully convolutional): milliseconds."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    n, c, h, w = (list(input_shape) + [1, 1, 1, 1])[:4]
    total = [0]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    total[0] += t.numel() * t.element_size()
            return out

    was = model.training
    model.eval()
    x = torch.zeros(1, c, probe, probe)
    try:
        with torch.no_grad(), _Count():
            model(x)
    finally:
        model.train(was)
    scale = (n * h * w) / float(probe * probe)
    return int(total[0] * scale) + n * c * h * w * 4


def count_macs(model: nn.Module, input_shape=(1, 3, 256, 320)) -> dict:
    """Binary and float multiply-accumulates of convolutions and linear layers for one forward.

    A convolution counts as binary when it is a ``BinaryConv2d`` or carries ``bdp_binary = True``
    (``BinaryConvTranspose2d``). Modules with a ``bdp_macs(inputs, output) -> {"binary": n,
    "float": n}`` method add their own (the matrix products of attention).
    """
    macs = {"binary": 0, "float": 0}
    hooks = []

    def extra(mod, inp, out):
        for k, v in mod.bdp_macs(inp, out).items():
            macs[k] += int(v)

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
        if callable(getattr(m, "bdp_macs", None)):
            hooks.append(m.register_forward_hook(extra))
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


# ---------------------------------------------------------------------------------------------
# The MTI-Net family (Bi-MTDP, Shang et al. CVPR 2024)

MTI_TASKS = ["semseg", "depth", "normals", "edges"]
_BINARY_ALL = ["backbone", "itp", "fpm", "mmd", "heads"]


def _mti_defaults(**overrides):
    """The configuration the four MTI-Net family entries share; each entry names what differs."""
    cfg = dict(width=16, tasks=list(MTI_TASKS), num_classes=DEFAULT_CLASSES, blocks=1, binary=[],
               binarizer="approxsign", weight_mode="xnor", pad_value=0.0, vib=False, vib_binary=False,
               gate_from="target", mmd_sign=False, shortcut="conv")
    cfg.update(overrides)
    return cfg


@register_arch("mtinet", "full-precision MTI-Net (small ResNet backbone at 1/4..1/32, initial task predictions, "
               "feature propagation, multi-modal distillation with spatial attention, HRNet-style heads)",
               **_mti_defaults(binary=[], gate_from="source"))
def _mtinet(**cfg):
    return MTINet(**cfg)


@register_arch("bi-mtdp", "Bi-MTDP: MTI-Net with binary backbone, initial predictions, feature propagation, "
               "distillation (binary attention) and heads (Bi-Real blocks, ApproxSign)",
               **_mti_defaults(binary=list(_BINARY_ALL)))
def _bi_mtdp(**cfg):
    return MTINet(**cfg)


@register_arch("bi-mtdp-c", "Bi-MTDP-C: full-precision MTI-Net whose multi-modal distillation is binary "
               "(binary convs, binary {0,1} attention gate)",
               **_mti_defaults(binary=["mmd"]))
def _bi_mtdp_c(**cfg):
    return MTINet(**cfg)


@register_arch("bi-mtdp-f", "Bi-MTDP-F: Bi-MTDP + variational information bottleneck after the binary backbone; "
               "trained with feature distillation from an mtinet teacher (bdp train --teacher)",
               **_mti_defaults(binary=list(_BINARY_ALL), vib=True))
def _bi_mtdp_f(**cfg):
    return MTINet(**cfg)


# ---------------------------------------------------------------------------------------------
# BiDense (Yin et al. 2024) and the BNN / ReActNet baselines on the same skeleton

_UPER = dict(width=32, depths=[1, 1, 2, 1], tasks=["semseg", "depth"], num_classes=DEFAULT_CLASSES, features=64,
             max_depth=10.0, kernel_size=7, weight_mode="xnor", pad_value=0.0, head_at_full_res=False,
             dab_alpha="channel")


@register_arch("bidense", "BiDense: binary ConvNeXt + UperNet-lite, Distribution-adaptive Binarizer and "
               "Channel-adaptive Full-precision Bypass; depth head sigmoid * max_depth", variant="bidense", **_UPER)
def _bidense(**cfg):
    return BinaryUperNet(**cfg)


@register_arch("bnn-baseline", "plain BNN baseline: the bidense skeleton with sign-STE binary convs, "
               "residual connections, no bypass across width changes", variant="bnn", **_UPER)
def _bnn_baseline(**cfg):
    return BinaryUperNet(**cfg)


@register_arch("reactnet-baseline", "ReActNet baseline: the bidense skeleton with RSign binarizers and RPReLU",
               variant="reactnet", **_UPER)
def _reactnet_baseline(**cfg):
    return BinaryUperNet(**cfg)


# ---------------------------------------------------------------------------------------------
# Ding et al. 2024: multi-branch binary upsampling + cheap binary attention


@register_arch("bq-dense", "binary encoder-decoder after Ding et al. 2024: ReActNet encoder, binary two-part "
               "(efficient) attention, gated multi-branch binary upsampling; semseg + edges",
               width=32, tasks=["semseg", "edges"], num_classes=DEFAULT_CLASSES, blocks=[1, 1, 2], binarizer="rsign",
               weight_mode="xnor", pad_value=0.0, branches=["transpose", "shuffle"], attention=True)
def _bq_dense(**cfg):
    return BQDense(**cfg)


def describe(name: str, input_shape=(1, 3, 256, 320)) -> dict:
    """Name, tasks, parameter count, share of MACs that are binary (at INPUT_SHAPE) and the
    description of a built-in architecture (what ``bdp models`` prints)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = arch.make()
    macs = count_macs(model, input_shape)
    total = macs["binary"] + macs["float"]
    return {
        "name": name,
        "tasks": list(getattr(model, "tasks", arch.defaults.get("tasks", []))),
        "params": sum(p.numel() for p in model.parameters()),
        "binary_mac_share": macs["binary"] / total if total else 0.0,
        "binary_macs": macs["binary"],
        "float_macs": macs["float"],
        "description": arch.description,
    }
