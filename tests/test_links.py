"""Packed-bit links: a binary conv whose output is binarized by the next layer writes bits.

``fold-sign-output`` moves the next binarizer into the producer (integer thresholds, negative
multipliers turned around); the compiler then writes packed bits from one kernel straight into
the next. Checked against onnxruntime running the graph as it was *before* the pass (float out,
binarized again by the consumer) and against the numpy reference, at odd channel counts, groups,
strides, dilations and every padding kind, on x86 and (built only) CUDA.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime
from bdp.passes.links import link_stats
from bdp.passes.ops import attach_functions, binary_conv_reference, make_binary_conv_node, pack_signs, sign_thresholds

from test_kernels import build_and_run


def test_sign_thresholds_match_float32_everywhere():
    rng = np.random.default_rng(0)
    m, k = 300, 37
    scale = (rng.standard_normal(m) * 10.0 ** rng.uniform(-4, 2, m)).astype(np.float32)
    scale[:10] = 0.0
    scale[10:20] = -np.abs(scale[10:20])
    bias = (rng.standard_normal(m) * 10.0 ** rng.uniform(-3, 3, m)).astype(np.float32)
    # ties: bias an exact multiple of scale, so scale*D + bias hits the threshold exactly
    bias[20:60] = -scale[20:60] * rng.integers(-k, k + 1, 40).astype(np.float32)
    for t in (0.0, 0.37, -1.5):
        flip, thr = sign_thresholds(scale, bias, t, k)
        d = np.arange(-k, k + 1)
        want = (scale[:, None] * d[None, :].astype(np.float32)).astype(np.float32) + bias[:, None] >= np.float32(t)
        got = flip[:, None] * d[None, :] >= thr[:, None]
        assert np.array_equal(got, want)
        assert (flip[scale < 0] == -1).all()


@pytest.mark.parametrize("pv", [0.0, 1.0, -1.0, 0.5])
def test_popcount_thresholds_equal_the_sign_test(pv):
    """The kernels' test on the popcount, (P <= A[class, m]) != inv[m], is the sign test
    flip*D >= T on D = Dt - 2P for every count P a layer can produce, every border class (the Dt
    table of padding values other than +1) and thresholds at and beyond both ends."""
    from bdp.targets.kernels import BinaryConvParams, pack_weights, popcount_thresholds

    rng = np.random.default_rng(1)
    p = BinaryConvParams(n=1, c=13, h=5, w=6, m=40, kh=3, kw=3, strides=(1, 1), dilations=(1, 1),
                         pads=(1, 1, 1, 1), group=1, act_threshold=0.0, pad_value=pv, out_mode="bits",
                         word_bits=16)
    ws = np.where(rng.standard_normal((p.m, p.cg, p.kh, p.kw)) >= 0, 1.0, -1.0)
    _, dt = pack_weights(pack_signs(ws), p)
    base = dt.astype(np.int64) if dt is not None else np.full((1, 1, p.m), p.k, np.int64)
    flip = np.where(rng.random(p.m) < 0.5, -1, 1)
    tt = rng.integers(-3 * p.k, 3 * p.k + 1, p.m)
    tt[:4] = [-10 ** 6, 10 ** 6, -10 ** 6, 10 ** 6]  # always / never true
    a, inv = popcount_thresholds(flip, tt, dt, p)
    assert a.shape == base.shape and a.dtype == np.int16
    P = np.arange(0, p.popcount_bits + 1).reshape(-1, 1, 1, 1)
    want = flip * (base[None] - 2 * P) >= tt
    got = (P <= a[None]) != (inv == 1)
    assert np.array_equal(got, want)


def _layer(name, x, y, m, cin, rng, *, k=3, s=1, d=1, pads=(1, 1, 1, 1), g=1, pv=0.0, thr=0.0):
    ws = np.where(rng.standard_normal((m, cin // g, k, k)) >= 0, 1.0, -1.0)
    sc = ((rng.random(m) + 0.1) * np.where(rng.random(m) < 0.3, -1, 1) / 8).astype(np.float32)
    b = (rng.standard_normal(m) * 0.5 + 0.013).astype(np.float32)  # avoid exact ties with thr
    attrs = dict(kernel_shape=[k, k], strides=[s, s], dilations=[d, d], pads=list(pads), group=g,
                 pad_value=pv, act_threshold=thr)
    node = make_binary_conv_node(name, [x, name + "_w", name + "_s", name + "_b"], y, **attrs)
    inits = [numpy_helper.from_array(pack_signs(ws), name + "_w"), numpy_helper.from_array(sc, name + "_s"),
             numpy_helper.from_array(b, name + "_b")]
    return node, inits


def chain_model(layers, c0, shape_hw, seed=0, outputs=None, fanout=False):
    """A chain of BinaryConvs; LAYERS: dicts of _layer kwargs plus m. With FANOUT the first layer
    feeds two consumers (layers[1] and a copy of it)."""
    rng = np.random.default_rng(seed)
    nodes, inits, cin, x = [], [], c0, "x"
    outs = []
    for i, spec in enumerate(layers):
        spec = dict(spec)
        m = spec.pop("m")
        y = f"y{i}"
        node, ini = _layer(f"bc{i}", x, y, m, cin, rng, **spec)
        nodes.append(node)
        inits += ini
        if fanout and i == 1:
            node2, ini2 = _layer("bc1b", "y0", "y1b", m, cin, rng, **spec)
            nodes.append(node2)
            inits += ini2
            outs.append("y1b")
        x, cin = y, m
    outs.append(x)
    for o in outputs or []:
        outs.append(o)
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c0, *shape_hw])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    return model


def _fold(model):
    out, rep = run_pipeline(model, ["fold-sign-output"])
    return out, rep


CASES = [
    # (c0, hw, layers)
    (13, (9, 11), [dict(m=70), dict(m=33, s=2, pv=1.0, thr=0.25)]),
    (64, (8, 10), [dict(m=64), dict(m=64), dict(m=128, k=1, pads=(0, 0, 0, 0))]),
    (24, (12, 7), [dict(m=48, g=3), dict(m=48, g=48, pv=-1.0), dict(m=5, d=2, pads=(2, 1, 2, 3))]),
    (70, (10, 10), [dict(m=130, s=2, pads=(0, 1, 1, 0)), dict(m=130, g=2, d=2, pads=(2, 2, 2, 2))]),
    (3, (6, 6), [dict(m=8, k=5, pads=(2, 2, 2, 2)), dict(m=16, g=2, thr=-0.5), dict(m=9, k=1, pads=(0, 0, 0, 0))]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_packed_chain_equals_onnxruntime(case):
    c0, hw, layers = CASES[case]
    model = chain_model(layers, c0, hw, seed=case)
    x = np.random.default_rng(case).standard_normal((1, c0, *hw)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    folded, rep = _fold(model)
    bcs = [n for n in folded.graph.node if n.op_type == "BinaryConv"]
    # every layer but the last now binarizes its own output; the consumers read ±1 at 0
    assert [a.i for n in bcs for a in n.attribute if a.name == "out_sign"] == [1] * (len(layers) - 1) + [0]
    assert link_stats(folded) == {"packed": len(layers) - 1, "float": 0}
    assert len(rep.fused) == len(layers) - 1
    np.testing.assert_allclose(run_onnxruntime(folded, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    # the numpy reference, layer by layer with the folded attributes, agrees as well
    from bdp.passes.ops import binary_conv_attrs

    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    h = x
    for n in bcs:
        h = binary_conv_reference(h, inits[n.input[1]], inits[n.input[2]], inits[n.input[3]], **binary_conv_attrs(n))
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
    got = build_and_run(folded, x, "x86")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fanout_and_sign_outputs():
    """A producer read by two binary convs packs once for both; a ±1 output that is also a graph
    output is written as ±1 floats ("sign" mode)."""
    layers = [dict(m=40), dict(m=24, s=2)]
    model = chain_model(layers, 16, (8, 8), seed=7, fanout=True)
    x = np.random.default_rng(7).standard_normal((1, 16, 8, 8)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})
    folded, _ = _fold(model)
    assert link_stats(folded) == {"packed": 2, "float": 0}
    import tvm
    from tvm import relax

    from bdp.targets.lower import build, import_onnx, plan_links
    from bdp.targets.spec import get_target

    plan = plan_links(folded)
    assert plan["bc0"] == (0, "bits") and plan["bc1"] == (40, "float") and plan["bc1b"] == (40, "float")
    ex = build(import_onnx(folded, {"x": [1, 16, 8, 8]}), get_target("x86"))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    got = [g.numpy() for g in got] if not hasattr(got, "numpy") else [got.numpy()]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    # y0 also a graph output: bc0 writes ±1 floats, its consumer packs them itself
    model2 = chain_model(layers, 16, (8, 8), seed=7, outputs=["y0"])
    folded2, _ = _fold(model2)
    plan2 = plan_links(folded2)
    assert plan2["bc0"] == (0, "float")  # a graph output is not folded at all
    assert link_stats(folded2) == {"packed": 0, "float": 1}


def test_where_binarizer_folds_into_sign_output():
    """BinaryConv -> Where(y >= t, 1, -1) -> Add: the binarizer goes, the conv writes ±1."""
    rng = np.random.default_rng(3)
    node, inits = _layer("bc0", "x", "y", 12, 8, rng)
    nodes = [
        node,
        helper.make_node("GreaterOrEqual", ["y", "t"], ["ge"], name="ge"),
        helper.make_node("Where", ["ge", "one", "mone"], ["z"], name="wh"),
        helper.make_node("Add", ["z", "x2"], ["out"], name="add"),
    ]
    inits += [numpy_helper.from_array(np.array(0.1, np.float32), "t"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(-1.0, np.float32), "mone")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 7]),
                     helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 12, 6, 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    feeds = {"x": rng.standard_normal((1, 8, 6, 7)).astype(np.float32),
             "x2": rng.standard_normal((1, 12, 6, 7)).astype(np.float32)}
    want = run_onnxruntime(model, feeds)[0]
    folded, rep = _fold(model)
    assert [n.op_type for n in folded.graph.node] == ["BinaryConv", "Add"]
    np.testing.assert_allclose(run_onnxruntime(folded, feeds)[0], want, rtol=0, atol=0)
    import tvm
    from tvm import relax

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    ex = build(import_onnx(folded, {"x": [1, 8, 6, 7], "x2": [1, 12, 6, 7]}), get_target("x86"))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(v) for v in feeds.values())).numpy()
    np.testing.assert_array_equal(got, want)


def test_mixed_thresholds_and_float_consumers_stay_float():
    layers = [dict(m=16), dict(m=16, thr=0.5)]
    model = chain_model(layers, 8, (6, 6), fanout=True)
    # make the two consumers disagree on the threshold
    for n in model.graph.node:
        if n.name == "bc1b":
            for a in n.attribute:
                if a.name == "act_threshold":
                    a.f = -0.25
    folded, rep = _fold(model)
    assert link_stats(folded) == {"packed": 0, "float": 2}
    assert any("different thresholds" in s for s in rep.notes)


def test_cuda_and_arm_build_packed_chain():
    """CUDA: the packed chain builds (never run here: no GPU); its kernels write and read bytes.
    AArch64: builds with NEON popcount (run under qemu in test_aarch64)."""
    from test_kernels import _modules

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    c0, hw, layers = CASES[0]
    folded, _ = _fold(chain_model(layers, c0, hw))
    ex = build(import_onnx(folded, {"x": [1, c0, *hw]}), get_target("cuda"))
    src = "\n".join(md.inspect_source("cuda") for md in _modules(ex.mod) if md.kind == "cuda")
    assert re.search(r"__popc(ll)?\(", src) and "threadIdx.x" in src
    assert "unsigned char" in src or "uint8_t" in src  # the packed-bit link
    ex = build(import_onnx(folded, {"x": [1, c0, *hw]}), get_target("rpi4"))
    asm = "\n".join(md.inspect_source("asm") for md in _modules(ex.mod) if md.kind == "llvm")
    assert re.search(r"\tcnt\tv\d+\.(16b|8b)", asm), "no NEON cnt"


def _act_chain_model(chain, c0=11, m=37, hw=(9, 10), thr=0.0, seed=0, extra_output=None):
    """bc0 -> CHAIN (list of (op, const or None, attrs)) -> bc1 (act_threshold THR)."""
    rng = np.random.default_rng(seed)
    n0, inits = _layer("bc0", "x", "y0", m, c0, rng)
    n1, ini1 = _layer("bc1", f"a{len(chain)}", "out", 19, m, rng, s=2, pv=1.0, thr=thr)
    nodes, t = [n0], "y0"
    for i, (op, const, attrs) in enumerate(chain):
        ins = [t]
        if const is not None:
            cname = f"c{i}"
            inits.append(numpy_helper.from_array(np.asarray(const, np.float32), cname))
            ins = [cname, t] if attrs.pop("const_first", False) else [t, cname]
        if op == "Clip":
            ins = [t, "clip_lo", "clip_hi"]
            inits += [numpy_helper.from_array(np.array(-0.3, np.float32), "clip_lo"),
                      numpy_helper.from_array(np.array(0.7, np.float32), "clip_hi")]
        nodes.append(helper.make_node(op, ins, [f"a{i + 1}"], name=f"act{i}", **attrs))
        t = f"a{i + 1}"
    nodes.append(n1)
    inits += ini1
    outs = ["out"] + ([extra_output] if extra_output else [])
    graph = helper.make_graph(
        nodes, "actchain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c0, *hw])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))


def _chans(rng, m, lo, hi):
    return rng.uniform(lo, hi, (1, m, 1, 1)).astype(np.float32)


_r = np.random.default_rng(11)
ACT_CHAINS = [
    ("relu", [("Relu", None, {})], 0.0),  # a plain BNN's ReLU: sign(relu(y)) is always +1
    ("relu-thr", [("Relu", None, {})], 0.2),
    ("rprelu+rsign", [("Add", _chans(_r, 37, -0.3, 0.3), {}), ("PRelu", _chans(_r, 37, 0.05, 0.5)[0], {}),
                      ("Add", _chans(_r, 37, -0.3, 0.3), {}), ("Sub", _chans(_r, 37, -0.2, 0.2), {})], 0.0),
    ("leaky-negmul", [("LeakyRelu", None, {"alpha": 0.1}), ("Mul", _chans(_r, 37, -1.0, 1.0), {})], -0.1),
    ("clip-div-csub", [("Clip", None, {}), ("Div", _chans(_r, 37, 0.5, 2.0), {}),
                       ("Sub", np.float32(0.1), {"const_first": True})], 0.0),
]


@pytest.mark.parametrize("name", [c[0] for c in ACT_CHAINS])
def test_activation_chain_folds_into_packed_link(name):
    """BinaryConv -> per-channel activations -> BinaryConv: the chain and the binarizer become
    integer thresholds of the producer (packed bits), equal to onnxruntime on the graph as it was
    and to the compiled kernel."""
    _, chain, thr = next(c for c in ACT_CHAINS if c[0] == name)
    model = _act_chain_model([(op, c, dict(a)) for op, c, a in chain], thr=thr)
    x = np.random.default_rng(5).standard_normal((1, 11, 9, 10)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    folded, rep = _fold(model)
    assert [n.op_type for n in folded.graph.node] == ["BinaryConv", "BinaryConv"], rep.notes
    assert link_stats(folded) == {"packed": 1, "float": 0}
    np.testing.assert_allclose(run_onnxruntime(folded, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(build_and_run(folded, x, "x86"), want, rtol=1e-5, atol=1e-5)


def test_activation_chain_that_is_not_a_threshold_stays_float():
    """A negative PReLU slope makes prelu(y) >= 0.3 two-sided in y; an intermediate that is a graph
    output is needed as a float. Neither folds, and the graph still computes the same."""
    slopes = -np.linspace(0.1, 1.0, 37).astype(np.float32).reshape(37, 1, 1)
    model = _act_chain_model([("PRelu", slopes, {})], thr=0.3)
    folded, rep = _fold(model)
    assert [n.op_type for n in folded.graph.node] == ["BinaryConv", "PRelu", "BinaryConv"]
    assert any("not a one-sided threshold" in s for s in rep.notes)
    x = np.random.default_rng(6).standard_normal((1, 11, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(run_onnxruntime(folded, {"x": x})[0], run_onnxruntime(model, {"x": x})[0])
    model2 = _act_chain_model([("Relu", None, {}), ("Add", np.float32(0.25), {})], extra_output="a1")
    folded2, _ = _fold(model2)
    assert link_stats(folded2) == {"packed": 0, "float": 0}
    assert [n.op_type for n in folded2.graph.node] == ["BinaryConv", "Relu", "Add", "BinaryConv"]
