"""Binarized networks as training code writes them (issue: straight-through identities,
two-valued activations, nn.Module in).

Each style of tests/ste_models.py (ReActNet, Bi-Real Net, IR-Net, FDA, AdaBin, an
autograd.Function sign, XNOR-Net's K map) is exported the four ways a user would (torch.onnx
TorchScript at opset 13 and 17, the dynamo exporter, torch.export ``.pt2``); every binary conv of
the source must be packed and the result must equal PyTorch's own forward to float round-off.
Before the cancel-terms / two-valued passes none of them packed. Then: the same through compiled
bundles (x86, and rpi4 under qemu), ``bdp.compile(module, x)``, the messages for pickled models and
state_dicts, ``--require-binary``, and a property test over random expression DAGs: cancellation
never changes what a model computes, and identities that must not cancel do not.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bdp
import ste_models as S
from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime
from conftest import assert_input_error, run_cli

SHAPE = (1, 3, 32, 32)
ROUNDOFF = 1e-5  # relative to the largest |output|: float round-off, no flipped bit


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _source(style, how, tmp_path):
    """(ONNX model as bdp loads it, PyTorch's output, input, the module)."""
    from bdp.toolchain.compile import _fix_input_shape, _graph_input
    from bdp.toolchain.frontend.loading import to_onnx

    m = S.build(style)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(x).numpy()
    path = S.export(m, x, how, str(tmp_path / (f"{style}.pt2" if how == "pt2" else f"{style}.onnx")))
    model, _ = to_onnx(path, SHAPE)
    inp = _graph_input(model)
    return _fix_input_shape(model, inp.name, SHAPE), inp.name, ref, x, m


def _packed(model):
    return sum(1 for n in model.graph.node if n.op_type == "BinaryConv")


def _cases():
    out = []
    for style in S.STYLES:
        for how in S.EXPORTS:
            fast = how in ("onnx13", "onnx17")
            out.append(pytest.param(style, how, id=f"{style}-{how}", marks=() if fast else pytest.mark.slow))
    return out


@pytest.mark.parametrize("style,how", _cases())
def test_training_code_binarizers_pack_exactly(style, how, tmp_path):
    model, name, ref, x, m = _source(style, how, tmp_path)
    final, report = run_pipeline(model, "default", shapes={name: SHAPE})
    want = S.n_binary(m) * (2 if style == "adabin" else 1)  # AdaBin: a +/-sig conv and a mu conv per layer
    assert _packed(final) == want, (report.left_float, report.one_bit_float)
    assert not report.one_bit_float, report.one_bit_float
    d = _rel(run_onnxruntime(final, {name: x.numpy()})[0], ref)
    assert d <= ROUNDOFF, f"{style}/{how}: {d:.3g} from PyTorch"


def test_training_code_binarizers_failed_before_the_passes(tmp_path):
    """Without cancel-terms and two-valued, the same graphs pack nothing (what users met)."""
    pipe = ["name-nodes", "qonnx-to-standard", "fold-shapes", "fold-constants", "cancel-transposes",
            "fold-batchnorm", "sink-binarizers", "fuse-binary-conv", "report-float"]
    for style in ("reactnet", "adabin"):
        model, name, _, _, m = _source(style, "onnx13", tmp_path)
        final, report = run_pipeline(model, pipe, shapes={name: SHAPE})
        assert _packed(final) == 0
        assert len(report.one_bit_float) == S.n_binary(m) or style == "adabin", report.left_float


@pytest.mark.slow
@pytest.mark.parametrize("style", ["reactnet", "bireal", "adabin"])
def test_bundle_equals_pytorch(style, tmp_path):
    """The compiled bundle (TVM, packed kernels) from a torch.onnx export equals PyTorch."""
    m = S.build(style)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = m(x).numpy()
    path = S.export(m, x, "onnx17", str(tmp_path / "m.onnx"))
    out = bdp.compile(path, target="x86", out=str(tmp_path / "b"), require_binary=True)
    with open(os.path.join(out, "manifest.json")) as f:
        st = json.load(f)["stats"]
    assert st["binary_convs"] == S.n_binary(m) * (2 if style == "adabin" else 1) and st["one_bit_float"] == 0, st
    got = next(iter(bdp.load(out)(x.numpy()).values()))
    assert _rel(got, ref) <= ROUNDOFF


@pytest.mark.slow
def test_module_in_and_rpi4_agrees_with_x86(tmp_path):
    """bdp.compile(module, x): exported inside; the rpi4 bundle under qemu equals the x86 one."""
    from bdp.targets.devices import aarch64
    from bdp.toolchain.runtime.run import run_bundle

    m = S.build("bireal")
    was = m.training
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = m(x).numpy()
    bx = bdp.compile(m, x, target="x86", out=str(tmp_path / "x86"), require_binary=True)
    assert m.training == was
    got = next(iter(bdp.load(bx)(x.numpy()).values()))
    assert _rel(got, ref) <= ROUNDOFF
    ok, why = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI must install them): {why}")
    br = bdp.compile(m, x, target="rpi4", out=str(tmp_path / "rpi4"), require_binary=True)
    np.save(tmp_path / "x.npy", x.numpy())
    arm = run_bundle(br, str(tmp_path / "x.npy"))
    x86 = run_bundle(bx, str(tmp_path / "x.npy"))
    for k in x86:
        assert _rel(arm[k], x86[k]) <= ROUNDOFF, k


def test_module_needs_an_example_input(tmp_path):
    from bdp.errors import InputError

    with pytest.raises(InputError, match="example input"):
        bdp.compile(S.build("reactnet", blocks=1), target="x86", out=str(tmp_path / "b"))
    with pytest.raises(InputError, match="one input tensor"):
        bdp.compile(S.build("reactnet", blocks=1), (torch.zeros(SHAPE), torch.zeros(SHAPE)), out=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_pickled_models_and_state_dicts_say_what_to_do(tmp_path):
    """torch.save(model) is never unpickled; a state_dict cannot be rebuilt: one line each, exit 2,
    naming torch.export and bdp.compile(model, x)."""
    m = S.build("reactnet", blocks=1)
    torch.save(m, tmp_path / "whole.pt")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": m.state_dict(), "lr": 0.1}, tmp_path / "train.pth")
    line = assert_input_error(run_cli("compile", tmp_path / "whole.pt", "-o", tmp_path / "b"), "pickled model",
                              "torch.export", "bdp.compile(model, x")
    assert "Weights only" not in line
    for f in ("sd.pt", "train.pth"):
        assert_input_error(run_cli("compile", tmp_path / f, "-o", tmp_path / "b"), "state_dict", "torch.export")
    assert not (tmp_path / "b").exists()


def _lonely_binary_weights(path):
    """A conv with +/-1 weights on the float graph input: a 1-bit layer that cannot be packed."""
    w = np.where(np.random.default_rng(0).random((4, 3, 3, 3)) > 0.5, 1.0, -1.0).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_no_silent_float(tmp_path):
    """1-bit layers left in float: one warning line; --require-binary makes it exit 2, no bundle."""
    p = _lonely_binary_weights(str(tmp_path / "m.onnx"))
    ok = run_cli("compile", p, "-o", tmp_path / "b")
    assert ok.returncode == 0, ok.stderr
    warn = [ln for ln in ok.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("bdp: warning: 1 layer with 1-bit weights runs in float"), warn
    line = assert_input_error(run_cli("compile", p, "-o", tmp_path / "c", "--require-binary"), "1-bit weights",
                              "in float")
    assert "graph input" in line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------- property test: random DAGs

def _dag_model(seed):
    """A random graph: a core binarizer (or float term) plus random pairs that cancel, and
    distractors that must not (``+T - T'`` with T' another tensor, equal in places), as a random
    tree of Add/Sub/Neg/Mul(+-1)/Identity, feeding a +/-1 conv and a graph output.
    Returns (model, expects_packed)."""
    rng = np.random.default_rng(seed)
    nodes, inits, k = [], [], [0]

    def op(o, *ins, **attrs):
        k[0] += 1
        name = f"t{k[0]}"
        nodes.append(helper.make_node(o, list(ins), [name], name=f"n{k[0]}", **attrs))
        return name

    def const(v):
        k[0] += 1
        name = f"c{k[0]}"
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    x = op("Add", "x", const(rng.normal(0, 0.1, (1, 4, 1, 1))))
    pool = {
        "sign": lambda: op("Sign", x),
        "poly": lambda: op("Mul", x, op("Abs", x)),
        "tanh": lambda: op("Tanh", op("Mul", x, const(3.0))),
        "clip": lambda: op("Clip", x, const(-1.0), const(1.0)),
        "x": lambda: x,
    }
    core_kind = rng.choice(["sign", "sign", "tanh", "x"])
    terms = [(1, pool[core_kind]())]
    for _ in range(rng.integers(1, 4)):
        kind = rng.choice(["poly", "tanh", "clip", "sign"])
        t = pool[kind]()
        twin = t if rng.random() < 0.5 else pool[kind]()  # the same tensor, or the same op again (merged)
        terms += [(1, t), (-1, twin)]
    distract = rng.random() < 0.4
    if distract:
        a = pool["clip"]()
        b = op("Clip", x, const(-0.5), const(0.5))  # equal to a where |x| <= 0.5 only: must not cancel
        terms += [(1, a), (-1, b)]
    rng.shuffle(terms)
    acc = None
    for sgn, t in terms:
        r = rng.random()
        if sgn > 0:
            t = op("Identity", t) if r < 0.2 else t
            acc = t if acc is None else (op("Add", acc, t) if r < 0.6 else op("Add", t, acc))
        elif acc is not None and r < 0.4:
            acc = op("Sub", acc, t)
        else:
            nt = op("Neg", t) if r < 0.7 else op("Mul", t, const(-1.0))
            acc = nt if acc is None else op("Add", acc, nt)
    w = np.where(rng.random((6, 4, 3, 3)) > 0.5, 0.5, -0.5).astype(np.float32)
    y = op("Conv", acc, const(w), pads=[1, 1, 1, 1])
    graph = helper.make_graph(nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None),
                               helper.make_tensor_value_info(acc, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, (core_kind == "sign" and not distract)


@pytest.mark.parametrize("seed", range(40))
def test_random_expression_dags_keep_their_outputs(seed):
    model, expects_packed = _dag_model(seed)
    x = np.random.default_rng(100 + seed).standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})
    final, report = run_pipeline(model, "default", shapes={"x": (1, 4, 6, 6)})
    got = run_onnxruntime(final, {"x": x})
    for g, w in zip(got, want):
        assert _rel(g, w) <= ROUNDOFF, report.notes
    if expects_packed:
        assert _packed(final) == 1, (report.left_float, report.notes)
    else:
        assert _packed(final) == 0, report.notes


@pytest.mark.parametrize("name,how", [pytest.param(n, h, id=f"{n}-{h}", marks=() if h == "onnx17" else pytest.mark.slow)
                                      for n in S.FULL for h in S.EXPORTS])
def test_full_layouts_pack_every_binary_conv(name, how, tmp_path):
    """ReActNet-A (31 binary convs) and Bi-Real-18 (16), narrowed to a quarter of their widths at
    64x64: every binary conv packed, equal to PyTorch, whatever the exporter."""
    from bdp.toolchain.compile import _fix_input_shape, _graph_input
    from bdp.toolchain.frontend.loading import to_onnx

    m = S.build_full(name, size=64, scale=0.25, classes=10)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(x).numpy()
    path = S.export(m, x, how, str(tmp_path / ("m.pt2" if how == "pt2" else "m.onnx")))
    model, _ = to_onnx(path, (1, 3, 64, 64))
    inp = _graph_input(model)
    model = _fix_input_shape(model, inp.name, (1, 3, 64, 64))
    final, report = run_pipeline(model, "default", shapes={inp.name: (1, 3, 64, 64)})
    assert _packed(final) == S.n_binary(m), (report.one_bit_float, report.left_float)
    assert _rel(run_onnxruntime(final, {inp.name: x.numpy()})[0], ref) <= ROUNDOFF


def _two_valued_conv(lo, hi, pads, strides, dils, group, cin=6, cout=4, hw=(7, 9), per_channel_sign=False, seed=0):
    """x -> {lo, hi} at x >= 0.1 (per channel: lo/hi arrays) -> Conv(+/-alpha weights) -> y."""
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if per_channel_sign:  # half flips sign in some channels: lo and hi swap there
        flip = (np.arange(cin) % 2 == 1).reshape(1, cin, 1, 1)
        lo, hi = np.where(flip, hi, lo).astype(np.float32), np.where(flip, lo, hi).astype(np.float32)
    w = (np.where(rng.random((cout, cin // group, 3, 3)) > 0.5, 1.0, -1.0)
         * rng.uniform(0.5, 2.0, (cout, 1, 1, 1))).astype(np.float32)
    nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["c"]),
             helper.make_node("Where", ["c", "hi", "lo"], ["v"]),
             helper.make_node("Conv", ["v", "w"], ["y"], pads=pads, strides=strides, dilations=dils, group=group)]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "t"), numpy_helper.from_array(hi, "hi"),
             numpy_helper.from_array(lo, "lo"), numpy_helper.from_array(w, "w")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("lo,hi,pads,strides,dils,group,pcs", [
    (0.0, 1.0, [1, 1, 1, 1], [1, 1], [1, 1], 1, False),        # {0, 1} zero-padded: s padded with -1
    (1.0, 3.0, [1, 1, 1, 1], [1, 1], [1, 1], 1, False),        # the border takes a third value: a map
    (1.0, 3.0, [2, 0, 1, 2], [2, 1], [1, 2], 2, False),        # asymmetric pads, stride, dilation, groups
    (-0.5, 0.25, [0, 0, 0, 0], [1, 1], [1, 1], 2, False),      # no border: a constant per channel
    ([[[[0.0]], [[1.0]], [[2.0]], [[0.5]], [[-1.0]], [[3.0]]]], [[[[1.0]], [[2.0]], [[3.0]], [[1.5]], [[0.0]], [[4.0]]]],
     [1, 1, 1, 1], [1, 1], [1, 1], 1, True),                   # per-channel {lo, hi}, gap sign per channel
])
def test_two_valued_inputs_are_exact_at_every_border(lo, hi, pads, strides, dils, group, pcs):
    model = _two_valued_conv(lo, hi, pads, strides, dils, group, per_channel_sign=pcs)
    x = np.random.default_rng(1).standard_normal((1, 6, 7, 9)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    final, report = run_pipeline(model, "default", shapes={"x": (1, 6, 7, 9)})
    assert _packed(final) == 1, (report.left_float, report.notes)
    assert _rel(run_onnxruntime(final, {"x": x})[0], want) <= ROUNDOFF


def test_a_zero_latent_weight_is_a_ternary_layer_and_says_so(tmp_path):
    """sign(0) = 0: a binary conv whose latent weights hold an exact 0 is ternary in the source;
    bdp keeps it in float (reading it as +1 would not be round-off) and warns with the count."""
    m = S.build("reactnet")
    with torch.no_grad():
        m.body[2].conv.weight[3, 5, 1, 1] = 0.0
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(x).numpy()
    path = S.export(m, x, "onnx17", str(tmp_path / "m.onnx"))
    model = onnx.load(path)
    final, report = run_pipeline(model, "default", shapes={"x": SHAPE})
    assert _packed(final) == S.n_binary(m) - 1
    (name, why), = report.one_bit_float.items()
    assert "body.2" in name and "1 exactly 0" in why and "ternary" in why, why
    assert _rel(run_onnxruntime(final, {"x": x.numpy()})[0], ref) <= ROUNDOFF
