"""bdp.targets.byte_counters: the byte-lane popcount rewrite is exact (against numpy on TIR
nests, and against the reference conv through the whole AVX2 build), rewrites what it should and
leaves alone what it must."""

import re

import numpy as np
import pytest

from test_kernels import GRID, _llvm_source, assert_exact, binary_conv_model


def _nest(word_bits, outer, inner, moving_acc=False, reads_acc=False):
    """A PrimFunc adding popcounts of uint{WORD_BITS} x 8 words, and of their XOR with the words
    read backwards, over loops OUTER x INNER into two int32 x 8 accumulators (with MOVING_ACC the
    first accumulator's index changes with the step; with READS_ACC (32-bit words) the second
    popcount reads the first accumulator: neither is a nest the pass may rewrite)."""
    from tvm.script import tirx as T

    ut, steps = f"uint{word_bits}", outer * inner
    n = steps * 8
    mod = 2 if moving_acc else 1

    @T.prim_func
    def f(A: T.Buffer((n,), ut), out: T.Buffer((16,), "int32")):
        acc = T.alloc_buffer((2,), "int32x8", scope="local")
        acc[0] = T.Broadcast(0, 8)
        acc[1] = T.Broadcast(0, 8)
        for r, w in T.grid(outer, inner):
            acc[(r * inner + w) % mod] = acc[(r * inner + w) % mod] + T.Cast(
                "int32x8", T.popcount(A[T.Ramp((r * inner + w) * 8, 1, 8)]))
            if reads_acc:
                acc[1] = acc[1] + T.Cast("int32x8", T.popcount(
                    A[T.Ramp((r * inner + w) * 8, 1, 8)] ^ T.reinterpret("uint32x8", acc[0])))
            else:
                acc[1] = acc[1] + T.Cast("int32x8", T.popcount(
                    A[T.Ramp((r * inner + w) * 8, 1, 8)] ^ A[T.Ramp((steps - 1 - r * inner - w) * 8, 1, 8)]))
        out[T.Ramp(0, 1, 8)] = acc[0]
        out[T.Ramp(8, 1, 8)] = acc[1]

    return f


def _run(func, a):
    import tvm

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target={"kind": "llvm", "mcpu": "haswell"})
    out = tvm.runtime.tensor(np.zeros(16, np.int32))
    ex["main"](tvm.runtime.tensor(a.reshape(-1)), out)
    return out.numpy()


def _popcount(a):
    return np.unpackbits(a.view(np.uint8).reshape(a.shape + (-1,)), axis=-1).sum(-1).astype(np.int64)


def _expected(a, moving_acc=False):
    fwd, xor = _popcount(a), _popcount(a ^ a[::-1])
    first = np.zeros(8, np.int64)
    if not moving_acc:
        first += fwd.sum(0)
    else:  # acc[step % 2]: even steps into acc[0], odd ones into acc[1]
        first += fwd[0::2].sum(0)
    second = xor.sum(0) + (fwd[1::2].sum(0) if moving_acc else 0)
    return np.concatenate([first, second])


# word bits, outer, inner: one chunk for the whole nest; the inner loop a chunk; the inner loop
# split (64 = 4 x 16; 62 = 2 x 31, the most steps a byte holds)
SHAPES = [(16, 3, 4), (32, 9, 8), (64, 5, 31), (16, 2, 64), (32, 1, 62), (64, 3, 62)]


@pytest.mark.parametrize("fill", ["random", "ones"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"w{s[0]}-{s[1]}x{s[2]}")
def test_byte_counters_exact_on_nests(shape, fill):
    """Rewritten and exact; all-ones words put the most a byte lane ever holds (31 x 8) in it."""
    from bdp.targets.byte_counters import byte_counters

    bits, outer, inner = shape
    rng = np.random.default_rng(bits + outer + inner)
    dt = np.dtype(f"uint{bits}")
    a = (rng.integers(0, 2**bits, size=(outer * inner, 8), dtype=dt) if fill == "random"
         else np.full((outer * inner, 8), np.iinfo(dt).max, dt))
    f = _nest(bits, outer, inner)
    g, n = byte_counters(f)
    assert n == 1
    assert "bdp_byte_counts" in g.script() and "uint8x" in g.script()
    want = _expected(a)
    np.testing.assert_array_equal(_run(f, a), want)
    np.testing.assert_array_equal(_run(g, a), want)


def test_byte_counters_leave_a_nest_that_reads_its_accumulators():
    from bdp.targets.byte_counters import byte_counters

    f = _nest(32, 4, 8, reads_acc=True)
    g, n = byte_counters(f)
    assert n == 0 and "bdp_byte_counts" not in g.script()
    a = np.random.default_rng(1).integers(0, 2**32, size=(32, 8), dtype=np.uint32)
    np.testing.assert_array_equal(_run(g, a), _run(f, a))


@pytest.mark.parametrize("shape, moving", [((16, 3, 4), True),  # an accumulator index that moves
                                           ((32, 1, 3), False),  # too few steps to gain
                                           ((64, 1, 37), False)])  # 37 steps, prime: no chunk fits
def test_byte_counters_leave_other_nests(shape, moving):
    from bdp.targets.byte_counters import byte_counters

    bits, outer, inner = shape
    f = _nest(bits, outer, inner, moving_acc=moving)
    g, n = byte_counters(f)
    assert n == 0 and "bdp_byte_counts" not in g.script()
    a = np.random.default_rng(0).integers(0, 2**bits, size=(outer * inner, 8), dtype=np.dtype(f"uint{bits}"))
    np.testing.assert_array_equal(_run(g, a), _expected(a, moving))


SPLIT = (1, 512, 64, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0, 8, 10)  # 32 words of 16 bits per tap


@pytest.mark.parametrize("word", ["auto", "16", "32", "64"])
# (GRID[8], 35 channels a group on 6x7 outputs, is scalar code: the pass has no vector to count in)
@pytest.mark.parametrize("case", [GRID[i] for i in (0, 2, 3, 6, 10, 12)] + [SPLIT],
                         ids=lambda c: f"c{c[1]}m{c[2]}k{c[3]}")
def test_byte_counters_exact_through_the_build(case, word, monkeypatch):
    """x86-avx2 builds with byte counters (the default) and without: both exact against the
    reference conv; with them the conv's popcount is on byte vectors (LLVM's ctpop.vNi8)."""
    import tvm
    from tvm import relax

    import bdp.targets.byte_counters as bc
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.options import CompileOptions
    from bdp.targets.spec import get_target

    rewritten = []
    real = bc.byte_counters

    def counting(func):
        out = real(func)
        rewritten.append(out[1])
        return out

    monkeypatch.setattr(bc, "byte_counters", counting)
    model, x, want, (sc, b), _ = binary_conv_model(*case, seed=3)
    spec = get_target("x86-avx2")
    for on in (True, False):
        rewritten.clear()
        opts = CompileOptions(binary_word=word, byte_counters=on)
        ex = build(import_onnx(model, {"x": list(x.shape)}, spec, opts), spec, options=opts)
        got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        assert_exact(got, want, sc, b)
        wide_pops = re.findall(r"llvm\.ctpop\.v\d+i(?:16|32|64)\b", _llvm_source(ex, "ll"))
        if on:
            assert not wide_pops  # every vector popcount on bytes
        else:
            assert not rewritten
            assert wide_pops or word == "auto"  # (the check above can fail)


def test_avx2_byte_word_fills_vectors_of_columns():
    import dataclasses

    from bdp.targets.kernels import BinaryConvParams
    from bdp.targets.options import CompileOptions
    from bdp.targets.schedules import binary_conv_plan
    from bdp.targets.schedules.binary_cpu import binary_word
    from bdp.targets.spec import get_target

    spec = get_target("x86-avx2")

    def plan(c, h, w, **opts):
        p = BinaryConvParams(n=1, c=c, h=h, w=w, m=c, kh=3, kw=3, strides=(1, 1), dilations=(1, 1),
                             pads=(1, 1, 1, 1), group=1, act_threshold=0.0, pad_value=0.0)
        p = dataclasses.replace(p, word_bits=binary_word(p, spec, CompileOptions(**opts)))
        return binary_conv_plan(p, spec)["orient"], p.word

    assert plan(64, 64, 80) == ("x", 16)  # 80 columns: 5 vectors of 16, 64 channels in 4 words
    assert plan(128, 32, 40) == ("x", 32)  # 40 columns: 5 vectors of 8 (not of 16)
    assert plan(256, 16, 20) == ("k", 16)  # 20 columns: no whole vector, channels in the lanes
    assert plan(48, 16, 32)[1] == 16  # 48 channels: 3 words of 16 bits (2 of 32 would pad 16)
    assert plan(256, 16, 20, byte_counters=False)[1] == 64  # without: 64-bit words


def test_a_skipped_rewrite_is_in_the_compile_report(monkeypatch, tmp_path):
    """The rewrite is an optimization: a function it cannot take apart is compiled as it came,
    with the same outputs, and the compile report says which and why (a silent skip would hide a
    speed regression)."""
    import json

    import onnx
    import onnxruntime as ort

    import bdp
    import bdp.targets.byte_counters as bc
    from bdp.toolchain.bench.table import conv_layer_onnx

    def failing(func):
        raise ValueError("unexpected loop nest\nsecond line")

    monkeypatch.setattr(bc, "byte_counters", failing)
    model = conv_layer_onnx(16, 8, 16, binary=True)
    onnx.save(model, tmp_path / "layer.onnx")
    out = bdp.compile(str(tmp_path / "layer.onnx"), target="x86-avx2", out=str(tmp_path / "b"))
    notes = json.loads((tmp_path / "b" / "report.json").read_text())["notes"]
    skipped = [n for n in notes if n.startswith("byte counters skipped in ")]
    assert skipped and all("ValueError: unexpected loop nest)" in n for n in skipped), notes
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 16)).astype(np.float32)
    got = bdp.load(out)(x)["y"]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
