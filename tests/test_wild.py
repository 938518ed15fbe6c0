"""Binarized networks from the wild compile packed and equal the framework that made them.

Models (tests/wild_models.py): the Larq Zoo fixtures (TensorFlow + tf2onnx, committed with
TensorFlow's outputs), Brevitas' bnn_pynq TFC/SFC/LFC/CNV at 1W1A (``export_qonnx``, TorchScript
and dynamo; TFC also through qonnx's cleanup), and hand-written torch patterns (torch.onnx:
dynamo, and TorchScript where it writes another graph). For each, compiled for x86 with bdp:

* every 1-bit conv/linear layer of the source (1-bit weights and a 1-bit input) is packed
  (``stats.binary_convs``), and no layer left in float is a binarized one (its reason says
  what the layer is: a float stem, an 8-bit quantized input, 1-bit weights behind a float input);
* the bundle's outputs equal the source framework's on the stored inputs, within 1e-3 of the
  largest |output|. (The builders redraw any draw that puts a binarizer input within 1e-6 of its
  threshold, so no value lies on a threshold and no bit is left to rounding.)

One Larq fixture also compiles for rpi4 and runs under qemu-aarch64, equal to TensorFlow. Then
the passes behind the wild models, on small hand-made graphs: binary MatMul on inputs of rank 4
and 5 (static and open dims), binarized 1-D convolutions, and the reasons for float layers.

A few small models run in the fast set; the rest are ``slow`` (CI runs them too). Each model is
built and compiled once per session (a cache shared by the parametrized tests).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bdp
from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime

import wild_models as W

RTOL = 1e-3

FAST = {"larq/QuickNet", "qkeras/qkeras_binary_01", "brevitas/tfc_1w1a/torchscript", "torch/transpose/dynamo", "torch/rank3/torchscript"}
# torch patterns run as the dynamo exporter (torch.onnx's default) writes them, and also as the
# TorchScript exporter does where its graph differs (another op chain from binarizer to layer,
# tests/fixtures/wild/SURVEY.md): Flatten vs Reshape, MatMul vs Gemm, an explicit zero Pad
TORCHSCRIPT_DIFFERS = {"flatten", "reshape", "pad_zero", "scaled_matmul", "scaled_gemm", "mlp_rank2", "rank3"}


def _cases():
    """(name, builder) of every model under test: the catalogue, with qonnx cleanup for TFC
    only and the TorchScript patterns above."""
    out = []
    for name, build in W.catalogue():
        if name.endswith("+cleanup") and not name.startswith("brevitas/tfc"):
            continue
        if name.startswith("torch/") and name.endswith("/torchscript") and name.split("/")[1] not in TORCHSCRIPT_DIFFERS:
            continue
        out.append(pytest.param(name, build, id=name, marks=() if name in FAST else pytest.mark.slow))
    return out


CASES = _cases()
_COMPILED: dict = {}


class Compiled:
    """One wild model compiled for x86: the bundle folder, its manifest and report, and the
    source's inputs, outputs and 1-bit layer count (the ONNX itself is not kept)."""

    def __init__(self, wm, folder):
        self.name, self.inputs, self.outputs, self.binary_layers = wm.name, wm.inputs, wm.outputs, wm.binary_layers
        self.onnx_path = wm.save(folder)
        self.shape = tuple(int(d) for d in wm.inputs[0].shape)
        self.bundle = bdp.compile(self.onnx_path, target="x86", out=os.path.join(folder, "x86"), input_shape=self.shape)
        with open(os.path.join(self.bundle, "manifest.json")) as f:
            self.manifest = json.load(f)
        with open(os.path.join(self.bundle, "report.json")) as f:
            self.report = json.load(f)


def compiled(name, build, tmp_path_factory) -> Compiled:
    if name not in _COMPILED:
        folder = tmp_path_factory.mktemp(name.replace("/", "-").replace("+", "-"))
        _COMPILED[name] = Compiled(build(), str(folder))
    return _COMPILED[name]


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(1e-12, np.abs(want).max()))


def _only(outputs: dict):
    assert len(outputs) == 1, sorted(outputs)
    return next(iter(outputs.values()))


# --------------------------------------------------------------------------- the wild models


@pytest.mark.parametrize("name,build", CASES)
def test_every_binary_layer_is_packed(name, build, tmp_path_factory):
    c = compiled(name, build, tmp_path_factory)
    assert c.binary_layers > 0, name
    assert c.manifest["stats"]["binary_convs"] == c.binary_layers, (c.manifest["stats"], c.report["left_float"])
    for r in c.report["left_float"]:
        # a binarized layer left in float says "binarized ..."; none may be
        assert not r["reason"].startswith("binarized"), r
        assert r["reason"], r
    reasons = [r["reason"] for r in c.report["left_float"]]
    if name.startswith("brevitas/cnv"):  # the first conv reads the 8-bit quantized image
        assert len(reasons) == 1 and "quantized to 8 bits (256 levels)" in reasons[0], reasons
    if name == "larq/BinaryAlexNet":  # the first conv: ste_sign weights on the float image
        assert len(reasons) == 1 and "1-bit weights" in reasons[0] and "graph input" in reasons[0], reasons


@pytest.mark.parametrize("name,build", CASES)
def test_outputs_equal_the_source_framework(name, build, tmp_path_factory):
    c = compiled(name, build, tmp_path_factory)
    model = bdp.load(c.bundle)
    for x, want in zip(c.inputs, c.outputs):
        d = _rel(_only(model(x)), want)
        assert d <= RTOL, f"{name}: max relative difference {d:.3g} from the source framework"


@pytest.mark.slow
def test_larq_fixture_on_rpi4_under_qemu_equals_tensorflow(tmp_path, tmp_path_factory):
    from bdp.targets.devices import aarch64
    from bdp.toolchain.runtime.run import run_bundle

    ok, why = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI must install them): {why}")
    c = compiled("larq/QuickNet", lambda: W.larq_model("QuickNet"), tmp_path_factory)
    arm = bdp.compile(c.onnx_path, target="rpi4", out=str(tmp_path / "rpi4"), input_shape=c.shape)
    with open(os.path.join(arm, "manifest.json")) as f:
        assert json.load(f)["stats"]["binary_convs"] == c.binary_layers
    x86 = bdp.load(c.bundle)
    for i, (x, want) in enumerate(zip(c.inputs[:2], c.outputs)):
        np.save(tmp_path / f"x{i}.npy", x)
        got = _only(run_bundle(arm, str(tmp_path / f"x{i}.npy")))  # bin/bdp-run under qemu-aarch64
        assert _rel(got, want) <= RTOL
        assert _rel(got, _only(x86(x))) <= 1e-5


# --------------------------------------------------------------------------- the passes, small


def _model(nodes, inits, x_shape, y_name="y", opsets=(("", 17),), y_shape=None):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)  # the output's type, so that the checker takes the file
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    if y_shape is None and known.get(y_name) is not None and known[y_name].type.tensor_type.HasField("shape"):
        m.graph.output[0].CopyFrom(known[y_name])
    return m


def _where_binarizer(src, out, t, s):
    """Where(src >= t, s, -s): a scaled binarizer with a threshold (the table's Where form)."""
    return ([helper.make_node("GreaterOrEqual", [src, "thr"], [out + "_ge"]),
             helper.make_node("Where", [out + "_ge", "pos", "neg"], [out])],
            {"thr": np.array(t, np.float32), "pos": np.array(s, np.float32), "neg": np.array(-s, np.float32)})


def _pm_alpha(rng, shape, axis):
    """Random signs times a positive alpha per index of AXIS (a binary layer's weights)."""
    w = np.where(rng.standard_normal(shape) >= 0, 1.0, -1.0)
    a = rng.uniform(0.2, 2.0, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return (w * a).astype(np.float32)


def _ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("shape,open_dims", [((2, 3, 5, 8), False), ((2, 3, 5, 8), True),
                                             ((2, 3, 2, 3, 8), False), ((1, 2, 2, 3, 8), True),
                                             ((3, 8), False), ((2, 4, 8), True)])
def test_binary_matmul_on_any_rank(shape, open_dims):
    """MatMul(binarize(x), W) with x of rank 2..5 (the leading dims open or not) packs into one
    bdp.BinaryConv and computes what onnxruntime computes on the source graph."""
    rng = np.random.default_rng(len(shape) + 10 * open_dims)
    k, m = shape[-1], 6
    nodes, inits = _where_binarizer("x", "xb", 0.1, 0.5)
    inits.update({"W": _pm_alpha(rng, (k, m), 1), "b": rng.standard_normal(m).astype(np.float32)})
    nodes += [helper.make_node("MatMul", ["xb", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    x_shape = [f"d{i}" for i in range(len(shape) - 1)] + [k] if open_dims else list(shape)
    model = _model(nodes, inits, x_shape)
    final, rep = run_pipeline(model, "default", verify=True, shapes={"x": shape})
    assert _ops(final).count("BinaryConv") == 1 and "MatMul" not in _ops(final), _ops(final)
    assert not rep.left_float, rep.left_float
    x = rng.standard_normal(shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    got = run_onnxruntime(final, {"x": x})[0]
    assert _rel(got, want) <= 1e-5


def _conv1d_model(rng, *, c=8, m=6, k=3, stride=1, dilation=1, group=1, pads=(1, 1), pad_node=None, t=0.0, s=1.0):
    """x [1, C, 20] -> Where binarizer (threshold T, scale S) -> [Pad(value) on L] -> Conv1d."""
    nodes, inits = _where_binarizer("x", "xb", t, s)
    conv_in = "xb"
    if pad_node is not None:
        (a, b), value = pad_node
        inits.update({"pads": np.array([0, 0, a, 0, 0, b], np.int64), "pv": np.array(value * s, np.float32)})
        nodes.append(helper.make_node("Pad", ["xb", "pads", "pv"], ["xp"], mode="constant"))
        conv_in = "xp"
    inits.update({"W": _pm_alpha(rng, (m, c // group, k), 0), "B": rng.standard_normal(m).astype(np.float32)})
    nodes.append(helper.make_node("Conv", [conv_in, "W", "B"], ["y"], kernel_shape=[k], strides=[stride],
                                  dilations=[dilation], pads=list(pads), group=group))
    return _model(nodes, inits, [1, c, 20])


CONV1D = {
    "pad1": {},
    "stride2_dilation2": {"stride": 2, "dilation": 2, "pads": (2, 1)},
    "group2_k5": {"group": 2, "k": 5, "pads": (2, 2)},
    "pad_node_plus_one": {"pad_node": ((1, 2), 1.0), "pads": (0, 0), "t": 0.3, "s": 0.7},
    "pad_node_minus_one": {"pad_node": ((2, 0), -1.0), "pads": (0, 0), "t": -0.2, "s": 1.5},
}


@pytest.mark.parametrize("case", sorted(CONV1D))
def test_binary_conv1d_packs_and_is_exact(case):
    rng = np.random.default_rng(sorted(CONV1D).index(case))
    model = _conv1d_model(rng, **CONV1D[case])
    final, rep = run_pipeline(model, "default", verify=True, shapes={"x": (1, 8, 20)})
    assert _ops(final).count("BinaryConv") == 1 and "Conv" not in _ops(final), _ops(final)
    x = rng.standard_normal((1, 8, 20)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    assert _rel(run_onnxruntime(final, {"x": x})[0], want) <= 1e-5


def test_binary_conv1d_runs_packed_in_the_bundle(tmp_path):
    """The 1xk BinaryConv through TVM (strided, dilated, behind a Pad(+1)) equals onnxruntime."""
    rng = np.random.default_rng(5)
    model = _conv1d_model(rng, stride=2, dilation=2, pad_node=((2, 1), 1.0), pads=(0, 0), t=0.1)
    onnx.save(model, str(tmp_path / "m.onnx"))
    out = bdp.compile(str(tmp_path / "m.onnx"), target="x86", out=str(tmp_path / "b"), input_shape=(1, 8, 20))
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["stats"]["binary_convs"] == 1
    x = rng.standard_normal((1, 8, 20)).astype(np.float32)
    assert _rel(_only(bdp.load(out)(x)), run_onnxruntime(model, {"x": x})[0]) <= 1e-5


def test_float_layers_say_what_they_are():
    """Reasons for layers left in float: an 8-bit / 4-bit quantized input (QONNX Quant), 1-bit
    weights on the graph input, a binarized tensor times a per-channel scale, a float layer."""
    rng = np.random.default_rng(3)
    q = "qonnx.custom_op.general"
    inits = {"w_bin": _pm_alpha(rng, (4, 3, 3, 3), 0), "w_float": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "qs": np.array(0.05, np.float32), "qz": np.array(0.0, np.float32), "q4": np.array(4.0, np.float32),
             "q8": np.array(8.0, np.float32), "cs": rng.uniform(0.5, 2.0, (1, 3, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Quant", ["x", "qs", "qz", "q4"], ["x4"], domain=q, signed=1, narrow=0,
                              rounding_mode="ROUND"),
             helper.make_node("Conv", ["x4", "w_bin"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, name="quant4"),
             helper.make_node("Quant", ["x", "qs", "qz", "q8"], ["x8"], domain=q, signed=0, narrow=0,
                              rounding_mode="HALF_UP"),
             helper.make_node("Conv", ["x8", "w_float"], ["b"], kernel_shape=[3, 3], pads=[1] * 4, name="quant8"),
             helper.make_node("Conv", ["x", "w_bin"], ["c"], kernel_shape=[3, 3], pads=[1] * 4, name="bin_w_float_in"),
             helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Mul", ["s", "cs"], ["sc"]),
             helper.make_node("Conv", ["sc", "w_bin"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, name="chan_scaled"),
             helper.make_node("Conv", ["x", "w_float"], ["e"], kernel_shape=[3, 3], pads=[1] * 4, name="stem"),
             helper.make_node("Sum", ["a", "b", "c", "d", "e"], ["y"])]
    model = _model(nodes, inits, [1, 3, 8, 8], opsets=(("", 17), (q, 1)))
    _, rep = run_pipeline(model, "default", verify=True)
    why = {k: r for k, (_op, r) in rep.left_float.items()}
    assert "quantized to 4 bits (16 levels)" in why["quant4"] and "weights are 1-bit" in why["quant4"], why
    assert "quantized to 8 bits (256 levels)" in why["quant8"] and "1-bit" not in why["quant8"], why
    assert "1-bit weights" in why["bin_w_float_in"] and "graph input 'x'" in why["bin_w_float_in"], why
    assert "binarized tensor times a non-scalar scale" in why["chan_scaled"], why
    assert why["stem"] == "input is not binarized (float layer)", why


def test_dynamic_reshape_target_folds_and_compiles(tmp_path):
    """tf2onnx's Keras Reshape at full size: the target is computed at run time from the Shape
    of an intermediate tensor (batch left open), which carries no shape in the file. With the
    input shape fixed, fold-shapes makes it a constant; the binary 1x1 conv behind the Reshape
    packs and the bundle equals onnxruntime."""
    rng = np.random.default_rng(11)
    inits = {"s0": np.array([0], np.int64), "s1": np.array([1], np.int64), "tail": np.array([1, 1, 48], np.int64),
             "W": _pm_alpha(rng, (8, 48, 1, 1), 0)}
    nodes = [helper.make_node("Sign", ["x"], ["xs"]), helper.make_node("Shape", ["xs"], ["shp"]),
             helper.make_node("Slice", ["shp", "s0", "s1"], ["batch"]),
             helper.make_node("Concat", ["batch", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["xs", "target"], ["r"]),
             helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["rt", "W"], ["y"], kernel_shape=[1, 1])]
    model = _model(nodes, inits, ["N", 4, 4, 3], y_shape=["N", 8, 1, 1])
    final, rep = run_pipeline(_fixed(model, (1, 4, 4, 3)), "default", verify=True)
    assert "Shape" not in _ops(final) and _ops(final).count("BinaryConv") == 1, _ops(final)
    onnx.save(model, str(tmp_path / "m.onnx"))
    out = bdp.compile(str(tmp_path / "m.onnx"), target="x86", out=str(tmp_path / "b"), input_shape=(1, 4, 4, 3))
    x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    assert _rel(_only(bdp.load(out)(x)), run_onnxruntime(model, {"x": x})[0]) <= 1e-5


def _fixed(model, shape):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.ClearField("dim_param")
        d.dim_value = v
    return m
