"""Binarized networks from the wild, for tests and the survey (tests/fixtures/wild/survey.py).

Not a test file: a helper that builds ONNX models the way third-party tools write them, each
with its source framework's outputs on a few inputs, so that a test can compile the ONNX with
bdp and compare the bundle with the framework that made it.

- ``larq_model(name)``: the Larq Zoo networks (TensorFlow + tf2onnx), committed as fixtures in
  tests/fixtures/wild/ (made by make_larq.py there; CI has no TensorFlow), with TensorFlow's
  outputs. NHWC input, batch left open by tf2onnx.
- ``qkeras_model(name)``: QKeras conv nets with binary quantizers (``binary(alpha=1)``,
  ``binary()``, ``alpha="auto"``, ``use_01=True``), tf2onnx, committed the same way (make_qkeras.py).
- ``bnn_pynq(name, exporter)``: Brevitas' own bnn_pynq TFC/SFC/LFC/CNV at 1W1A, exported with
  brevitas' ``export_qonnx`` (TorchScript or dynamo), optionally through qonnx's
  ``cleanup_model``; torch outputs. Needs the ``test`` extra (brevitas, qonnx).
- ``pattern(name, exporter)``: small hand-written torch models, one binarized pattern each
  (see ``PATTERNS``), exported with torch.onnx (TorchScript or dynamo); torch outputs.

All weights are random; every BatchNorm gets trained-like statistics (``trained_like_batchnorm``:
near the statistics of the values that reach it, random gamma/beta, some gammas negative), so
thresholds are arbitrary floats. A draw in which any value entering a binarizer lies within
``MARGIN`` (relative to the tensor's largest) of 0 is redrawn: such a value is a tie that float
round-off may break either way, and the reference itself would be ambiguous.
"""

from __future__ import annotations

import io
import lzma
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "wild")
LARQ = ("QuickNet", "QuickNetSmall", "BiRealNet", "BinaryDenseNet28", "RealToBinaryNet", "BinaryAlexNet")
QKERAS = ("qkeras_binary_alpha1", "qkeras_binary", "qkeras_binary_auto", "qkeras_binary_01")
BNN_PYNQ = ("tfc_1w1a", "sfc_1w1a", "lfc_1w1a", "cnv_1w1a")
EXPORTERS = ("torchscript", "dynamo")
MARGIN = 1e-6
SAMPLES = 3


@dataclass
class WildModel:
    """An ONNX model as a third-party tool wrote it, with its source framework's outputs."""

    name: str
    model: onnx.ModelProto
    inputs: list            # numpy arrays, one batch-of-one input each
    outputs: list           # the source framework's (single) output for each input
    binary_layers: int      # 1-bit conv/linear layers (1-bit weights and 1-bit input) in the source
    source: str             # the framework and exporter
    notes: dict = field(default_factory=dict)

    def save(self, folder):
        """Write the ONNX to FOLDER/NAME.onnx; returns the path (bdp.compile takes a path)."""
        path = os.path.join(folder, self.name.replace("/", "-") + ".onnx")
        onnx.save(self.model, path)
        return path


# --------------------------------------------------------------------------- Larq Zoo fixtures

def larq_fixture_bytes(name):
    """The ONNX bytes of Larq fixture NAME (NAME.onnx or NAME.onnx.xz in tests/fixtures/wild)."""
    plain = os.path.join(FIXTURES, name + ".onnx")
    if os.path.exists(plain):
        with open(plain, "rb") as f:
            return f.read()
    with lzma.open(plain + ".xz", "rb") as f:
        return f.read()


def larq_model(name):
    """Larq Zoo network NAME as tf2onnx wrote it, with TensorFlow's outputs (NHWC inputs)."""
    io_ = np.load(os.path.join(FIXTURES, name + ".io.npz"))
    return WildModel(name=f"larq/{name}", model=onnx.load_from_string(larq_fixture_bytes(name)),
                     inputs=[x[None] for x in io_["x"]], outputs=[y[None] for y in io_["y"]],
                     binary_layers=int(io_["binary_layers"]), source="larq-zoo 2.4.0 / TF 2.15 / tf2onnx 1.17")


def qkeras_model(name):
    """QKeras network NAME (one of QKERAS, made by make_qkeras.py) as tf2onnx wrote it, with
    TensorFlow's outputs (NHWC inputs)."""
    io_ = np.load(os.path.join(FIXTURES, name + ".io.npz"))
    return WildModel(name=f"qkeras/{name}", model=onnx.load(os.path.join(FIXTURES, name + ".onnx")),
                     inputs=[x[None] for x in io_["x"]], outputs=[y[None] for y in io_["y"]],
                     binary_layers=int(io_["binary_layers"]), source="qkeras 0.9.0 / TF 2.15 / tf2onnx 1.17")


# --------------------------------------------------------------------------- shared torch helpers

def trained_like_batchnorm(module, x_calib, seed):
    """Set every BatchNorm (and bnn_pynq TensorNorm) of MODULE to trained-like values: running
    mean/var near the statistics of the input that reaches it on X_CALIB, layer after layer in
    execution order (a forward pre-hook sets them just before the layer runs in eval mode, so
    the layers after it see calibrated values), random gamma/beta with ~10% negative gammas."""
    import torch

    gen = np.random.default_rng(seed)

    def pre(mod, args):
        v = args[0].detach().double()
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            dims = [0] + list(range(2, v.dim()))
            mean, var = v.mean(dims), v.var(dims, unbiased=False)
        else:  # TensorNorm: one scalar mean and variance
            mean, var = v.mean().reshape(1), v.var(unbiased=False).reshape(1)
        c = mean.numel()
        sd = (var + 1e-6).sqrt()

        def t(a):
            return torch.as_tensor(a, dtype=torch.float32)

        mod.running_mean.copy_(t(mean.numpy() + 0.1 * sd.numpy() * gen.standard_normal(c)))
        mod.running_var.copy_(t((var.numpy() + 1e-6) * gen.uniform(0.7, 1.4, c)))
        if getattr(mod, "weight", None) is not None:
            mod.weight.data.copy_(t(gen.uniform(0.6, 1.4, c) * np.where(gen.random(c) < 0.1, -1.0, 1.0)))
        if getattr(mod, "bias", None) is not None:
            mod.bias.data.copy_(t(0.3 * gen.standard_normal(c)))

    norms = [m for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "TensorNorm"]
    hooks = [m.register_forward_pre_hook(pre) for m in norms]
    module.eval()
    try:
        with torch.no_grad():
            module(x_calib)
    finally:
        for h in hooks:
            h.remove()


def _probe(module, x, binarizers, layers, is_binary_weight):
    """Run MODULE on X; returns (smallest relative |input| over the BINARIZERS modules, number
    of LAYERS modules that are binary: 1-bit weights and an input holding two values +-c)."""
    import torch

    margins, binary = [], set()

    def on_sign(mod, args):
        v = args[0].detach().abs()
        margins.append(float(v.min() / v.max().clamp_min(1e-30)))

    def on_layer(mod, args):
        v = torch.unique(args[0].detach().abs())
        if is_binary_weight(mod) and v.numel() == 1 and float(v[0]) > 0:
            binary.add(id(mod))

    hooks = [m.register_forward_pre_hook(on_sign) for m in binarizers]
    hooks += [m.register_forward_pre_hook(on_layer) for m in layers]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return min(margins) if margins else float("inf"), len(binary)


def _export(module, x, exporter, opset=None):
    """torch.onnx export of MODULE on example X: 'torchscript' (opset 17 unless OPSET) or
    'dynamo' (torch's default opset unless OPSET)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            f = io.BytesIO()
            torch.onnx.export(module, (x,), f, dynamo=False, opset_version=opset or 17,
                              input_names=["input"], output_names=["output"])
            return onnx.load_from_string(f.getvalue())
        if exporter == "dynamo":
            kw = {"opset_version": opset} if opset else {}
            prog = torch.onnx.export(module, (x,), dynamo=True, verbose=False, input_names=["input"],
                                     output_names=["output"], **kw)
            return prog.model_proto
    raise ValueError(f"exporter {exporter!r}: one of {EXPORTERS}")


def _reference(module, inputs):
    import torch

    with torch.no_grad():
        return [module(torch.from_numpy(x)).numpy() for x in inputs]


# --------------------------------------------------------------------------- Brevitas bnn_pynq

def bnn_pynq(name, exporter="torchscript", cleanup=False, seed=0, tries=10):
    """Brevitas' bnn_pynq network NAME (tfc_1w1a, sfc_1w1a, lfc_1w1a, cnv_1w1a) with random
    weights and trained-like BatchNorm/TensorNorm, exported with brevitas' ``export_qonnx``
    (EXPORTER 'torchscript' or 'dynamo'), through qonnx's ``cleanup_model`` when CLEANUP.
    Inputs are images in [0, 1] as the models expect (MNIST 1x28x28, CIFAR-10 3x32x32)."""
    import tempfile

    import torch
    from brevitas.export import export_qonnx
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
    from brevitas_examples.bnn_pynq.models import model_with_cfg

    shape = (1, 3, 32, 32) if name.startswith("cnv") else (1, 1, 28, 28)
    for attempt in range(tries):
        s = seed + 1000 * attempt
        torch.manual_seed(s)
        gen = np.random.default_rng(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, _cfg = model_with_cfg(name, pretrained=False)
        trained_like_batchnorm(net, torch.from_numpy(gen.random((32,) + shape[1:], dtype=np.float32)), s)
        inputs = [gen.random(shape, dtype=np.float32) for _ in range(SAMPLES)]
        signs = [m for m in net.modules() if isinstance(m, QuantIdentity) and float(m.act_quant.bit_width()) == 1]
        layers = [m for m in net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        probes = [_probe(net, torch.from_numpy(x), signs, layers,
                         lambda m: float(m.weight_quant.bit_width()) == 1) for x in inputs]
        if min(p[0] for p in probes) >= MARGIN:
            break
    else:
        raise RuntimeError(f"bnn_pynq {name}: no draw kept every binarizer input {MARGIN} away from 0")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_qonnx(net, args=torch.from_numpy(inputs[0]), export_path=path, dynamo=exporter == "dynamo")
        model = onnx.load(path)
    if cleanup:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.util.cleanup import cleanup_model

        model = cleanup_model(ModelWrapper(model)).model
    tag = f"{name}/{exporter}" + ("+cleanup" if cleanup else "")
    return WildModel(name=f"brevitas/{tag}", model=model, inputs=inputs, outputs=_reference(net, inputs),
                     binary_layers=probes[0][1], source=f"brevitas export_qonnx ({exporter})"
                     + (" + qonnx cleanup" if cleanup else ""))


# --------------------------------------------------------------------------- hand-written patterns

def _torch_patterns():
    """name -> (module factory, input shape), and the binarizer and binary layer classes. Each
    model: a float stem, BatchNorm, a binarizer, the pattern on the binarized tensor, then a
    binary conv/linear (weights sign(W) * alpha per output channel, computed in forward as BNN
    code does) and BatchNorm. Every Bin* layer is binary by construction (pad_zero's conv
    reads a signed tensor with zero padding, as a padded binary conv does)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Sgn(nn.Module):
        """torch.sign: ONNX Sign (0 at 0; no value here is 0)."""

        def forward(self, x):
            return torch.sign(x)

    def _alpha(w, dims):
        return w.abs().mean(dim=dims, keepdim=True)

    class BinConv2d(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, torch.sign(self.weight) * _alpha(self.weight, (1, 2, 3)), self.bias)

    class BinConv1d(nn.Conv1d):
        def forward(self, x):
            return self._conv_forward(x, torch.sign(self.weight) * _alpha(self.weight, (1, 2)), self.bias)

    class BinConvTranspose2d(nn.ConvTranspose2d):
        def forward(self, x):
            w = torch.sign(self.weight) * _alpha(self.weight, (0, 2, 3))
            return F.conv_transpose2d(x, w, self.bias, self.stride, self.padding)

    class BinLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, torch.sign(self.weight) * _alpha(self.weight, (1,)), self.bias)

    class Stem(nn.Module):
        def __init__(self, c=16, stride=1):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, stride=stride, padding=1)
            self.bn = nn.BatchNorm2d(c)
            self.sgn = Sgn()

        def forward(self, x):
            return self.sgn(self.bn(self.conv(x)))

    class Pattern(nn.Module):
        """stem -> binarize -> OP -> binary layer -> BatchNorm (-> optional tail)."""

        def __init__(self, op, layer, bn, stem=None, tail=None):
            super().__init__()
            self.stem = stem or Stem()
            self.op, self.layer, self.bn, self.tail = op, layer, bn, tail

        def forward(self, x):
            y = self.bn(self.layer(self.op(self.stem(x))))
            return self.tail(y) if self.tail is not None else y

    class Fn(nn.Module):
        def __init__(self, fn, **params):
            super().__init__()
            self.fn = fn
            for k, v in params.items():
                self.register_buffer(k, torch.as_tensor(v, dtype=torch.float32))

        def forward(self, x):
            return self.fn(self, x)

    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Stem(8), Stem(8)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    class MatMulSign(nn.Module):
        """Binary weights as a plain torch.matmul (ONNX MatMul), optionally with a bias (Gemm)."""

        def __init__(self, k, m, gemm):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(m, k))
            self.bias = nn.Parameter(torch.randn(m) * 0.1) if gemm else None

        def forward(self, x):
            w = torch.sign(self.weight) * _alpha(self.weight, (1,))
            if self.bias is not None:
                return torch.addmm(self.bias, x, w.t())
            return torch.matmul(x, w.t())

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.bn0 = nn.Linear(64, 64), nn.BatchNorm1d(64)
            self.fc1, self.bn1 = BinLinear(64, 64, bias=False), nn.BatchNorm1d(64)
            self.fc2 = BinLinear(64, 10)
            self.s0, self.s1 = Sgn(), Sgn()

        def forward(self, x):
            x = self.s0(self.bn0(self.fc0(x)))
            x = self.s1(self.bn1(self.fc1(x)))
            return self.fc2(x)

    class Rank3(nn.Module):
        """[1, 8, 32]: Conv1d stem, binary Conv1d, then a binary linear over the last axis
        (a rank-3 MatMul)."""

        def __init__(self):
            super().__init__()
            self.conv0, self.bn0 = nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16)
            self.conv1, self.bn1 = BinConv1d(16, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16)
            self.fc = BinLinear(32, 24)
            self.s0, self.s1 = Sgn(), Sgn()

        def forward(self, x):
            x = self.s0(self.bn0(self.conv0(x)))
            x = self.s1(self.bn1(self.conv1(x)))
            return self.fc(x)

    def conv(cin=16, cout=16, k=3, pad=1):
        return BinConv2d(cin, cout, k, padding=pad, bias=False)

    def bn2(c=16):
        return nn.BatchNorm2d(c)

    def pad(v):
        return lambda: Pattern(Fn(lambda s, x: F.pad(x, (1, 1, 1, 1), value=v)), conv(pad=0), bn2())

    scale = float(np.random.default_rng(7).uniform(0.5, 2.0))
    img = (1, 3, 16, 16)
    return {
        "resize_nearest": (lambda: Pattern(Fn(lambda s, x: F.interpolate(x, scale_factor=2.0, mode="nearest")),
                                           conv(), bn2()), img),
        "concat": (lambda: Pattern(nn.Identity(), conv(), bn2(), stem=Concat()), img),
        "maxpool": (lambda: Pattern(nn.MaxPool2d(2), conv(), bn2()), img),
        "flatten": (lambda: Pattern(nn.Flatten(), BinLinear(256, 10, bias=False), nn.BatchNorm1d(10),
                                    stem=Stem(16, stride=4)), img),
        "reshape": (lambda: Pattern(Fn(lambda s, x: x.reshape(x.shape[0], -1)), BinLinear(256, 10, bias=False),
                                    nn.BatchNorm1d(10), stem=Stem(16, stride=4)), img),
        "transpose": (lambda: Pattern(Fn(lambda s, x: x.permute(0, 2, 3, 1)), BinLinear(16, 24, bias=False),
                                      nn.Identity(), tail=Fn(lambda s, x: x.permute(0, 3, 1, 2))), img),
        "pad_plus_one": (pad(1.0), img),
        "pad_minus_one": (pad(-1.0), img),
        "pad_zero": (pad(0.0), img),
        "slice": (lambda: Pattern(Fn(lambda s, x: x[:, :8, 1:, 1:]), conv(8), bn2()), img),
        "depth_to_space": (lambda: Pattern(nn.PixelShuffle(2), conv(4), bn2()), img),
        "space_to_depth": (lambda: Pattern(nn.PixelUnshuffle(2), conv(64), bn2()), img),
        "scaled_matmul": (lambda: Pattern(Fn(lambda s, x: (x * s.s).flatten(1), s=scale),
                                          MatMulSign(256, 10, gemm=False), nn.BatchNorm1d(10),
                                          stem=Stem(16, stride=4)), img),
        "scaled_gemm": (lambda: Pattern(Fn(lambda s, x: (x * s.s).flatten(1), s=scale),
                                        MatMulSign(256, 10, gemm=True), nn.Identity(),
                                        stem=Stem(16, stride=4)), img),
        "scaled_convtranspose": (lambda: Pattern(Fn(lambda s, x: x * s.s, s=scale),
                                                 BinConvTranspose2d(16, 8, 2, stride=2, bias=False), bn2(8)), img),
        "scaled_maxpool": (lambda: Pattern(Fn(lambda s, x: F.max_pool2d(x * s.s, 2), s=scale), conv(), bn2()), img),
        "mlp_rank2": (Mlp, (1, 64)),
        "rank3": (Rank3, (1, 8, 32)),
    }, (Sgn, (BinConv2d, BinConv1d, BinConvTranspose2d, BinLinear, MatMulSign))


PATTERNS = ("resize_nearest", "concat", "maxpool", "flatten", "reshape", "transpose", "pad_plus_one",
            "pad_minus_one", "pad_zero", "slice", "depth_to_space", "space_to_depth", "scaled_matmul",
            "scaled_gemm", "scaled_convtranspose", "scaled_maxpool", "mlp_rank2", "rank3")


def pattern(name, exporter="torchscript", seed=0, tries=10):
    """Hand-written binarized pattern NAME (one of PATTERNS) exported with torch.onnx
    (EXPORTER 'torchscript' or 'dynamo'); inputs standard normal."""
    import torch

    table, (sgn_cls, bin_cls) = _torch_patterns()
    make, shape = table[name]
    for attempt in range(tries):
        s = seed + 1000 * attempt
        torch.manual_seed(s)
        gen = np.random.default_rng(s)
        net = make()
        trained_like_batchnorm(net, torch.from_numpy(gen.standard_normal((16,) + shape[1:], dtype=np.float32)), s)
        inputs = [gen.standard_normal(shape, dtype=np.float32) for _ in range(SAMPLES)]
        signs = [m for m in net.modules() if isinstance(m, sgn_cls)]
        layers = [m for m in net.modules() if isinstance(m, bin_cls)]
        probes = [_probe(net, torch.from_numpy(x), signs, [], None) for x in inputs]
        if min(p[0] for p in probes) >= MARGIN:
            break
    else:
        raise RuntimeError(f"pattern {name}: no draw kept every binarizer input {MARGIN} away from 0")
    model = _export(net, torch.from_numpy(inputs[0]), exporter)
    return WildModel(name=f"torch/{name}/{exporter}", model=model, inputs=inputs, outputs=_reference(net, inputs),
                     binary_layers=len(layers), source=f"torch.onnx ({exporter})")


def catalogue():
    """Every wild model as (name, builder): the Larq fixtures, bnn_pynq under both exporters
    (and TorchScript + qonnx cleanup), every pattern under both exporters."""
    out = [(f"larq/{n}", lambda n=n: larq_model(n)) for n in LARQ]
    out += [(f"qkeras/{n}", lambda n=n: qkeras_model(n)) for n in QKERAS]
    for n in BNN_PYNQ:
        for e in EXPORTERS:
            out.append((f"brevitas/{n}/{e}", lambda n=n, e=e: bnn_pynq(n, e)))
        out.append((f"brevitas/{n}/torchscript+cleanup", lambda n=n: bnn_pynq(n, "torchscript", cleanup=True)))
    for n in PATTERNS:
        for e in EXPORTERS:
            out.append((f"torch/{n}/{e}", lambda n=n, e=e: pattern(n, e)))
    return out
