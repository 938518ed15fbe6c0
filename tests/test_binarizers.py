"""The table of binarizer forms (bdp.passes.binarizers): every spelling is matched with the
threshold and scale that onnxruntime's own evaluation of it has, on inputs that sit exactly on
and next to the threshold, and the canonical re-emission computes the same function."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from bdp.passes import binarizers
from bdp.passes.core import run_onnxruntime
from bdp.passes.graph import from_gs, to_gs

T = 0.25


def _graph(nodes, inits):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k)
                                                for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _where(cmp, swap_operands, a, b):
    ins = ["t", "x"] if swap_operands else ["x", "t"]
    return _graph([helper.make_node(cmp, ins, ["c"]), helper.make_node("Where", ["c", "a", "b"], ["y"])],
                  {"t": T, "a": a, "b": b})


CASES = {
    "sign": _graph([helper.make_node("Sign", ["x"], ["y"])], {}),
    "larq-ste-sign": _graph([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Add", ["s", "c"], ["u"]),
                             helper.make_node("Sign", ["u"], ["y"])], {"c": 0.1}),
    "larq-ste-sign-neg": _graph([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Add", ["c", "s"], ["u"]),
                                 helper.make_node("Sign", ["u"], ["y"])], {"c": -0.1}),
    "scaled-sign": _graph([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Mul", ["k", "s"], ["y"])],
                          {"k": 0.5}),
    "div-scaled": _graph([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Div", ["s", "k"], ["y"])],
                         {"k": 4.0}),
}
for cmp in ("GreaterOrEqual", "Greater", "Less", "LessOrEqual"):
    for swap in (False, True):
        for a, b in ((1.0, -1.0), (-1.0, 1.0), (2.0, -2.0)):
            CASES[f"where-{cmp}-{'tx' if swap else 'xt'}-{a:g}"] = _where(cmp, swap, a, b)
CASES["brevitas-mul-where"] = _graph(
    [helper.make_node("GreaterOrEqual", ["x", "z"], ["c"]), helper.make_node("Where", ["c", "p", "m"], ["w"]),
     helper.make_node("Mul", ["w", "k"], ["y"])], {"z": 0.0, "p": 1.0, "m": -1.0, "k": 1.0})


def _inputs(t):
    t32 = np.float32(t)
    pts = [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf)), 0.0, -0.0,
           np.float32(1e-45), np.float32(-1e-45)]
    rng = np.random.default_rng(0)
    x = np.concatenate([np.asarray(pts, np.float32), rng.standard_normal(64 - len(pts)).astype(np.float32)])
    return x.reshape(1, 64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_form_is_matched_with_onnxruntimes_threshold_and_scale(name):
    model = CASES[name]
    graph = to_gs(model)
    y = graph.outputs[0]
    b = binarizers.match(y)
    assert b is not None, name
    assert b.src.name == "x"
    for t in (b.threshold, 0.0, T):
        x = _inputs(t)
        want = run_onnxruntime(model, {"x": x})[0]
        got = np.float32(b.scale) * np.where(x >= np.float32(b.threshold), 1.0, -1.0).astype(np.float32)
        if b.zero_is_zero:  # ONNX Sign(0) = 0; bdp reads +1 there, and only there
            tie = x == np.float32(b.threshold)
            assert np.all(want[tie] == 0)
            want = np.where(tie, got, want)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_emit_computes_the_same_function(name):
    model = CASES[name]
    graph = to_gs(model)
    y = graph.outputs[0]
    b = binarizers.match(y)
    new = gs.Variable("y2", dtype=np.float32)
    binarizers.emit(graph, b.src, b, "re", out=new)
    graph.outputs = [y, new]
    m = from_gs(graph, model)
    x = _inputs(b.threshold)
    want, got = run_onnxruntime(m, {"x": x})
    if b.zero_is_zero and b.scale != 1.0:  # a scaled Sign is re-emitted as Where: +scale at 0
        tie = x == np.float32(b.threshold)
        assert np.all(got[tie] == np.float32(b.scale)) and np.all(want[tie] == 0)
        want = np.where(tie, got, want)
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_reader_threshold_agrees_with_match():
    for name, model in CASES.items():
        b = binarizers.match(to_gs(model).outputs[0])
        consts = {i.name: float(onnx.numpy_helper.to_array(i).reshape(-1)[0]) for i in model.graph.initializer}
        first = model.graph.node[0]
        t = binarizers.reader_threshold(first, list(first.input).index("x"), consts)
        # Larq's ste_sign with a negative offset is x > 0; its first node, the inner Sign, reads x at 0
        assert t == b.threshold or (b.kind == "ste_sign" and t == 0.0 == np.nextafter(np.float32(b.threshold), np.float32(-1))), name


def test_not_binarizers():
    for nodes, inits in (([helper.make_node("Relu", ["x"], ["y"])], {}),
                         ([helper.make_node("GreaterOrEqual", ["x", "t"], ["c"]),
                           helper.make_node("Where", ["c", "a", "b"], ["y"])], {"t": 0.0, "a": 1.0, "b": 0.0}),
                         ([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])], {})):
        assert binarizers.match(to_gs(_graph(nodes, inits)).outputs[0]) is None
