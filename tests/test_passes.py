"""Graph passes: structural tests (expected graph), numerical tests (onnxruntime before/after), and
a property test over random binarized graphs compiled by TVM and compared with onnxruntime.

BDP_PROPERTY_CASES sets the number of random graphs (default 40).
"""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes import PASSES, run_pipeline
from bdp.passes.core import Report, run_onnxruntime
from bdp.passes.links import link_stats

QONNX = "qonnx.custom_op.general"


class G:
    """A tiny ONNX graph builder."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p):
        self.k += 1
        return f"{p}_{self.k}"

    def const(self, arr, p="c"):
        n = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type, inputs, domain="", **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name("n_" + op_type), domain=domain, **attrs))
        return out

    def model(self, x_shape, out, qonnx=False):
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * 4)], self.inits)
        ops = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(QONNX, 1)] if qonnx else [])
        return helper.make_model(g, opset_imports=ops, ir_version=9)


BINARIZERS = ["sign", "where_ge", "where_lt", "threshold", "sub_beta", "bipolar", "scaled"]
WEIGHTS = ["folded", "mul", "bipolar", "pm1_then_mul"]
GLUE = ["none", "bn", "mul", "add", "mul_add", "div_sub"]


def random_case(seed):
    """A random binarized graph: float conv -> binarizer -> [Pad] -> binary Conv -> glue."""
    g = G(seed)
    r = g.rng
    n = int(r.choice([1, 2]))
    h, w = int(r.integers(4, 13)), int(r.integers(4, 13))
    c = int(r.choice([1, 3, 13, 40, 64, 70, 130]))
    group = int(r.choice([1, 1, 1, 2, c])) if c > 1 else 1
    if c % group:
        group = 1
    m = group * int(r.choice([1, 3, 5])) if group == c else int(r.choice([2, 7, 33, 64, 66]))
    if m % group:
        m = group * max(1, m // group)
    k = int(r.choice([1, 3, 3, 5]))
    stride, dil = int(r.choice([1, 2])), int(r.choice([1, 1, 2]))
    pads = [int(p) for p in r.integers(0, 3, size=4)]
    binz = BINARIZERS[int(r.integers(len(BINARIZERS)))]
    wform = WEIGHTS[int(r.integers(len(WEIGHTS)))]
    glue = GLUE[int(r.integers(len(GLUE)))]
    pad_kind = str(r.choice(["conv", "conv", "pad0", "pad1", "padm1"]))
    has_bias = bool(r.integers(2))

    x = "x"
    f = g.op("Conv", [x, g.const(r.standard_normal((c, 3, 3, 3)).astype(np.float32)),
                      g.const(r.standard_normal(c).astype(np.float32))], pads=[1, 1, 1, 1])
    act_scale = 1.0
    if binz == "sign":
        b = g.op("Sign", [f])
    elif binz in ("where_ge", "threshold"):
        t = 0.0 if binz == "where_ge" else float(r.normal())
        b = g.op("Where", [g.op("GreaterOrEqual", [f, g.const(np.float32(t))]), g.const(np.float32(1)),
                           g.const(np.float32(-1))])
    elif binz == "where_lt":
        b = g.op("Where", [g.op("Less", [f, g.const(np.float32(0))]), g.const(np.float32(-1)), g.const(np.float32(1))])
    elif binz == "sub_beta":
        s = g.op("Sub", [f, g.const(r.normal(size=(1, c, 1, 1)).astype(np.float32))])
        b = g.op("Where", [g.op("GreaterOrEqual", [s, g.const(np.float32(0))]),
                           g.const(np.ones((1, c, 1, 1), np.float32)), g.const(-np.ones((1, c, 1, 1), np.float32))])
    elif binz == "bipolar":
        act_scale = float(r.uniform(0.2, 2.0))
        b = g.op("BipolarQuant", [f, g.const(np.float32(act_scale))], domain=QONNX)
    else:  # scaled
        act_scale = float(r.choice([-1.0, 1.0]) * r.uniform(0.2, 2.0))
        b = g.op("Mul", [g.op("Where", [g.op("GreaterOrEqual", [f, g.const(np.float32(0))]), g.const(np.float32(1)),
                                        g.const(np.float32(-1))]), g.const(np.float32(act_scale))])
    conv_pads = pads
    if pad_kind != "conv":
        v = {"pad0": 0.0, "pad1": 1.0, "padm1": -1.0}[pad_kind] * act_scale
        b = g.op("Pad", [b, g.const(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64)),
                         g.const(np.float32(v))], mode="constant")
        conv_pads = [0, 0, 0, 0]
    wsign = np.where(r.standard_normal((m, c // group, k, k)) >= 0, 1.0, -1.0).astype(np.float32)
    alpha = r.uniform(0.05, 1.0, size=(m, 1, 1, 1)).astype(np.float32)
    if wform == "folded":
        wt = g.const((alpha * wsign).astype(np.float32))
    elif wform == "mul":
        wt = g.op("Mul", [g.const(wsign), g.const(alpha)])
    elif wform == "bipolar":
        wt = g.op("BipolarQuant", [g.const(wsign * r.uniform(0.1, 1, size=wsign.shape).astype(np.float32)),
                                   g.const(alpha)], domain=QONNX)
    else:
        wt = g.const(wsign)
    ins = [b, wt] + ([g.const(r.standard_normal(m).astype(np.float32))] if has_bias else [])
    y = g.op("Conv", ins, pads=conv_pads, strides=[stride, stride], dilations=[dil, dil], group=group)
    if wform == "pm1_then_mul":
        y = g.op("Mul", [y, g.const(alpha.reshape(1, m, 1, 1))])
    if glue == "bn":
        y = g.op("BatchNormalization", [y, g.const(r.uniform(-1.5, 1.5, m).astype(np.float32)),
                                        g.const(r.normal(size=m).astype(np.float32)),
                                        g.const(r.normal(size=m).astype(np.float32)),
                                        g.const(r.uniform(0.5, 2, m).astype(np.float32))])
    elif glue in ("mul", "mul_add"):
        y = g.op("Mul", [y, g.const(r.normal(size=(1, m, 1, 1)).astype(np.float32))])
    if glue in ("add", "mul_add"):
        y = g.op("Add", [g.const(r.normal(size=(m, 1, 1)).astype(np.float32)), y])
    if glue == "div_sub":
        y = g.op("Sub", [g.op("Div", [y, g.const(np.float32(r.uniform(0.5, 2)))]), g.const(np.float32(0.3))])
    # a dilated kernel must fit in the padded input
    eff = dil * (k - 1) + 1
    while h + pads[0] + pads[2] < eff or w + pads[1] + pads[3] < eff:
        h, w = h + 2, w + 2
    # half the cases: a second binary layer reads the first one's output (a packed-bit link)
    chain = bool(r.integers(2))
    if chain:
        binz2 = str(r.choice(["sign", "where_ge", "threshold", "where_lt"]))
        t2 = float(r.normal()) if binz2 == "threshold" else 0.0
        # a trained-like shift first: an integer D = 0 with zero bias sits exactly on the threshold,
        # where onnxruntime (which folds the Mul into its conv weights) decides the bit by round-off
        y = g.op("Add", [y, g.const((r.normal(size=(1, m, 1, 1)) * 0.3 + 0.01).astype(np.float32))])
        if binz2 == "sign":
            b2 = g.op("Sign", [y])
        elif binz2 == "where_lt":
            b2 = g.op("Where", [g.op("Less", [y, g.const(np.float32(t2))]), g.const(np.float32(-1)),
                                g.const(np.float32(1))])
        else:
            b2 = g.op("Where", [g.op("GreaterOrEqual", [y, g.const(np.float32(t2))]), g.const(np.float32(1)),
                                g.const(np.float32(-1))])
        g2 = int(r.choice([1, 1, 2])) if m % 2 == 0 else 1
        m2 = int(r.choice([5, 16, 70]))
        m2 = g2 * max(1, m2 // g2)
        k2, s2 = int(r.choice([1, 3])), int(r.choice([1, 2]))
        p2 = [int(q) for q in r.integers(0, 2, size=4)] if k2 > 1 else [0, 0, 0, 0]
        w2 = np.where(r.standard_normal((m2, m // g2, k2, k2)) >= 0, 1.0, -1.0).astype(np.float32)
        y = g.op("Conv", [b2, g.const(w2 * r.uniform(0.05, 1.0, size=(m2, 1, 1, 1)).astype(np.float32))],
                 pads=p2, strides=[s2, s2], group=g2)
        y = g.op("Add", [y, g.const(r.normal(size=(1, m2, 1, 1)).astype(np.float32))])
        # the first layer's output must still be at least as large as the second kernel
        oh = (h + pads[0] + pads[2] - eff) // stride + 1
        ow = (w + pads[1] + pads[3] - eff) // stride + 1
        while min(oh + p2[0] + p2[2], ow + p2[1] + p2[3]) < k2:
            h, w = h + stride, w + stride
            oh, ow = (h + pads[0] + pads[2] - eff) // stride + 1, (w + pads[1] + pads[3] - eff) // stride + 1
    desc = dict(n=n, c=c, m=m, k=k, stride=stride, dil=dil, group=group, pads=pads, binz=binz, wform=wform,
                glue=glue, pad_kind=pad_kind, bias=has_bias, hw=(h, w), chain=chain)
    uses_qonnx = binz == "bipolar" or wform == "bipolar"
    return g.model([n, 3, h, w], y, qonnx=uses_qonnx), (n, 3, h, w), desc


def reference_outputs(model, x):
    """onnxruntime on the source graph (QONNX ops given their defining standard-op form first)."""
    if any(n.domain == QONNX for n in model.graph.node):
        model = PASSES["qonnx-to-standard"](model)
    return run_onnxruntime(model, {"x": x})


def compile_and_run(model, shape, x):
    import tvm
    from tvm import relax

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    final, report = run_pipeline(model, "default")
    mod = import_onnx(final, {"x": list(shape)})
    ex = build(mod, get_target("x86"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    res = vm["main"](tvm.runtime.tensor(x))
    return (res.numpy() if hasattr(res, "numpy") else res[0].numpy()), final, report


N_CASES = int(os.environ.get("BDP_PROPERTY_CASES", "40"))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_binarized_graph_compiles_exactly(seed):
    model, shape, desc = random_case(seed)
    x = np.random.default_rng(1000 + seed).standard_normal(shape).astype(np.float32)
    want = reference_outputs(model, x)[0]
    got, final, report = compile_and_run(model, shape, x)
    ops = [n.op_type for n in final.graph.node]
    # the binarized conv must really run packed, and the glue must be folded away
    nb = 2 if desc["chain"] else 1
    assert ops.count("BinaryConv") == nb, (desc, ops, report.left_float)
    assert ops.count("Conv") == 1, (desc, ops)  # only the float pre-conv is left
    # nothing else is left: binarizer, Pad, weight arithmetic and glue are all folded away
    # (RSign-style `x - beta` stays a float elementwise op in front of the packing)
    expected = ["Conv", "Sub"] if desc["binz"] == "sub_beta" else ["Conv"]
    assert ops == expected + ["BinaryConv"] * nb, (desc, ops)
    if desc["chain"]:  # the link between the two binary layers is packed bits, no float
        assert link_stats(final) == {"packed": 1, "float": 0}, desc
    scale = max(1.0, float(np.abs(want).max()))
    assert got.shape == want.shape, desc
    d = float(np.abs(got - want).max()) / scale
    assert d <= 1e-4, (desc, d)


# --- structural + numerical tests, pass by pass ------------------------------------------------


def _verify(model, names):
    out, rep = run_pipeline(model, names, verify=True)
    assert all(d <= 1e-4 for _, d in rep.verified), rep.verified
    return out, rep


def test_fold_batchnorm_structure_and_numbers():
    g = G(0)
    w = g.const(g.rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    y = g.op("Conv", ["x", w], pads=[1, 1, 1, 1])
    bn = g.op("BatchNormalization", [y] + [g.const(v.astype(np.float32)) for v in
                                           (g.rng.uniform(-1, 1, 8), g.rng.normal(size=8), g.rng.normal(size=8),
                                            g.rng.uniform(0.5, 2, 8))])
    model = g.model([1, 4, 6, 6], bn)
    out, rep = _verify(model, ["name-nodes", "fold-batchnorm"])
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert len(out.graph.node[0].input) == 3


def test_qonnx_to_standard_structure_and_formula():
    g = G(1)
    y = g.op("BipolarQuant", ["x", g.const(np.float32(0.7))], domain=QONNX)
    model = g.model([2, 3, 4, 4], y, qonnx=True)
    out = PASSES["qonnx-to-standard"](model)
    assert [n.op_type for n in out.graph.node] == ["GreaterOrEqual", "Where", "Mul"]
    assert all(o.domain != QONNX for o in out.opset_import)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    x[0, 0, 0, 0] = 0.0
    got = run_onnxruntime(out, {"x": x})[0]
    np.testing.assert_array_equal(got, np.where(x >= 0, 1.0, -1.0).astype(np.float32) * np.float32(0.7))


def test_fold_binary_glue_structure():
    g = G(2)
    wsign = np.where(g.rng.standard_normal((6, 5, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    b = g.op("Sign", ["x"])
    y = g.op("Conv", [b, g.const(wsign)], pads=[1, 1, 1, 1])
    y = g.op("Mul", [y, g.const(g.rng.normal(size=(1, 6, 1, 1)).astype(np.float32))])
    y = g.op("Add", [y, g.const(g.rng.normal(size=(1, 6, 1, 1)).astype(np.float32))])
    y = g.op("Relu", [y])
    model = g.model([1, 5, 7, 7], y)
    out, rep = _verify(model, ["name-nodes", "fold-constants", "fuse-binary-conv", "fold-binary-glue"])
    assert [n.op_type for n in out.graph.node] == ["BinaryConv", "Relu"]
    assert sum(1 for f in rep.fused if f[0] == "fold-binary-glue") == 2


def test_glue_with_per_column_constant_is_not_folded():
    """A [M] constant broadcasts over W, not over channels: it must stay a float op."""
    g = G(3)
    wsign = np.where(g.rng.standard_normal((4, 4, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    y = g.op("Conv", [g.op("Sign", ["x"]), g.const(wsign)], pads=[1, 1, 1, 1])
    y = g.op("Mul", [y, g.const(g.rng.normal(size=4).astype(np.float32))])
    model = g.model([1, 4, 4, 4], y)
    out, _ = _verify(model, "default")
    assert [n.op_type for n in out.graph.node] == ["BinaryConv", "Mul"]


def test_non_binary_pad_value_is_left_float_with_reason():
    g = G(4)
    wsign = np.where(g.rng.standard_normal((4, 4, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    b = g.op("Pad", [g.op("Sign", ["x"]), g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                     g.const(np.float32(0.5))], mode="constant")
    y = g.op("Conv", [b, g.const(wsign)])
    model = g.model([1, 4, 5, 5], y)
    out, rep = _verify(model, "default")
    assert "BinaryConv" not in [n.op_type for n in out.graph.node]
    (reason,) = [r for _, r in rep.left_float.values()]
    assert "Pad value 0.5" in reason


def test_bdp_passes_lists_passes_and_pipelines(cli):
    p = cli("passes")
    assert p.returncode == 0
    for name in PASSES:
        assert name in p.stdout
    assert "default" in p.stdout


def test_dump_after_writes_intermediate_onnx(tmp_path, cli):
    model, shape, _ = random_case(3)
    onnx.save(model, tmp_path / "m.onnx")
    p = cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "b", "--dump-after", "fuse-binary-conv")
    assert p.returncode == 0, p.stderr
    dumped = list((tmp_path / "b.passes").glob("*fuse-binary-conv.onnx"))
    assert len(dumped) == 1
    m = onnx.load(dumped[0])
    onnx.checker.check_model(m)
    assert any(n.op_type == "BinaryConv" for n in m.graph.node)
    p = cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "b2", "--dump-after", "no-such-pass")
    assert p.returncode == 2 and "no-such-pass" in p.stderr


def test_report_counts(tmp_path):
    rep = Report()
    rep.leave("a", "Conv", "why")
    rep.fuse("p", "a", "x")
    assert rep.to_dict()["left_float"] == [] and rep.to_dict()["fused"][0]["node"] == "a"


# --- verify: node by node ------------------------------------------------------------------------


def _tie_chain(seed=0, layers=4, c=16, hw=(12, 14)):
    """Sign -> Conv(±alpha weights, no bias) repeated: every integer sum of 0 lands exactly on the
    next Sign's threshold in exact arithmetic, and on either side of it in float."""
    g = G(seed)
    y = "x"
    for i in range(layers):
        alpha = np.float32(g.rng.uniform(0.01, 0.1))
        w = np.where(g.rng.standard_normal((c, c, 3, 3)) >= 0, alpha, -alpha).astype(np.float32)
        s = g.op("Where", [g.op("GreaterOrEqual", [y, g.const(np.float32(0.0))]), g.const(np.float32(1.0)),
                           g.const(np.float32(-1.0))])
        y = g.op("Conv", [s, g.const(w)], pads=[1, 1, 1, 1])
    return g.model([1, c, *hw], y)


def test_verify_passes_exact_rewrites_of_a_tie_heavy_net():
    """The rewrites are exact, but the float graph rounds its integer sums: compared end to end the
    outputs differ; node by node every rewrite checks out (ties allowed as ties)."""
    model = _tie_chain()
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 14)).astype(np.float32)
    final, rep = run_pipeline(model, "default", verify=True)
    assert [n.op_type for n in final.graph.node].count("BinaryConv") == 4
    assert all(d <= 1e-4 for _, d in rep.verified), rep.verified
    # the output is decided by ties: the rewritten graph is exact (the numpy reference agrees)
    from bdp.passes.ops import binary_conv_attrs, binary_conv_reference

    inits = {i.name: numpy_helper.to_array(i) for i in final.graph.initializer}
    h = x
    for n in final.graph.node:
        h = binary_conv_reference(h, inits[n.input[1]], inits[n.input[2]], inits[n.input[3]], **binary_conv_attrs(n))
    np.testing.assert_allclose(run_onnxruntime(final, {"x": x}, optimize=False)[0], h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("damage", ["weight-bit", "pad-value", "scale"])
def test_verify_catches_a_wrong_rewrite(damage):
    """A pass that gets one weight bit, the border or one channel's scale wrong is caught, with
    the pass named."""
    from bdp.passes.core import PASSES as P, Pass

    def broken(model, report):
        model = PASSES["fuse-binary-conv"].fn(model, report)
        convs = [n for n in model.graph.node if n.op_type == "BinaryConv"]
        # the scale only shows where the output is used as a float: the last layer's
        n = convs[-1] if damage == "scale" else convs[0]
        inits = {i.name: i for i in model.graph.initializer}
        if damage == "weight-bit":
            t = inits[n.input[1]]
            v = numpy_helper.to_array(t).copy()
            v[0, 0] ^= 0x80
            t.CopyFrom(numpy_helper.from_array(v, t.name))
        elif damage == "pad-value":
            for a in n.attribute:
                if a.name == "pad_value":
                    a.f = 1.0
        else:
            t = inits[n.input[2]]
            v = numpy_helper.to_array(t).copy()
            v[3] *= 1.01
            t.CopyFrom(numpy_helper.from_array(v, t.name))
        return model

    P["broken-fuse"] = Pass("broken-fuse", broken, "test only")
    try:
        model = _tie_chain(seed=1, layers=2)
        with pytest.raises(RuntimeError, match="pass 'broken-fuse' changed what the graph computes"):
            run_pipeline(model, ["name-nodes", "fold-constants", "broken-fuse"], verify=True)
    finally:
        P.pop("broken-fuse")
