"""bdp's float (non-binary) layers at odd sizes: outputs against a float64 numpy reference, with
round-off no larger than onnxruntime's on the same layer; the channel-tile plans and the
compile-time weight layouts they rely on."""

import numpy as np
import pytest

from bdp.toolchain.bench.float_layers import (FloatLayer, compile_layer, layer_onnx, reference64, rel_err,
                                       vm_callable)


def _conv(c, m, hw, k=3, s=1, p=None, group=1):
    return FloatLayer(f"conv{k}x{k}/{s} {c}->{m} @{hw}", "Conv", (1, c, *hw), m, k, s, k // 2 if p is None else p,
                      group)


def _rms_rel(y, ref):
    return float(np.sqrt(np.mean((y.astype(np.float64) - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def _run(layer, seed=1):
    import onnxruntime as ort

    from bdp.targets.spec import get_target

    model, inits = layer_onnx(layer)
    x = np.random.default_rng(seed).standard_normal(layer.shape).astype(np.float32)
    _, out = vm_callable(compile_layer(model, layer.shape, get_target("x86-avx2"), {"schedule_debug": True}), x)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return out(), sess.run(None, {"x": x})[0], reference64(layer, x, inits)


ODD = [
    _conv(16, 32, (7, 7)),  # 49 positions: padded up to whole tiles
    _conv(8, 16, (13, 17)),  # non-square, prime widths
    _conv(16, 16, (13, 17), s=2),  # strided: 7 x 9 outputs
    _conv(8, 24, (9, 11), k=5, p=1),  # large kernel, padding smaller than half the kernel
    _conv(3, 16, (23, 19), k=7, s=2),  # stem: 7x7/2 on 3 channels
    _conv(16, 32, (13, 17), k=1, s=2, p=0),  # downsampling shortcut
    _conv(64, 16, (5, 7)),  # K = 576: a blocked reduction
    _conv(16, 16, (7, 9), group=16),  # depthwise at a width too narrow for column vectors
    # padded positions in several bands (tiles of 3 vectors of channels): the crop of each band
    # once computed a few columns and left the rest unwritten
    _conv(16, 72, (14, 14)),
    _conv(3, 96, (32, 32)),
    _conv(3, 96, (56, 56), k=11, s=4, p=4),  # XNOR-Net / AlexNet stem, 96 channels
    # vectors over the output columns (float_cpu.COLUMNS_FIRST): a head of few channels summed
    # in blocks, a non-overlapping stem (a block per input channel), a 1x1 of a short reduction
    _conv(240, 8, (9, 16), k=1, p=0),
    _conv(3, 32, (16, 64), k=4, s=4, p=0),
    _conv(32, 64, (6, 16), k=1, p=0),
    FloatLayer("maxpool 3x3/2", "MaxPool", (1, 16, 15, 13), 0, 3, 2, 0),
    FloatLayer("gemm batch 1", "Gemm", (1, 300), 40),
    FloatLayer("gemm batch 3", "Gemm", (3, 64), 24),
    FloatLayer("matmul", "MatMul", (1, 96), 56),
]


def _random_convs(n, seed=7):
    """N convs of random sizes (seeded): output channels any multiple of 8 up to 128 (tiles of
    1 to 8 vectors), 5-64 pixel sides, 1x1 to 11x11 kernels, strides 1, 2, 4, any padding up
    to the kernel's half - sizes networks bring that the hand-picked cases above may miss."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = int(rng.choice([1, 3, 5, 7, 11]))
        s = int(rng.choice([1, 2, 4]))
        hw = (int(rng.integers(5, 65)), int(rng.integers(5, 65)))
        if min(hw) < k:
            continue
        out.append(_conv(int(rng.choice([3, 8, 16, 24])), 8 * int(rng.integers(1, 17)), hw, k=k, s=s,
                         p=int(rng.integers(0, k // 2 + 1))))
    return out


ODD += _random_convs(12)


@pytest.mark.parametrize("layer", ODD, ids=[lay.name for lay in ODD])
def test_float_layer_matches_float64(layer):
    """bdp's output is the layer's (float64 reference, relative to the output's scale), and its
    round-off is no larger than onnxruntime's (RMS over the output; 10% for the order in which
    equal-sized errors happen to fall)."""
    got, ort_out, ref = _run(layer)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 2e-6, rel_err(got, ref)
    # + 2^-24: the rounding of the float32 output itself. Below it the comparison is of a few equal
    # errors in another order, and onnxruntime's own kernels differ by CPU (AVX-512 machines sum a
    # 5x5x8 conv with about 0.75x the RMS its AVX2 kernels have)
    assert _rms_rel(got, ref) <= 1.1 * _rms_rel(ort_out, ref) + 2.0 ** -24, (_rms_rel(got, ref), _rms_rel(ort_out, ref))


def test_long_reduction_rounds_like_onnxruntime():
    """A 3x3 conv over 256 channels (K = 2304): summed serially in float32 its round-off would be
    about 5x onnxruntime's; bdp sums it in blocks and must be no worse than onnxruntime."""
    layer = _conv(256, 16, (5, 5))
    got, ort_out, ref = _run(layer, seed=3)
    assert _rms_rel(got, ref) <= 1.1 * _rms_rel(ort_out, ref), (_rms_rel(got, ref), _rms_rel(ort_out, ref))


def test_tile_plans_divide_their_bands():
    """The conv tile plan: channel tiles divide the channels, bands divide the rows; where the
    tiles do not divide a band's positions, the conv legalization pads them (never a partial
    tile in the schedule of a conv)."""
    from bdp.targets.schedules.float_tile import conv_tile_plan

    for n, m, oh, ow, k in [(1, 512, 7, 7, 4608), (1, 64, 56, 56, 576), (1, 256, 13, 17, 2304),
                            (1, 192, 27, 27, 1600), (2, 32, 112, 112, 27), (1, 1000, 1, 1, 512)]:
        uv, xt, nb = conv_tile_plan(n, m, oh, ow, k, 8, 16, padded=True)
        assert m % uv == 0 and uv % 8 == 0 and oh % nb == 0 and xt >= 1
        assert xt * uv // 8 + uv // 8 + 2 <= 16  # accumulators, weights and a broadcast fit in 16 registers


def test_padded_conv_legalization_is_annotated():
    """A 7x7 conv is legalized over padded positions, its conv block annotated with its tile."""
    import tvm
    from tvm import relax

    from bdp.targets.lower import import_onnx
    from bdp.targets.schedules.float_tile import CHANNEL_TILE_ATTR
    from bdp.targets.schedules.legalize import legalize_conv2d
    from bdp.targets.spec import get_target

    spec = get_target("x86-avx2")
    layer = _conv(64, 64, (7, 7))
    model, _ = layer_onnx(layer)
    mod = relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize_conv2d(spec)})(
        import_onnx(model, {"x": list(layer.shape)}, spec))
    anns = []
    for _, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            import tvm_ffi
            from tvm import s_tir

            tvm_ffi.structural_walk(f.body, (s_tir.SBlock, lambda b: anns.append(dict(b.annotations))), order="post")
    tiles = [a[CHANNEL_TILE_ATTR] for a in anns if CHANNEL_TILE_ATTR in a]
    assert len(tiles) == 1 and 49 % int(tiles[0][1]) != 0


def test_blocked_weight_layout_round_trip():
    """relayout_array (numpy, at compile time) puts every weight where block_dim_map (the
    schedule's view of the buffer) reads it."""
    from bdp.targets.schedules.relayout import block_dim_map, relayout_array, relayout_shape

    w = np.arange(32 * 3 * 2 * 5, dtype=np.float32).reshape(32, 3, 2, 5)
    order = (2, 3, 1)
    b = relayout_array(w, 0, 16, order)
    assert list(b.shape) == relayout_shape(w.shape, 0, 16, order)
    m = block_dim_map(0, 4, 16, order)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = [int(rng.integers(0, d)) for d in w.shape]
        assert b[tuple(int(v) for v in m.map_indices(idx))] == w[tuple(idx)]


@pytest.mark.parametrize("shape, axis", [((1, 4, 8, 16, 20), 1), ((2, 3, 7, 9), -1), ((1, 5, 6, 7), 2), ((3, 10), 1)])
@pytest.mark.parametrize("target", ["x86-avx2", "rpi4"])
def test_softmax_divides_once_per_position(shape, axis, target):
    """softmax as onnxruntime computes it: one reciprocal of the sum per position, not a divide
    per element (the scheduled function's divides are all in blocks over the reduced positions),
    and its outputs match onnxruntime's (x86; rpi4's build is checked for its structure)."""
    import onnxruntime as ort
    import tvm
    import tvm_ffi
    from onnx import TensorProto, helper
    from tvm import relax, s_tir, tirx

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.schedules.pipeline import relax_pipeline
    from bdp.targets.schedules.tir_util import has_float_divide
    from bdp.targets.spec import get_target

    x = (np.random.default_rng(0).standard_normal(shape) * 4).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    spec = get_target(target)
    mod = import_onnx(model, {"x": list(shape)}, spec)
    with tvm.target.Target(spec.tvm) as t:
        lowered = relax_pipeline(spec, t)(mod)
    positions = int(np.prod(shape)) // shape[axis]
    divides = []

    def visit(block):
        if has_float_divide(block.body):
            divides.append(int(np.prod([int(iv.dom.extent) for iv in block.iter_vars])))

    funcs = [f for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert funcs
    for f in funcs:
        tvm_ffi.structural_walk(f.body, [(s_tir.SBlock, visit)], order="post")
    assert divides and all(d <= positions for d in divides), (divides, positions)
    if target == "x86-avx2":
        ex = build(import_onnx(model, {"x": list(shape)}, spec), spec)
        got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
