"""AArch64 bundles: cross-compile a tiny Relax model, add the device files, run bin/bdp-run under qemu.

Needs g++-aarch64-linux-gnu and qemu-user (CI installs them; the test fails, not skips, without
them) and the aarch64 TVM runtime wheels from PyPI once (cached in ~/.cache/bdp or $BDP_CACHE,
or provided through BDP_AARCH64_RUNTIME).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bdp.targets.devices import aarch64

RPI4 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
IN_SHAPE = (1, 3, 8, 8)

pytestmark = pytest.mark.slow


def _require_tools():
    ok, reason = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI must install them): {reason}")


def _onnx_two_outputs() -> onnx.ModelProto:
    """x -> Conv(3->4, 3x3, pad 1) + bias -> Relu -> "feat";  feat -> GlobalAveragePool -> "pool"."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["feat"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["pool"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(IN_SHAPE))],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("pool", TensorProto.FLOAT, [1, 4, 1, 1])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _write_bundle(folder: Path, mod, outputs: list[tuple[str, list[int]]]) -> Path:
    import tvm

    folder.mkdir(parents=True)
    ex = tvm.compile(mod, tvm.target.Target(RPI4))
    ex.export_library(str(folder / "model.so"), cc=aarch64.default_cc())
    manifest = {
        "target": "rpi4",
        "input": {"name": "x", "shape": list(IN_SHAPE), "dtype": "float32"},
        "outputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in outputs],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    written = aarch64.add_device_files(folder)
    for rel in ("lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "bin/bdp-run", "README.device.md"):
        assert folder / rel in written and (folder / rel).is_file(), rel
    return folder


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    _require_tools()
    from tvm.relax.frontend.onnx import from_onnx

    model = _onnx_two_outputs()
    mod = from_onnx(model, shape_dict={"x": list(IN_SHAPE)})
    folder = tmp_path_factory.mktemp("aarch64") / "bundle"
    return _write_bundle(folder, mod, [("feat", [1, 4, 8, 8]), ("pool", [1, 4, 1, 1])]), model


def _run(bundle: Path, x, tmp: Path, extra=(), name="input.npy"):
    path = tmp / name
    np.save(path, x)
    out = tmp / "out"
    t0 = time.perf_counter()
    proc = aarch64.run_under_qemu(bundle, path, out, extra, timeout=300)
    return proc, out, time.perf_counter() - t0


def test_two_outputs_match_onnxruntime(onnx_bundle, tmp_path):
    import onnxruntime as ort

    bundle, model = onnx_bundle
    x = np.random.default_rng(1).standard_normal(IN_SHAPE).astype(np.float32)
    proc, out, seconds = _run(bundle, x, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    print(f"qemu run of the tiny model: {seconds:.2f} s")

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip(("feat", "pool"), sess.run(["feat", "pool"], {"x": x}), strict=True))
    assert sorted(p.name for p in out.iterdir()) == ["feat.npy", "pool.npy"]
    for name, ref in want.items():
        got = np.load(out / f"{name}.npy")
        assert got.dtype == np.float32 and got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_readme_states_requirements(onnx_bundle):
    bundle, _ = onnx_bundle
    text = (bundle / "README.device.md").read_text()
    assert "./bin/bdp-run . input.npy out/" in text
    req = aarch64.device_requirements([bundle / "bin" / "bdp-run", bundle / "lib" / "libtvm_runtime.so",
                                       bundle / "model.so"])
    assert req["glibc"] and f"glibc >= {req['glibc']}" in text


def test_wrong_shape_exits_2_with_one_line(onnx_bundle, tmp_path):
    bundle, _ = onnx_bundle
    proc, out, _ = _run(bundle, np.zeros((1, 3, 8, 9), np.float32), tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "shape (1, 3, 8, 9)" in lines[0] and "(1, 3, 8, 8)" in lines[0], proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("bad", ["float64", "int32", "fortran"])
def test_non_float32_exits_2(onnx_bundle, tmp_path, bad):
    bundle, _ = onnx_bundle
    x = np.zeros(IN_SHAPE, np.float32)
    x = np.asfortranarray(x) if bad == "fortran" else x.astype(bad)
    proc, _, _ = _run(bundle, x, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert ("float32" in lines[0]) or ("C-order" in lines[0]), lines[0]


def test_not_npy_and_bad_args_exit_2(onnx_bundle, tmp_path):
    bundle, _ = onnx_bundle
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    proc = aarch64.run_under_qemu(bundle, junk, tmp_path / "out", timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = aarch64.run_under_qemu(bundle, junk, tmp_path / "out", ["--repeat", "0"], timeout=300)
    assert proc.returncode == 2 and "--repeat" in proc.stderr, proc.stderr


def test_repeat_prints_one_json_line(onnx_bundle, tmp_path):
    bundle, _ = onnx_bundle
    x = np.ones(IN_SHAPE, np.float32)
    proc, out, seconds = _run(bundle, x, tmp_path, ["--warmup", "2", "--repeat", "20"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    stats = json.loads(lines[0])
    assert stats["repeat"] == 20 and stats["warmup"] == 2
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert (out / "feat.npy").is_file() and (out / "pool.npy").is_file()
    print(f"qemu --repeat 20: {seconds:.2f} s, {stats}")


def test_single_output_blockbuilder(tmp_path):
    """main returning one tensor (not a tuple), built with relax.BlockBuilder."""
    _require_tools()
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(IN_SHAPE), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.multiply(x, relax.const(2.0, "float32"))))
            z = bb.emit_output(relax.op.add(y, relax.const(0.5, "float32")))
        bb.emit_func_output(z)
    bundle = _write_bundle(tmp_path / "bundle", bb.get(), [("y", list(IN_SHAPE))])

    xv = np.random.default_rng(2).standard_normal(IN_SHAPE).astype(np.float32)
    proc, out, _ = _run(bundle, xv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(out / "y.npy"), np.maximum(xv * 2, 0) + 0.5, rtol=1e-6, atol=1e-6)

    # Relocatable: the folder moved elsewhere still finds lib/ through rpath $ORIGIN/../lib.
    moved = tmp_path / "elsewhere" / "b2"
    moved.parent.mkdir()
    bundle.rename(moved)
    proc = aarch64.run_under_qemu(moved, tmp_path / "input.npy", tmp_path / "out2",
                                  env={"LD_LIBRARY_PATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "out2" / "y.npy"), np.load(out / "y.npy"))
