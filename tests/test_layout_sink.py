"""cancel-transposes and sink-binarizers: graphs shaped like the exports of tf2onnx (NHWC, BatchNorm
as Mul/Add, Larq's Pad(1.0) between binarizer and conv) and binarizers separated from their layer
by data movement. Each graph: passes checked node by node (--verify), every binary layer packed,
and the compiled model equals onnxruntime on the source graph."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime

from test_kernels import build_and_run

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _const(name, v):
    return numpy_helper.from_array(np.asarray(v, np.float32) if not isinstance(v, np.ndarray) or v.dtype.kind == "f"
                                   else v, name)


def _model(nodes, inits, shape, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _ste_sign(x, out, k):
    """Larq's exported ste_sign: Sign(Add(Sign(x), 0.1))."""
    return [helper.make_node("Sign", [x], [f"{out}_s{k}"]),
            helper.make_node("Add", [f"{out}_s{k}", "c01"], [f"{out}_a{k}"]),
            helper.make_node("Sign", [f"{out}_a{k}"], [out])]


def _signs(rng, shape, alpha=None):
    w = np.where(rng.standard_normal(shape) >= 0, 1.0, -1.0)
    if alpha is not None:
        w = w * alpha.reshape(-1, *([1] * (len(shape) - 1)))
    return w.astype(np.float32)


def _check(model, x, n_binary, target="x86"):
    want = run_onnxruntime(model, {"x": x})[0]
    final, rep = run_pipeline(model, "default", verify=True)
    ops = [n.op_type for n in final.graph.node]
    assert ops.count("BinaryConv") == n_binary, (ops, rep.left_float)
    got = build_and_run(final, x, target)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    return final


def _nhwc_block(rng, name, src, c, m, pad_value, residual=None):
    """tf2onnx's shape of a Larq QuantConv2D + BatchNorm: NHWC binarizer, NHWC Pad, Transpose
    to NCHW, Conv, Transpose back, BN as Mul/Add with [M] constants."""
    nodes = _ste_sign(src, f"{name}_b", 0)
    inits = []
    conv_in = f"{name}_b"
    if pad_value is not None:
        inits += [numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), f"{name}_pads"),
                  _const(f"{name}_pv", pad_value)]
        nodes.append(helper.make_node("Pad", [conv_in, f"{name}_pads", f"{name}_pv"], [f"{name}_p"]))
        conv_in = f"{name}_p"
    alpha = rng.uniform(0.2, 1.0, m).astype(np.float32)
    inits.append(_const(f"{name}_w", _signs(rng, (m, c, 3, 3), alpha)))
    nodes += [helper.make_node("Transpose", [conv_in], [f"{name}_t"], perm=TO_NCHW),
              helper.make_node("Conv", [f"{name}_t", f"{name}_w"], [f"{name}_c"],
                               pads=[0, 0, 0, 0] if pad_value is not None else [1, 1, 1, 1]),
              helper.make_node("Transpose", [f"{name}_c"], [f"{name}_ct"], perm=TO_NHWC)]
    inits += [_const(f"{name}_g", rng.uniform(0.5, 1.5, m)), _const(f"{name}_be", rng.normal(0, 0.3, m))]
    nodes += [helper.make_node("Mul", [f"{name}_ct", f"{name}_g"], [f"{name}_bn0"]),
              helper.make_node("Add", [f"{name}_bn0", f"{name}_be"], [f"{name}_o" if residual is None else f"{name}_bn"])]
    if residual is not None:
        nodes.append(helper.make_node("Add", [f"{name}_bn", residual], [f"{name}_o"]))
    return nodes, inits, f"{name}_o"


@pytest.mark.parametrize("pad_value", [None, 1.0, -1.0])
def test_nhwc_binary_blocks_pack(pad_value):
    rng = np.random.default_rng(3)
    c = 16
    nodes, inits, t = [], [_const("c01", 0.1)], "x"
    for i in range(3):
        n, ini, t = _nhwc_block(rng, f"q{i}", t, c, c, pad_value, residual=t if i else None)
        nodes += n
        inits += ini
    nodes.append(helper.make_node("Identity", [t], ["y"]))
    x = rng.standard_normal((1, 6, 7, c)).astype(np.float32)
    final = _check(_model(nodes, inits, x.shape), x, 3)
    # the binarizer-conv pairs are free of transposes; only the input's and the output's remain
    assert sum(n.op_type == "Transpose" for n in final.graph.node) <= 2


def _chain(rng, move_nodes, xshape, layer):
    """x -> binarizer -> MOVE_NODES (reading 'xb', writing 'mv') -> LAYER."""
    nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["ge"]),
             helper.make_node("Where", ["ge", "one", "mone"], ["xb"])] + move_nodes + layer[0]
    inits = [_const("t", 0.1), _const("one", 1.0), _const("mone", -1.0)] + layer[1]
    return _model(nodes, inits, xshape)


def _conv_layer(rng, c, m):
    return [helper.make_node("Conv", ["mv", "w"], ["y"], pads=[1, 1, 1, 1])], \
        [_const("w", _signs(rng, (m, c, 3, 3), rng.uniform(0.2, 1, m)))]


def _matmul_layer(rng, k, m):
    return [helper.make_node("MatMul", ["mv", "w"], ["y"])], [_const("w", _signs(rng, (m, k), rng.uniform(0.2, 1, m)).T)]


def test_reshape_flatten_before_matmul_packs():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Flatten", ["xb"], ["mv"], axis=1)]
    model = _chain(rng, nodes, (2, 4, 3, 3), _matmul_layer(rng, 36, 10))
    _check(model, rng.standard_normal((2, 4, 3, 3)).astype(np.float32), 1)


@pytest.mark.parametrize("move", ["resize", "maxpool", "slice", "d2s", "pad1", "transpose2"])
def test_data_movement_before_conv_packs(move):
    rng = np.random.default_rng(5)
    c, hw = 8, (6, 8)
    inits_extra = []
    if move == "resize":
        nodes = [helper.make_node("Resize", ["xb", "", "sc"], ["mv"], mode="nearest")]
        inits_extra = [_const("sc", [1, 1, 2, 2])]
        cin = c
    elif move == "maxpool":
        nodes = [helper.make_node("MaxPool", ["xb"], ["mv"], kernel_shape=[2, 2], strides=[2, 2])]
        cin = c
    elif move == "slice":
        nodes = [helper.make_node("Slice", ["xb", "st", "en", "ax"], ["mv"])]
        inits_extra = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                       (("st", [1, 1]), ("en", [7, 5]), ("ax", [1, 2]))]
        cin = 6
    elif move == "d2s":
        nodes = [helper.make_node("DepthToSpace", ["xb"], ["mv"], blocksize=2, mode="CRD")]
        cin = c // 4
    elif move == "pad1":
        nodes = [helper.make_node("Pad", ["xb", "pads", "pv"], ["mv"])]
        inits_extra = [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
                       _const("pv", 1.0)]
        cin = c
    else:  # NCHW -> NHWC -> NCHW around the binarizer's output
        nodes = [helper.make_node("Transpose", ["xb"], ["tt"], perm=TO_NHWC),
                 helper.make_node("Transpose", ["tt"], ["mv"], perm=TO_NCHW)]
        cin = c
    layer = _conv_layer(rng, cin, 12)
    model = _chain(rng, nodes, (1, c, *hw), (layer[0], layer[1] + inits_extra))
    _check(model, rng.standard_normal((1, c, *hw)).astype(np.float32), 1)


def test_concat_of_binarized_tensors_with_different_thresholds_packs():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["ge"]),
             helper.make_node("Where", ["ge", "one", "mone"], ["xb"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Less", ["r", "t2"], ["lt"]),
             helper.make_node("Where", ["lt", "mone", "one"], ["rb"]),
             helper.make_node("Concat", ["xb", "rb"], ["mv"], axis=1),
             helper.make_node("Conv", ["mv", "w"], ["y"], pads=[1, 1, 1, 1])]
    inits = [_const("t", 0.1), _const("t2", 0.4), _const("one", 1.0), _const("mone", -1.0),
             _const("w", _signs(rng, (9, 10, 3, 3), rng.uniform(0.2, 1, 9)))]
    model = _model(nodes, inits, (1, 5, 6, 7))
    _check(model, rng.standard_normal((1, 5, 6, 7)).astype(np.float32), 1)


@pytest.mark.parametrize("shape", [(1, 64), (2, 5, 64)])
def test_rank2_and_rank3_inputs_compile_packed(shape, tmp_path):
    """An MLP on [N, K] and a token MLP on [N, T, K]: Sign + MatMul layers pack, the bundle equals
    onnxruntime, and an image given to it is refused with one line."""
    import bdp
    from PIL import Image

    from conftest import assert_input_error, run_cli

    rng = np.random.default_rng(7)
    k = shape[-1]
    w = _signs(rng, (32, k), rng.uniform(0.2, 1, 32)).T
    w2 = _signs(rng, (10, 32)).T
    nodes = [helper.make_node("Sign", ["x"], ["xb"]), helper.make_node("MatMul", ["xb", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["h2"]), helper.make_node("Sign", ["h2"], ["hb"]),
             helper.make_node("MatMul", ["hb", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape[:-1]) + [10])],
                              [_const("w", w), _const("w2", w2), _const("b", rng.normal(0, 0.5, 32))])
    path = tmp_path / "mlp.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    out = bdp.compile(str(path), target="x86", out=str(tmp_path / "b"))
    x = rng.standard_normal(shape).astype(np.float32)
    want = run_onnxruntime(onnx.load(str(path)), {"x": x})[0]
    got = bdp.load(out)(x)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    import json

    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["stats"]["binary_convs"] == 2
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    assert_input_error(run_cli("run", out, "--input", tmp_path / "img.png"), "not an image")
