"""The binary conv kernels as the Raspberry Pi 4 target builds them (16-bit words, NEON ``cnt`` +
``uadalp``, orientations x and k, packed-bit links), run for real: every case of the kernel grid
of test_kernels (borders, strides, dilations, groups, depthwise, odd channel counts, padding
values) in one rpi4 bundle, run by its own ``bin/bdp-run`` under qemu-aarch64, against
:func:`bdp.passes.ops.binary_conv_reference` computed here; the integer dot products must be
equal."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bdp
from bdp.passes.ops import attach_functions, binary_conv_reference, make_binary_conv_node
from bdp.targets.devices import aarch64

from test_kernels import GRID, assert_exact, case_layer

# beside the grid: a row wide enough for an x tile of 8 vectors of columns, and k tiles of 8
# vectors of channels x 2 columns (the rpi4's register tiles, binary_conv_plan)
ARM_CASES = GRID + [
    (1, 32, 24, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 5, 64),
    (1, 48, 64, 3, 1, 1, (1, 1, 1, 1), 1, 1.0, 0.1, 6, 12),
]


def _grid_model(seed=3):
    """One model: input x [1, C, H, W] (the grid's largest), per case a Slice to the case's
    channels and size and one bdp.BinaryConv; outputs y0..yN. Returns (model, x, [(want, sc, b)])."""
    rng = np.random.default_rng(seed)
    cmax = max(c[1] for c in ARM_CASES)
    hmax, wmax = max(c[10] for c in ARM_CASES), max(c[11] for c in ARM_CASES)
    x = rng.standard_normal((1, cmax, hmax, wmax)).astype(np.float32)
    nodes, inits, outs, refs = [], [], [], []
    for i, (_, c, m, k, s, d, pads, g, pv, thr, h, w) in enumerate(ARM_CASES):
        xi = x[:, :c, :h, :w].copy()
        ties = rng.random(xi.shape) < 0.05
        xi[ties] = thr  # exact ties at the threshold read as +1
        x[:, :c, :h, :w] = np.where(ties, thr, x[:, :c, :h, :w])
        wb, sc, b, attrs = case_layer(rng, c, m, k, s, d, pads, g, pv, thr)
        inits += [numpy_helper.from_array(np.array([0, 0, 0], np.int64), f"st{i}"),
                  numpy_helper.from_array(np.array([c, h, w], np.int64), f"en{i}"),
                  numpy_helper.from_array(np.array([1, 2, 3], np.int64), f"ax{i}"),
                  numpy_helper.from_array(wb, f"wb{i}"), numpy_helper.from_array(sc, f"sc{i}"),
                  numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Slice", ["x", f"st{i}", f"en{i}", f"ax{i}"], [f"x{i}"], name=f"slice{i}"),
                  make_binary_conv_node(f"bc{i}", [f"x{i}", f"wb{i}", f"sc{i}", f"b{i}"], f"y{i}", **attrs)]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None] * 4))
        refs.append((xi, wb, sc, b, attrs))
    graph = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              outs, inits)
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    # the references from the final x (ties written into it case by case)
    wants = [(binary_conv_reference(x[:, :a[0].shape[1], :a[0].shape[2], :a[0].shape[3]], a[1], a[2], a[3], **a[4]),
              a[2], a[3]) for a in refs]
    return model, x, wants


@pytest.mark.slow
def test_kernel_grid_exact_on_rpi4_under_qemu(tmp_path):
    ok, why = aarch64.tools_available()
    assert ok, f"the AArch64 cross toolchain and qemu are part of the test setup (.ci/setup): {why}"
    model, x, wants = _grid_model()
    path = tmp_path / "grid.onnx"
    onnx.save(model, path)
    bundle = bdp.compile(str(path), target="rpi4", out=str(tmp_path / "rpi4"), input_shape=x.shape)
    names = [f"y{i}" for i in range(len(ARM_CASES))]
    got = aarch64.run_bundle(bundle, x, names)
    for name, (want, sc, b) in zip(names, wants):
        assert_exact(got[name], want, sc, b)


def test_grid_covers_rpi4_words_and_orientations():
    """The grid above reaches both tile orientations with the rpi4's 16-bit words, and the
    narrower words of narrow groups."""
    import dataclasses

    from bdp.targets.schedules import binary_conv_plan, binary_word
    from bdp.targets.spec import get_target

    from test_kernels import _params_of

    spec = get_target("rpi4")
    params = [_params_of(c) for c in ARM_CASES]
    params = [dataclasses.replace(p, word_bits=binary_word(p, spec)) for p in params]
    assert {p.word for p in params if not p.depthwise} == {8, 16}
    plans = [binary_conv_plan(p, spec) for p in params if p.word == 16 and not p.depthwise]
    assert {pl["orient"] for pl in plans} == {"x", "k"}
    assert any(pl["orient"] == "x" and pl["xv"] >= 4 * pl["vl"] for pl in plans)
    assert any(pl["orient"] == "x" and pl["yt"] > 1 for pl in plans)  # rows in the tile
    # k tiles of several vectors of channels, written back over one column and over several
    assert any(pl["orient"] == "k" and pl["kt"] >= 4 * pl["vl"] and pl["wt"] > 1 for pl in plans)
    assert any(pl["orient"] == "k" and pl["wt"] == 1 for pl in plans)
    # depthwise: tiles of 4, 2 and 1 output rows
    from bdp.targets.schedules.binary_cpu import depthwise_rows

    assert {depthwise_rows(p, spec) for p in params if p.depthwise} == {1, 2, 4}
