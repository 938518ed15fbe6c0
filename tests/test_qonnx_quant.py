"""QONNX (Int)Quant and Trunc become the standard ops of their QONNX definition: onnxruntime on
the rewritten graph equals a numpy transcription of QONNX's reference implementation, for every
bit width, sign, narrow range and rounding mode, and per-channel scales."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes import PASSES
from bdp.passes.core import run_onnxruntime

QD = "qonnx.custom_op.general"
ROUND = {"ROUND": np.round, "CEIL": np.ceil, "FLOOR": np.floor,
         "UP": lambda v: np.sign(v) * np.ceil(np.abs(v)), "DOWN": lambda v: np.sign(v) * np.floor(np.abs(v)),
         "HALF_UP": lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5),
         "HALF_DOWN": lambda v: np.sign(v) * np.ceil(np.abs(v) - 0.5)}


def _range(signed, narrow, bits):
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - (2 if narrow else 1)


def quant_ref(x, scale, zp, bits, signed, narrow, mode):
    y = x / scale + zp
    lo, hi = _range(signed, narrow, bits)
    y = np.clip(y, lo, hi)
    return ((ROUND[mode](y) - zp) * scale).astype(np.float32)


def trunc_ref_v2(x, scale, zp, in_bits, out_scale, out_bits, signed, narrow, mode):
    y = np.round(x / scale + zp)
    ts = np.float32(2.0 ** np.round(np.log2(out_scale / scale)))
    y = y / ts
    lo, hi = _range(signed, narrow, out_bits)
    y = ROUND[mode](np.clip(y, lo, hi))
    return ((y - zp / ts) * out_scale).astype(np.float32)


def _run(node, inits, x):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(QD, 1)], ir_version=9)
    out = PASSES["qonnx-to-standard"](m)
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    return run_onnxruntime(out, {"x": x})[0]


@pytest.mark.parametrize("bits,signed,narrow", [(8, 1, 0), (8, 0, 0), (4, 1, 1), (2, 1, 0), (3, 0, 1)])
@pytest.mark.parametrize("mode", sorted(ROUND))
def test_quant(bits, signed, narrow, mode):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((2, 3, 5, 4)) * 3).astype(np.float32)
    x.flat[:6] = [0.5, 1.5, -0.5, -2.5, 2.5, 0.0]  # halves: where the rounding modes differ
    scale = np.array([0.5, 0.25, 1.0], np.float32).reshape(1, 3, 1, 1)
    zp = np.float32(1.0 if not signed else 0.0)
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], domain=QD, signed=signed, narrow=narrow,
                            rounding_mode=mode)
    got = _run(node, {"s": scale, "z": zp, "b": bits}, x)
    np.testing.assert_array_equal(got, quant_ref(x, scale, zp, bits, signed, narrow, mode))


@pytest.mark.parametrize("mode", ["FLOOR", "ROUND", "CEIL"])
def test_trunc_v2(mode):
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((1, 4, 6, 6)) * 200).astype(np.float32) * np.float32(0.125)
    node = helper.make_node("Trunc", ["x", "s", "z", "ib", "os", "oz", "ob"], ["y"], domain=QD, rounding_mode=mode,
                            signed=1, narrow=0)
    inits = {"s": 0.125, "z": 0.0, "ib": 12, "os": 2.0, "oz": 0.0, "ob": 4}
    got = _run(node, inits, x)
    want = trunc_ref_v2(x, np.float32(0.125), np.float32(0), 12, np.float32(2.0), 4, 1, 0, mode)
    np.testing.assert_array_equal(got, want)


def test_non_constant_parameters_stay_qonnx():
    node = helper.make_node("Quant", ["x", "x", "z", "b"], ["y"], domain=QD)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in {"z": 0, "b": 8}.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(QD, 1)], ir_version=9)
    out = PASSES["qonnx-to-standard"](m)
    assert [n.op_type for n in out.graph.node] == ["Quant"]
