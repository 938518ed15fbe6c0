"""bdp's integer-factor Resize (bilinear half_pixel, nearest asymmetric/floor) against
onnxruntime, at every border, for factors 2/3/4/8 and unequal H/W factors; and the cases it
leaves to TVM still compile and agree."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("pieces,axis", [
    ([(1, 6, 4, 5, 4), (1, 6, 8, 10, 2), (1, 6, 16, 20, 1), (1, 6, 16, 20, 1)], 1),  # UperNet fuse: equal pieces
    ([(1, 4, 8, 10, 2), (1, 8, 16, 20, 1), (1, 12, 4, 5, 4)], 1),  # unequal: chunks of gcd 4
    ([(1, 3, 4, 5, 4), (1, 5, 16, 20, 1)], 1),  # gcd 1: 8 chunks of one channel
    ([(2, 3, 4, 10, 2), (2, 3, 8, 20, 1), (2, 3, 16, 20, 1)], 2),  # along H
    ([(1, 3, 8, 10, 2), (1, 3, 16, 20, 1)], 3),  # along W (innermost: not split)
    ([(1, 17, 4, 5, 4), (1, 1, 16, 20, 1)], 1),  # 18 chunks of one channel: too many to unroll
])
def test_resize_concat_equals_onnxruntime(pieces, axis):
    """Resizes feeding a Concat: where the pieces split into a few equal chunks, the schedule
    unrolls the chunks and inlines each resize's row blend into the concatenation."""
    nodes, inits, outs = [], [], []
    x_shape = (pieces[0][0], 1, 16, 20)
    rng = np.random.default_rng(len(pieces) + axis)
    for i, (n, c, h, w, f) in enumerate(pieces):
        # piece i: a 1x1 conv of x to c channels, average-pooled to h x w, resized by f
        wt = rng.standard_normal((c, 1, 1, 1)).astype(np.float32)
        inits.append(numpy_helper.from_array(wt, f"w{i}"))
        nodes.append(helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"]))
        k = 16 // h
        nodes.append(helper.make_node("AveragePool", [f"c{i}"], [f"p{i}"], kernel_shape=[k, 20 // w],
                                      strides=[k, 20 // w]))
        if f > 1:
            inits.append(numpy_helper.from_array(np.array([1, 1, f, f], np.float32), f"s{i}"))
            nodes.append(helper.make_node("Resize", [f"p{i}", "", f"s{i}"], [f"r{i}"], **LINEAR))
            outs.append(f"r{i}")
        else:
            outs.append(f"p{i}")
    nodes.append(helper.make_node("Concat", outs, ["y0"], axis=axis))
    nodes.append(helper.make_node("Relu", ["y0"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = rng.standard_normal(x_shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    got = build_and_run(model, x, "x86")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_concat_split_plan():
    """The chunking a concatenation gets: equal pieces, gcd chunks, and the refusals."""
    from tvm import s_tir, te, topi

    from bdp.targets.schedules import schedule_float_cpu
    from bdp.targets.schedules.tir_util import concat_split
    from bdp.targets.spec import get_target

    def func(shapes, axis):
        ts = [te.placeholder(s, name=f"t{i}") for i, s in enumerate(shapes)]
        # a producer per piece (what the schedule inlines), then the concatenation
        ps = [topi.multiply(t, 2.0) for t in ts]
        out = topi.concatenate(ps, axis)
        return te.create_prim_func(ts + [out]), out.op.name

    def plan(shapes, axis):
        f, name = func(shapes, axis)
        sch = s_tir.Schedule(f)
        return concat_split(sch.get(sch.get_sblock(name)))

    assert plan([(1, 32, 8, 8)] * 4, 1) == (1, 32, 4)
    assert plan([(1, 4, 8, 8), (1, 8, 8, 8), (1, 12, 8, 8)], 1) == (1, 4, 6)
    assert plan([(2, 3, 4, 5), (2, 3, 6, 5)], 2) == (2, 2, 5)
    assert plan([(1, 3, 8, 8), (1, 3, 8, 9)], 3) is None  # innermost axis
    assert plan([(1, 17, 8, 8), (1, 1, 8, 8)], 1) is None  # 18 chunks
    # scheduled: the producers are inlined into the concatenation, whose chunk loop is unrolled
    f, _ = func([(1, 32, 64, 80)] * 4, 1)
    new, _ = schedule_float_cpu(f, get_target("x86"))
    text = new.script()
    assert re.search(r"T\.unroll\((T\.int64\()?4\)", text) and "T.vectorized" in text and "T.parallel" in text
    assert "T_multiply" not in text  # the multiplies are inlined


def _pieces_then_binary_conv(pieces, m, k, stride, thr, extra_reader=False):
    """Resized pieces concatenated, binarized at THR and read by one binary conv (M outputs, KxK,
    STRIDE, pad k//2); EXTRA_READER: a Relu of the concatenation is a second output."""
    nodes, inits, outs = [], [], []
    x_shape = (1, 1, 16, 20)
    rng = np.random.default_rng(m + k)
    for i, (c, h, w) in enumerate(pieces):  # a 1x1 conv of x, average-pooled to h x w, resized back
        inits.append(numpy_helper.from_array(rng.standard_normal((c, 1, 1, 1)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"]))
        nodes.append(helper.make_node("AveragePool", [f"c{i}"], [f"p{i}"], kernel_shape=[16 // h, 20 // w],
                                      strides=[16 // h, 20 // w]))
        if (h, w) != (16, 20):
            inits.append(numpy_helper.from_array(np.array([1, 1, 16 // h, 20 // w], np.float32), f"s{i}"))
            nodes.append(helper.make_node("Resize", [f"p{i}", "", f"s{i}"], [f"r{i}"], **LINEAR))
            outs.append(f"r{i}")
        else:
            outs.append(f"p{i}")
    nodes.append(helper.make_node("Concat", outs, ["cat"], axis=1))
    c_in = sum(p[0] for p in pieces)
    wf = rng.standard_normal((m, c_in, k, k)).astype(np.float32)
    alpha = np.abs(wf).mean(axis=(1, 2, 3), keepdims=True)
    inits += [numpy_helper.from_array((alpha * np.where(wf >= 0, 1.0, -1.0)).astype(np.float32), "W"),
              numpy_helper.from_array((0.1 * rng.standard_normal(m)).astype(np.float32), "b"),
              numpy_helper.from_array(np.array(thr, np.float32), "t"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(-1.0, np.float32), "mone")]
    nodes += [helper.make_node("GreaterOrEqual", ["cat", "t"], ["ge"]),
              helper.make_node("Where", ["ge", "one", "mone"], ["s"]),
              helper.make_node("Conv", ["s", "W", "b"], ["y"], kernel_shape=[k, k], strides=[stride, stride],
                               pads=[k // 2] * 4)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["cat"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), x_shape


@pytest.mark.parametrize("pieces,m,k,stride,thr", [
    ([(16, 16, 20), (32, 8, 10), (64, 4, 5), (128, 2, 5)], 24, 1, 1, 0.0),  # MTI-Net head: 240 channels
    ([(16, 16, 20), (32, 8, 10)], 17, 3, 1, 0.1),  # 48 channels, 3x3, odd M
    ([(5, 16, 20), (9, 8, 10), (3, 4, 5)], 7, 3, 2, -0.2),  # 17 channels: words not byte-aligned
    ([(70, 8, 10)], 33, 3, 1, 0.0),  # a resize alone, two words
])
def test_pack_apart_fuses_resize_and_concat(pieces, m, k, stride, thr):
    """A binary conv reading a concatenation of resizes gets its pack stage as a function of its
    own, which Relax fuses with the resizes and the concatenation (only the bits are written);
    the compiled model equals onnxruntime's float model."""
    import tvm
    from tvm import relax

    from bdp.passes import run_pipeline
    from bdp.targets.lower import build, import_onnx, pack_apart
    from bdp.targets.spec import get_target

    model, x_shape = _pieces_then_binary_conv(pieces, m, k, stride, thr)
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})[0]
    final, _ = run_pipeline(model, "default", shapes={"x": x_shape})
    assert "BinaryConv" in [n.op_type for n in final.graph.node]
    assert len(pack_apart(final)) == 1
    spec = get_target("x86")
    mod = import_onnx(final, {"x": list(x_shape)}, spec)
    assert any(gv.name_hint.startswith("bdp_pack") for gv in mod.functions)
    ex = build(mod, spec)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_pack_apart_only_for_a_sole_binary_reader():
    from bdp.passes import run_pipeline
    from bdp.targets.lower import pack_apart

    model, x_shape = _pieces_then_binary_conv([(16, 16, 20), (32, 8, 10)], 8, 3, 1, 0.0, extra_reader=True)
    final, _ = run_pipeline(model, "default", shapes={"x": x_shape})
    assert "BinaryConv" in [n.op_type for n in final.graph.node]
    assert pack_apart(final) == set()  # the float concatenation is needed anyway
