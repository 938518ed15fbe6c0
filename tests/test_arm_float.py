"""bdp's float layers as the Raspberry Pi 4 target builds them (vectors over output columns
before channel tiles, no padded-position legalization, the resize's phase vectors), run for
real: the odd-size convs and pools of test_float_layers and integer-factor resizes in one rpi4
bundle, run by its own ``bin/bdp-run`` under qemu-aarch64, against a float64 reference (convs,
pools) and onnxruntime (resizes) computed here."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bdp
from bdp.targets.devices import aarch64
from bdp.toolchain.bench.float_layers import layer_onnx, reference64, rel_err

from test_float_layers import ODD, _conv

CONVS = [lay for lay in ODD if lay.op in ("Conv", "MaxPool")] + [
    _conv(3, 32, (64, 80), s=2),  # a stem: 3 channels, stride 2 (vectors of 2 registers of columns)
    _conv(32, 64, (16, 20), k=1, p=0),  # 1x1 at a 16-accumulator tile
    _conv(24, 8, (10, 12), k=1, p=0),  # 1x1 to 8 channels
]
# (channels, in H, in W, factor H, factor W): by 2 (a pair of phases per vector), 3 (phases
# not a vector), 4, 8 (two registers), and one axis only
RESIZES = [(8, 9, 11, 2, 2), (4, 5, 7, 3, 3), (6, 8, 10, 4, 4), (3, 4, 5, 8, 8), (5, 6, 7, 1, 2), (5, 6, 7, 3, 1),
           (2, 1, 1, 4, 4)]


def _model(seed=5):
    """One model: input x [1, C, H, W] (the largest case), per case a Slice to its shape and the
    layer; outputs y0..yN. Returns (model, x, [reference or None], resize slices)."""
    rng = np.random.default_rng(seed)
    shapes = [lay.shape for lay in CONVS] + [(1, c, h, w) for c, h, w, _, _ in RESIZES]
    cmax, hmax, wmax = (max(s[i] for s in shapes) for i in (1, 2, 3))
    x = rng.standard_normal((1, cmax, hmax, wmax)).astype(np.float32)
    nodes, inits, outs, refs = [], [], [], []

    def sliced(i, c, h, w):
        inits.extend([numpy_helper.from_array(np.array([0, 0, 0], np.int64), f"st{i}"),
                      numpy_helper.from_array(np.array([c, h, w], np.int64), f"en{i}"),
                      numpy_helper.from_array(np.array([1, 2, 3], np.int64), f"ax{i}")])
        nodes.append(helper.make_node("Slice", ["x", f"st{i}", f"en{i}", f"ax{i}"], [f"x{i}"], name=f"slice{i}"))
        return x[:, :c, :h, :w]

    for i, lay in enumerate(CONVS):
        xi = sliced(i, *lay.shape[1:])
        layer_model, arrays = layer_onnx(lay, seed=i)
        node = layer_model.graph.node[0]
        names = {k: f"{k}{i}" for k in arrays}
        inits.extend(numpy_helper.from_array(v, names[k]) for k, v in arrays.items())
        nodes.append(helper.make_node(node.op_type, [f"x{i}"] + [names[k] for k in node.input[1:]], [f"y{i}"],
                                      name=f"layer{i}", **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None] * 4))
        refs.append(reference64(lay, xi, arrays))
    resizes = []
    for j, (c, h, w, fh, fw) in enumerate(RESIZES):
        i = len(CONVS) + j
        xi = sliced(i, c, h, w)
        inits.extend([numpy_helper.from_array(np.array([1, 1, fh, fw], np.float32), f"sc{i}"),
                      numpy_helper.from_array(np.array([], np.float32), f"roi{i}")])
        nodes.append(helper.make_node("Resize", [f"x{i}", f"roi{i}", f"sc{i}"], [f"y{i}"], name=f"resize{i}",
                                      mode="linear", coordinate_transformation_mode="half_pixel"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None] * 4))
        refs.append(None)
        resizes.append((i, xi, fh, fw))
    graph = helper.make_graph(nodes, "float_grid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), x, refs, resizes


def _resize_ref(xi, fh, fw):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(np.array([1, 1, fh, fw], np.float32), "sc"),
             numpy_helper.from_array(np.array([], np.float32), "roi")]
    node = helper.make_node("Resize", ["x", "roi", "sc"], ["y"], mode="linear",
                            coordinate_transformation_mode="half_pixel")
    g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xi.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xi})[0]


@pytest.mark.slow
def test_float_layers_match_on_rpi4_under_qemu(tmp_path):
    """Every conv and pool equals its float64 reference to float32 round-off (1e-5 of the
    output's scale: sums of up to 576 terms, in blocks as on x86 except the short ones of stems),
    every resize onnxruntime's to round-off."""
    ok, why = aarch64.tools_available()
    assert ok, f"the AArch64 cross toolchain and qemu are part of the test setup (.ci/setup): {why}"
    model, x, refs, resizes = _model()
    path = tmp_path / "float_grid.onnx"
    onnx.save(model, path)
    bundle = bdp.compile(str(path), target="rpi4", out=str(tmp_path / "rpi4"), input_shape=x.shape)
    names = [f"y{i}" for i in range(len(refs))]
    got = aarch64.run_bundle(bundle, x, names)
    for i, lay in enumerate(CONVS):
        assert got[f"y{i}"].shape == refs[i].shape, lay.name
        assert rel_err(got[f"y{i}"], refs[i]) < 1e-5, (lay.name, rel_err(got[f"y{i}"], refs[i]))
    for i, xi, fh, fw in resizes:
        want = _resize_ref(np.ascontiguousarray(xi), fh, fw)
        np.testing.assert_allclose(got[f"y{i}"], want, rtol=1e-5, atol=1e-6, err_msg=f"resize x{fh}x{fw}")
