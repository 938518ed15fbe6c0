"""Edge cases of the packed-bit conv found by compiling the zoo: tiny spatial sizes where most taps
are padding, grouped and depthwise convs, every pad value. Compared with the numpy reference."""

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from bdp.passes.ops import attach_functions, binary_conv_reference, make_binary_conv_node, pack_signs
from bdp.targets.lower import build, import_onnx
from bdp.targets.spec import get_target

CASES = [
    # c, m, group, k, h, w, pads, pad_value, stride
    (256, 256, 256, 7, 1, 1, [3, 3, 3, 3], 0.0, 1),   # ReActNet-style depthwise 7x7 at 1x1
    (16, 16, 16, 7, 1, 1, [3, 3, 3, 3], 0.0, 1),
    (64, 64, 64, 3, 1, 1, [1, 1, 1, 1], 0.0, 1),
    (64, 64, 64, 3, 1, 2, [1, 1, 1, 1], -1.0, 1),
    (64, 64, 1, 3, 1, 1, [1, 1, 1, 1], 0.0, 1),
    (70, 70, 70, 3, 2, 1, [2, 0, 1, 2], 1.0, 2),
    (32, 64, 32, 3, 1, 1, [1, 1, 1, 1], 0.0, 1),
    (256, 256, 256, 7, 2, 3, [3, 3, 3, 3], 0.0, 1),
    (128, 128, 2, 3, 1, 1, [1, 1, 1, 1], 0.0, 1),
]


@pytest.mark.parametrize("c,m,group,k,h,w,pads,pv,stride", CASES)
def test_binary_conv_edge_cases(c, m, group, k, h, w, pads, pv, stride):
    rng = np.random.default_rng(c + m + k + h)
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    ws = np.where(rng.standard_normal((m, c // group, k, k)) >= 0, 1.0, -1.0)
    wb = pack_signs(ws)
    sc = (rng.random(m) + 0.1).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], dilations=[1, 1], pads=pads, group=group,
                 pad_value=pv, act_threshold=0.0)
    node = make_binary_conv_node("bc", ["x", "wb", "sc", "b"], "y", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                              [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(sc, "sc"),
                               numpy_helper.from_array(b, "b")])
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    spec = get_target("x86")
    ex = build(import_onnx(model, {"x": list(x.shape)}, spec), spec)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = binary_conv_reference(x, wb, sc, b, **attrs)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
