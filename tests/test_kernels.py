"""Packed-bit kernels and schedules: exactness on x86 (AVX-512 and AVX2 paths, both tile
orientations), the float schedules against onnxruntime, CUDA and AArch64 code generation, and a
``bdp bench --quick`` smoke run.

Exactness compares against :func:`bdp.passes.ops.binary_conv_reference` computed in the test; the
integer dot product ``D`` is recovered from both outputs and must match exactly.
"""

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.passes.ops import attach_functions, binary_conv_reference, make_binary_conv_node, pack_signs

from conftest import run_cli

# n, c, m, kernel, stride, dilation, pads (t, l, b, r), group, pad_value, act_threshold, h, w
GRID = [
    (1, 64, 64, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 16, 16),  # 64-bit words, zero padding
    (2, 3, 5, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 7, 9),  # 3 channels (8-bit words), batch 2
    (1, 13, 16, 3, 2, 1, (1, 2, 0, 1), 1, -1.0, 0.3, 9, 11),  # 16-bit words, asymmetric, -1 pad
    (2, 70, 33, 3, 1, 2, (2, 2, 2, 2), 1, 0.0, -0.2, 12, 10),  # dilation 2, odd output channels
    (1, 130, 24, 1, 1, 1, (0, 0, 0, 0), 1, 0.0, 0.0, 5, 7),  # 1x1, 130 channels
    (1, 130, 64, 1, 2, 1, (0, 0, 0, 0), 1, 0.0, 0.0, 8, 10),  # 1x1 stride 2 (phase split)
    (2, 32, 32, 3, 1, 1, (1, 1, 1, 1), 2, 1.0, 0.0, 8, 16),  # groups 2, one padding
    (1, 24, 24, 3, 1, 1, (1, 1, 1, 1), 24, 0.0, 0.0, 6, 6),  # depthwise
    (1, 70, 140, 3, 2, 2, (2, 1, 2, 3), 2, -1.0, 0.5, 11, 13),  # stride 2 + dilation 2 + groups
    (1, 128, 128, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 8, 10),  # narrow output, many channels
    (1, 64, 64, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 16, 40),  # wide output
    (1, 16, 16, 5, 1, 1, (2, 2, 2, 2), 1, 0.0, 0.0, 3, 4),  # padding larger than the image
    (1, 96, 48, (3, 1), (2, 1), 1, (1, 0, 1, 0), 1, 0.0, 0.0, 9, 24),  # non-square kernel/stride
    (1, 32, 32, 7, 1, 1, (3, 3, 3, 3), 32, 0.0, 0.0, 12, 16),  # depthwise 7x7 (tiles of 4 rows)
    # depthwise, stride 2 and dilation 2 (a padded row read twice per kernel column), -1 padding
    (1, 16, 16, 3, 2, 2, (2, 2, 2, 2), 16, -1.0, 0.1, 16, 40),
    (1, 8, 8, 3, 1, 1, (1, 1, 1, 1), 8, 0.0, 0.0, 9, 70),  # depthwise, odd rows (one at a time), 3 vectors
]


def case_layer(rng, c, m, k, s, d, pads, g, pv, thr):
    """Random ±1 weights (packed), scale, bias and the bdp.BinaryConv attributes of one grid case."""
    kh, kw = (k, k) if isinstance(k, int) else k
    st = (s, s) if isinstance(s, int) else s
    dl = (d, d) if isinstance(d, int) else d
    ws = np.where(rng.standard_normal((m, c // g, kh, kw)) >= 0, 1.0, -1.0)
    wb = pack_signs(ws)
    sc = ((rng.random(m) + 0.1) * np.where(rng.random(m) < 0.2, -1, 1)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    attrs = dict(kernel_shape=[kh, kw], strides=list(st), dilations=list(dl), pads=list(pads), group=g,
                 pad_value=pv, act_threshold=thr)
    return wb, sc, b, attrs


def binary_conv_model(n, c, m, k, s, d, pads, g, pv, thr, h, w, seed=0):
    """(ONNX model with one bdp.BinaryConv, x, reference y, (scale, bias), params)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = thr  # exact ties at the threshold read as +1
    wb, sc, b, attrs = case_layer(rng, c, m, k, s, d, pads, g, pv, thr)
    node = make_binary_conv_node("bc", ["x", "wb", "sc", "b"], "y", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(sc, "sc"), numpy_helper.from_array(b, "b")])
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    want = binary_conv_reference(x, wb, sc, b, **attrs)
    return model, x, want, (sc, b), attrs


def build_and_run(model, x, target, options=None):
    import tvm
    from tvm import relax

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.options import DEFAULT
    from bdp.targets.spec import get_target

    spec, options = get_target(target), options or DEFAULT
    ex = build(import_onnx(model, {"x": list(x.shape)}, spec, options), spec, options=options)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def assert_exact(got, want, sc, b):
    assert got.shape == want.shape, (got.shape, want.shape)
    s4, b4 = sc.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1)
    d_got, d_want = np.rint((got - b4) / s4), np.rint((want - b4) / s4)
    assert np.array_equal(d_got, d_want), f"integer dot products differ in {int((d_got != d_want).sum())} places"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _params_of(case):
    from bdp.targets.kernels import BinaryConvParams

    n, c, m, k, s, d, pads, g, pv, thr, h, w = case
    kh, kw = (k, k) if isinstance(k, int) else k
    return BinaryConvParams(n=n, c=c, h=h, w=w, m=m, kh=kh, kw=kw, strides=(s, s) if isinstance(s, int) else s,
                            dilations=(d, d) if isinstance(d, int) else d, pads=pads, group=g,
                            act_threshold=thr, pad_value=pv)


def test_grid_covers_every_word_size_and_both_orientations():
    from bdp.targets.schedules import binary_conv_plan
    from bdp.targets.spec import get_target

    params = [_params_of(c) for c in GRID]
    assert {p.word for p in params} == {8, 16, 32, 64}
    for t in ("x86", "x86-avx2"):
        assert {binary_conv_plan(p, get_target(t))["orient"] for p in params} == {"x", "k"}
    from bdp.targets.schedules.binary_cpu import depthwise_rows

    # depthwise tiles of 4, 2 and 1 output rows on AVX2
    assert {depthwise_rows(p, get_target("x86-avx2")) for p in params if p.depthwise} == {1, 2, 4}


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
@pytest.mark.parametrize("case", GRID, ids=[f"case{i}" for i in range(len(GRID))])
def test_binary_conv_exact(case, target):
    model, x, want, (sc, b), _ = binary_conv_model(*case)
    assert_exact(build_and_run(model, x, target), want, sc, b)


@pytest.mark.parametrize("orient", ["x", "k"])
@pytest.mark.parametrize("case", [GRID[i] for i in (0, 2, 3, 6, 8, 9, 12)], ids=lambda c: f"c{c[1]}m{c[2]}")
def test_binary_conv_exact_forced_orientation(case, orient):
    from bdp.targets.options import CompileOptions

    model, x, want, (sc, b), _ = binary_conv_model(*case, seed=1)
    assert_exact(build_and_run(model, x, "x86", CompileOptions(binary_orient=orient)), want, sc, b)


@pytest.mark.parametrize("word", ["8", "16", "32"])
@pytest.mark.parametrize("case", [GRID[i] for i in (0, 2, 3, 8, 9, 12)], ids=lambda c: f"c{c[1]}m{c[2]}")
def test_binary_conv_exact_forced_word(case, word):
    """Every word size on any group (the targets pick 16-bit words on NEON and on AVX2's wide
    rows, 64-bit ones elsewhere: binary_word), both orientations where the channels allow."""
    from bdp.targets.options import CompileOptions

    model, x, want, (sc, b), _ = binary_conv_model(*case, seed=2)
    for orient in ("x", "k"):
        got = build_and_run(model, x, "x86-avx2", CompileOptions(binary_word=word, binary_orient=orient))
        assert_exact(got, want, sc, b)


def test_x86_assembly_uses_vector_popcount():
    """AVX-512 VPOPCNTDQ on icelake-server (target x86-avx512); haswell has no vector popcount
    instruction (LLVM expands it with vpshufb), so x86-avx2 is checked for exactness above."""
    import tvm

    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    model, x, _, _, _ = binary_conv_model(*GRID[0])
    ex = build(import_onnx(model, {"x": list(x.shape)}), get_target("x86-avx512"))
    asm = _llvm_source(ex, "asm")
    assert "vpopcntq" in asm
    del tvm


def _modules(m):
    out = [m]
    for i in m.imports:
        out += _modules(i)
    return out


def _llvm_source(ex, fmt):
    return "\n".join(md.inspect_source(fmt) for md in _modules(ex.mod) if md.kind == "llvm")


@pytest.mark.parametrize("target", ["x86-avx2", "rpi4"])
def test_tile_buffers_stay_off_the_workspace(target):
    """The register tiles (a binary conv's accumulators, its pack stage's word) are stack buffers
    that LLVM keeps in registers, not one TVMBackendAllocWorkspace call per tile; with the option
    stack_buffers=false TVM's own lowering comes back (so the check can fail)."""
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.options import CompileOptions
    from bdp.targets.spec import get_target

    model, x, _, _, _ = binary_conv_model(1, 64, 64, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 8, 16)
    spec = get_target(target)

    def workspace_buffers(options):
        ex = build(import_onnx(model, {"x": list(x.shape)}, spec, options), spec, options=options)
        ll = _llvm_source(ex, "ll")
        return set(re.findall(r"%(\w+) = tail call ptr %\w+\(i32 1, i32 %dev_id", ll))

    off = workspace_buffers(CompileOptions(stack_buffers=False))
    assert {"bdp_popcount_local", "bdp_pack_local"} <= off, off
    on = workspace_buffers(CompileOptions())
    assert not any(b.endswith("_local") for b in on), on
    assert on <= off


# ---------------------------------------------------------------------------------------------
# float schedules


def _float_net():
    """A float graph with the operators the zoo uses: strided stem conv, 3x3, 1x1 at a narrow
    width, depthwise 7x7, ConvTranspose, Resize, MatMul + Softmax, BatchNorm-like affine, PRelu,
    max and average pooling."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [init("w0", 16, 3, 3, 3), init("w1", 32, 16, 3, 3), init("b1", 32), init("w2", 64, 32, 1, 1),
             init("w3", 64, 1, 7, 7), init("w4", 64, 32, 2, 2), init("a", 1, 32, 1, 1), init("slope", 32, 1, 1),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([1, 32, 80], np.int64), "shp")]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
        helper.make_node("Mul", ["p1", "a"], ["m1"]),
        helper.make_node("Conv", ["m1", "w2"], ["c2"], kernel_shape=[1, 1]),  # 1x1 at width 10
        helper.make_node("Conv", ["c2", "w3"], ["c3"], kernel_shape=[7, 7], pads=[3, 3, 3, 3], group=64),
        helper.make_node("ConvTranspose", ["c3", "w4"], ["t4"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["t4", "roi", "scales"], ["u"], mode="linear"),
        helper.make_node("Reshape", ["m1", "shp"], ["q"]),  # [1, 32, 80]
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),  # [1, 80, 32]
        helper.make_node("MatMul", ["qt", "q"], ["att"]),  # [1, 80, 80]
        helper.make_node("Softmax", ["att"], ["sm"], axis=-1),
        helper.make_node("MatMul", ["q", "sm"], ["o"]),  # [1, 32, 80]
        # pooling: its padding is inlined and its strided reads get no copy (few reads per input)
        helper.make_node("MaxPool", ["r0"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["ap"], ["ap2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "floatnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 40])],
                              [helper.make_tensor_value_info("u", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("o", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("ap2", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_float_schedules_match_onnxruntime_and_schedule_everything(target):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cg

    from bdp.passes.core import run_onnxruntime
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.schedules import schedule_float_cpu
    from bdp.targets.spec import get_target

    model = _float_net()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 40)).astype(np.float32)
    want = run_onnxruntime(model, {"x": x})
    spec = get_target(target)
    mod = import_onnx(model, {"x": [1, 3, 32, 40]})
    res = relax.VirtualMachine(build(mod, spec), tvm.cpu())["main"](tvm.runtime.tensor(x))
    for g, w in zip(res, want):
        g = g.numpy()
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max())) < 1e-4
    # every PrimFunc left by legalization and fusion gets a schedule
    t = tvm.target.Target(spec.tvm)
    with t:
        low = tvm.transform.Sequential(cg.library_dispatch_passes(t) + cg.legalize_passes(t))(mod)
    names = []
    for gv, f in low.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            new, _ = schedule_float_cpu(f, spec)
            assert new is not None, gv.name_hint
            names.append(gv.name_hint)
    assert any("conv2d_transpose" in n for n in names) and any("softmax" in n for n in names)


def _exp_net():
    """Exp, Sigmoid and a Softmax over a non-innermost axis (MTI-Net's task attention), on values
    from -100 to 100 (past both ends of float32's exp)."""
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Softmax", ["x"], ["sm0"], axis=1), helper.make_node("Mul", ["sm0", "x"], ["sm"])]
    shape = [1, 4, 16, 50]
    graph = helper.make_graph(nodes, "expnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("e", "s", "sm")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.concatenate([np.linspace(-100, 100, 1601, dtype=np.float32),
                        np.random.default_rng(2).uniform(-20, 20, 4 * 16 * 50 - 1601).astype(np.float32)])
    return model, x.reshape(shape)


@pytest.mark.parametrize("target", ["x86", "rpi4"])
def test_exp_and_sigmoid_are_vector_code_and_match_onnxruntime(target):
    """exp / sigmoid become a polynomial in vector registers (bdp.targets.fastmath), not one
    expf library call per lane; the results agree with float64 numpy to a few ulp and with
    onnxruntime to float round-off, including overflow to inf and underflow to 0."""
    import tvm
    from tvm import relax

    from bdp.passes.core import run_onnxruntime
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    model, x = _exp_net()
    ex = build(import_onnx(model, {"x": list(x.shape)}), get_target(target))
    asm = _llvm_source(ex, "asm")
    assert not re.search(r"\bexpf\b", asm), "exp left as a library call"
    if target != "x86":
        return  # AArch64: code checked here; results under qemu in the zoo tests
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        e = np.exp(x64)
        sm = np.exp(x64 - x64.max(axis=1, keepdims=True))
    want = [e, 1.0 / (1.0 + np.exp(-x64)), sm / sm.sum(axis=1, keepdims=True) * x64]
    # onnxruntime agrees where its own sigmoid is exact (MLAS clamps the input to [-18, 18])
    ort = run_onnxruntime(model, {"x": x})
    got = [g.numpy() for g in relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))]
    for g, w, o, name in zip(got, want, ort, ("exp", "sigmoid", "softmax")):
        assert np.array_equal(np.isinf(g), np.isinf(w.astype(np.float32))), name
        inside = (np.abs(x) < 18) if name == "sigmoid" else np.isfinite(o)
        assert float(np.abs(g[inside] - o[inside]).max()) <= 1e-6 * max(1.0, float(np.abs(o[inside]).max())), name
        if name == "softmax":
            continue  # float32 rounding of x - max (up to 4e-6 relative here) is in both
        normal = np.isfinite(w) & (np.abs(w) > 1.2e-38) & (np.abs(w) < 3.4e38)
        rel = np.abs(g[normal] - w[normal]) / np.abs(w[normal])
        assert float(rel.max()) < 1e-6, (name, float(rel.max()))  # float round-off (a few ulp)
        tiny = np.abs(w) <= 1.2e-38
        assert float(np.abs(g[tiny] - w[tiny]).max(initial=0)) < 1.2e-38, name  # subnormals flushed


# ---------------------------------------------------------------------------------------------
# CUDA and AArch64 code generation


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[3], GRID[7]], ids=["w64", "w16", "w32", "dw"])
def test_cuda_build_has_popcount(case):
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    model, x, _, _, _ = binary_conv_model(*case)
    ex = build(import_onnx(model, {"x": list(x.shape)}), get_target("cuda"))
    src = "\n".join(md.inspect_source("cuda") for md in _modules(ex.mod) if md.kind == "cuda")
    assert "__global__" in src
    if case[7] == case[1]:  # depthwise: 0/1 bytes are their own popcount, added as bytes
        assert not re.search(r"__popc(ll)?\(", src) and "^" in src
    else:
        assert re.search(r"__popc(ll)?\(", src), src[:2000]
    assert "threadIdx.x" in src


def test_cuda_bireal_tiny_compiles(tmp_path):
    ck = tmp_path / "m.pt"
    p = run_cli("init", "bireal-tiny", "-o", ck, "--width", "16")
    assert p.returncode == 0, p.stderr
    p = run_cli("compile", ck, "-o", tmp_path / "b", "--input-shape", "1,3,32,48", "--target", "cuda")
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["target"]["name"] == "cuda" and man["stats"]["binary_convs"] == 6


@pytest.mark.parametrize("target", ["rpi4", "arm64"])
def test_aarch64_assembly_uses_cnt(target):
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.spec import get_target

    for case in (GRID[0], GRID[9]):  # both orientations
        model, x, _, _, _ = binary_conv_model(*case)
        ex = build(import_onnx(model, {"x": list(x.shape)}), get_target(target))
        asm = _llvm_source(ex, "asm")
        assert re.search(r"\tcnt\tv\d+\.(16b|8b)", asm), "no NEON cnt"
        assert re.search(r"\tua(dd|da)lp\t", asm), "no pairwise widening add after cnt"


def _sign_conv_onnx(n, c, m, k, s, d, pads, g, pv, thr, h, w, seed=0):
    """The same layer as float ONNX the passes binarize: Where(x >= t, 1, -1) [-> Pad] -> Conv."""
    rng = np.random.default_rng(seed)
    ws = np.where(rng.standard_normal((m, c // g, k, k)) >= 0, 1.0, -1.0).astype(np.float32)
    wgt = ws * (rng.random((m, 1, 1, 1)) + 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(thr, np.float32), "t"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1.0, np.float32), "mone"), numpy_helper.from_array(wgt, "W"),
             numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b")]
    nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["ge"]), helper.make_node("Where", ["ge", "one", "mone"], ["xs"])]
    conv_in, conv_pads = "xs", list(pads)
    if pv != 0.0 and any(pads):
        t, l, bb, r = pads
        inits += [numpy_helper.from_array(np.array([0, 0, t, l, 0, 0, bb, r], np.int64), "pads"),
                  numpy_helper.from_array(np.array(pv, np.float32), "pv")]
        nodes.append(helper.make_node("Pad", ["xs", "pads", "pv"], ["xp"], mode="constant"))
        conv_in, conv_pads = "xp", [0, 0, 0, 0]
    nodes.append(helper.make_node("Conv", [conv_in, "W", "b"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                  dilations=[d, d], pads=conv_pads, group=g))
    graph = helper.make_graph(nodes, "signconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (n, c, h, w))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, rng.standard_normal((n, c, h, w)).astype(np.float32)


@pytest.mark.slow
def test_rpi4_bundle_exact_under_qemu(tmp_path):
    """Two layers (x and k orientation, zero and minus-one padding) built for rpi4, run under qemu."""
    import bdp
    from bdp.passes.core import run_onnxruntime
    from bdp.targets.devices import aarch64

    ok, why = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI must install them): {why}")
    for i, case in enumerate([(1, 64, 64, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 16, 16),
                              (1, 70, 32, 3, 2, 2, (2, 1, 2, 3), 2, -1.0, 0.3, 11, 13)]):
        model, x = _sign_conv_onnx(*case)
        src = tmp_path / f"m{i}.onnx"
        onnx.save(model, src)
        out = bdp.compile(str(src), target="rpi4", out=str(tmp_path / f"b{i}"))
        assert json.loads((tmp_path / f"b{i}" / "manifest.json").read_text())["stats"]["binary_convs"] == 1
        np.save(tmp_path / "x.npy", x)
        p = aarch64.run_under_qemu(out, tmp_path / "x.npy", tmp_path / f"o{i}")
        assert p.returncode == 0, p.stderr
        got = np.load(tmp_path / f"o{i}" / "y.npy")
        want = run_onnxruntime(model, {"x": x})[0]
        assert float(np.abs(got - want).max()) / float(np.abs(want).max()) < 1e-5


# ---------------------------------------------------------------------------------------------
# bench


def test_bench_quick_writes_json_and_png(tmp_path):
    """About 20-40 s here (two layer shapes, bireal-tiny at 256x320, a few runs each)."""
    p = run_cli("bench", "--quick", "--json", tmp_path / "b.json", "--chart", tmp_path / "b.png", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["quick"] and res["threads"] >= 1 and res["host"]["cpu"]
    assert {"bdp", "tvm", "onnxruntime", "torch"} <= set(res["versions"])
    assert len(res["layers"]) == 2 and all("error" not in r for r in res["layers"]), res["layers"]
    for r in res["layers"]:
        assert r["bdp"]["median_ms"] > 0 and r["binary_gmac_per_s"] > 0
        assert r["bdp_max_rel_diff_vs_onnxruntime"] < 1e-5
        for k in ("onnxruntime_fp32", "tvm_default_fp32", "tvm_scheduled_fp32", "torch_fp32"):
            assert r[k]["median_ms"] > 0 and r["speedup"][k] > 0
    assert len(res["models"]) == 1 and "error" not in res["models"][0], res["models"]
    m = res["models"][0]
    assert m["arch"] == "bireal-tiny" and m["speedup_vs_onnxruntime"] > 0 and m["compile_s"] > 0
    assert res["summary"]["layers"]["geomean_speedup_vs_onnxruntime"] > 0
    assert (tmp_path / "b.png").stat().st_size > 2000
    assert "geometric mean" in p.stdout
