"""bdp's integer-factor Resize (bilinear half_pixel, nearest asymmetric/floor) against
onnxruntime, at every border, for factors 2/3/4/8 and unequal H/W factors; and the cases it
leaves to TVM still compile and agree."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes.core import run_onnxruntime
from bdp.targets.resize import fast_case

from test_kernels import build_and_run


def resize_model(shape, scales=None, sizes=None, **attrs):
    inputs = ["x", "", "sc" if scales is not None else "", "sz" if sizes is not None else ""]
    while inputs and inputs[-1] == "":
        inputs.pop()
    inits = []
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "sc"))
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sz"))
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


LINEAR = dict(mode="linear", coordinate_transformation_mode="half_pixel")
NEAREST = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")


@pytest.mark.parametrize("shape,scales,attrs", [
    ((1, 8, 16, 20), [1, 1, 4, 4], LINEAR),
    ((2, 3, 5, 7), [1, 1, 2, 2], LINEAR),
    ((1, 4, 6, 5), [1, 1, 3, 8], LINEAR),
    ((1, 4, 6, 5), [1, 1, 1, 2], dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")),
    ((1, 4, 6, 5), [1, 1, 3, 1], LINEAR),
    ((1, 1, 1, 1), [1, 1, 4, 4], LINEAR),
    ((1, 16, 8, 10), [1, 1, 2, 2], NEAREST),
    ((1, 3, 5, 7), [1, 1, 4, 3], NEAREST),
])
def test_fast_resize_equals_onnxruntime(shape, scales, attrs):
    model = resize_model(list(shape), scales=scales, **attrs)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    assert fast_case(attrs, list(shape), [int(shape[2] * scales[2]), int(shape[3] * scales[3])])
    got = build_and_run(model, x, "x86")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,kw,attrs", [
    ((1, 4, 8, 10), dict(sizes=[1, 4, 16, 20]), LINEAR),  # sizes instead of scales: still fast
    ((1, 4, 8, 10), dict(scales=[1, 1, 1.5, 1.5]), LINEAR),  # non-integer factor: TVM's resize
    ((1, 4, 8, 10), dict(scales=[1, 1, 0.5, 0.5]), LINEAR),  # down-sampling: TVM's resize
    ((1, 4, 8, 10), dict(scales=[1, 1, 2, 2]), dict(mode="linear", coordinate_transformation_mode="align_corners")),
    ((1, 4, 8, 10), dict(scales=[1, 1, 2, 2]), dict(mode="cubic")),
])
def test_other_resizes_still_agree(shape, kw, attrs):
    model = resize_model(list(shape), **kw, **attrs)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    got = build_and_run(model, x, "x86")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
