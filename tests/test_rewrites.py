"""binary-convtranspose, binary-matmul and the binary max-pool (sink-binarizers): structure, onnxruntime before == after, and
the compiled model equals onnxruntime with the binary layers packed."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime

from test_kernels import build_and_run


def _where_ge(x, out, t="t0"):
    return [helper.make_node("GreaterOrEqual", [x, t], [out + "_ge"]),
            helper.make_node("Where", [out + "_ge", "one", "mone"], [out])]


def _model(nodes, inits, c, hw, out="y"):
    common = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("t0", 0.0), ("one", 1.0), ("mone", -1.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits + common)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("k,c,m,bn,bias", [(2, 13, 7, True, True), (3, 16, 5, False, True), (2, 64, 32, True, False)])
def test_binary_convtranspose_runs_packed(k, c, m, bn, bias):
    rng = np.random.default_rng(k + c)
    alpha = rng.uniform(0.1, 1, (1, m, 1, 1)).astype(np.float32)
    w = (np.where(rng.standard_normal((c, m, k, k)) >= 0, 1, -1) * alpha).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["xb", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"))
        ins.append("b")
    nodes = _where_ge("x", "xb") + [helper.make_node("ConvTranspose", ins, ["ct"], kernel_shape=[k, k], strides=[k, k])]
    out = "ct"
    if bn:
        for n, v in (("g", rng.uniform(-1.5, 1.5, m)), ("be", rng.normal(size=m)), ("mu", rng.normal(size=m)),
                     ("var", rng.uniform(0.5, 2, m))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), n))
        nodes.append(helper.make_node("BatchNormalization", ["ct", "g", "be", "mu", "var"], ["y"]))
        out = "y"
    model = _model(nodes, inits, c, (5, 7), out)
    x = rng.standard_normal((1, c, 5, 7)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    final, rep = run_pipeline(model, "default", verify=True)
    ops = [n.op_type for n in final.graph.node]
    assert ops == ["BinaryConv", "DepthToSpace"], ops
    got = build_and_run(final, x, "x86")
    assert got.shape == want.shape == (1, m, 5 * k, 7 * k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_overlapping_convtranspose_stays_float_with_reason():
    rng = np.random.default_rng(0)
    w = np.where(rng.standard_normal((4, 3, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    nodes = _where_ge("x", "xb") + [helper.make_node("ConvTranspose", ["xb", "w"], ["y"], kernel_shape=[3, 3],
                                                     strides=[2, 2], pads=[1, 1, 1, 1], name="up")]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], 4, (5, 5))
    final, rep = run_pipeline(model, "default")
    assert "ConvTranspose" in [n.op_type for n in final.graph.node]
    reasons = [r for n, (o, r) in rep.left_float.items() if o == "ConvTranspose"]
    assert reasons and "kernel == stride" in reasons[0], rep.left_float


@pytest.mark.parametrize("pool", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                  dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])])
def test_binary_maxpool_sinks_and_packs(pool):
    rng = np.random.default_rng(1)
    c, m = 24, 40
    w = np.where(rng.standard_normal((m, c, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32) * 0.3
    nodes = _where_ge("x", "xb") + [
        helper.make_node("MaxPool", ["xb"], ["p"], **pool),
        helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], c, (9, 10))
    x = rng.standard_normal((1, c, 9, 10)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    final, rep = run_pipeline(model, "default", verify=True)
    assert [n.op_type for n in final.graph.node] == ["MaxPool", "BinaryConv"]
    np.testing.assert_allclose(build_and_run(final, x, "x86"), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["matmul2", "matmul3", "gemm"])
def test_binary_matmul_and_gemm_run_packed(form):
    rng = np.random.default_rng(5)
    k, m = 70, 33
    alpha = rng.uniform(0.1, 1, (1, m)).astype(np.float32)
    w = (np.where(rng.standard_normal((k, m)) >= 0, 1, -1) * alpha).astype(np.float32)  # [K, M]
    shape = {"matmul2": [4, k], "matmul3": [2, 6, k], "gemm": [5, k]}[form]
    inits = []
    if form == "gemm":
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
                  numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "c")]
        op = helper.make_node("Gemm", ["xb", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0, name="fc")
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        op = helper.make_node("MatMul", ["xb", "w"], ["y"], name="fc")
    nodes = _where_ge("x", "xb", "t1") + [op]
    inits.append(numpy_helper.from_array(np.array(0.2, np.float32), "t1"))
    common = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("one", 1.0), ("mone", -1.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits + common)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = rng.standard_normal(shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    final, rep = run_pipeline(model, "default", verify=True)
    ops = [n.op_type for n in final.graph.node]
    assert "BinaryConv" in ops and "MatMul" not in ops and "Gemm" not in ops, ops
    got = build_and_run(final, x, "x86")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
