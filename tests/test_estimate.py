"""``bdp profile --device cortex-a72-model``: the Cortex-A72 estimate of an AArch64 bundle.

The slow test builds a small rpi4 bundle (bireal-tiny, width 16, 32x40) and its x86 twin, and
checks that the estimator runs the real model (the runner's outputs under the estimator equal the
x86 bundle's), that instruction counts are exact (identical on two runs, and one more model run
adds exactly one run's model.so instructions), and that the per-kernel rows are the kernels that
model.so exports. Needs qemu-user, llvm and g++-aarch64-linux-gnu (.ci/setup installs them).
"""

import json
import os

import numpy as np
import pytest
import torch

import bdp
from bdp.errors import InputError
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint
from bdp.toolchain.runtime import estimate

from conftest import assert_close_outputs, assert_input_error, like_trained, run_cli

SHAPE = (1, 3, 32, 40)


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_plugin_builds_once_into_the_cache(tmp_path):
    first = estimate.build_plugin(out_dir=tmp_path)
    assert first.is_file() and first.parent == tmp_path
    assert first.read_bytes()[:4] == b"\x7fELF"
    mtime = first.stat().st_mtime_ns
    assert estimate.build_plugin(out_dir=tmp_path) == first and first.stat().st_mtime_ns == mtime


def test_missing_tools_name_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(InputError) as e:
        estimate.tools()
    msg = str(e.value)
    assert "llvm-mca" in msg and "qemu-aarch64" in msg and "apt-get install" in msg and "llvm" in msg


def test_x86_bundle_is_refused_with_exit_2(tmp_path):
    b = bdp.compile(_tiny_onnx(str(tmp_path / "t.onnx")), target="x86", out=str(tmp_path / "bx86"))
    line = assert_input_error(run_cli("profile", b, "--device", "cortex-a72-model"), "cortex-a72-model", "x86")
    assert "rpi4" in line
    assert_input_error(run_cli("profile", tmp_path / "nothing", "--device", "cortex-a72-model"), "nothing")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimate")
    torch.manual_seed(0)
    ckpt = save_checkpoint(like_trained(zoo.build("bireal-tiny", width=16), shape=SHAPE), str(d / "m.pt"))
    arm = bdp.compile(ckpt, target="rpi4", out=str(d / "brpi"), input_shape=SHAPE)
    x86 = bdp.compile(ckpt, target="x86", out=str(d / "bx86"), input_shape=SHAPE)
    return arm, x86


@pytest.mark.slow
def test_estimate_is_exact_covers_the_kernels_and_runs_the_real_model(bundles, tmp_path):
    arm, x86 = bundles
    # 1. the CLI: text labelled as an estimate, JSON as for a local profile
    p = run_cli("profile", arm, "--device", "cortex-a72-model", "--json", tmp_path / "e.json", timeout=900)
    assert p.returncode == 0, p.stderr
    assert "ESTIMATE" in p.stdout and "ignores: caches" in p.stdout and "1.5 GHz" in p.stdout
    first = json.loads((tmp_path / "e.json").read_text())
    assert first["device"] == "cortex-a72-model" and first["estimate"] is True and first["threads"] == 1
    assert first["model"]["insns"] > 0 and 0 < first["model"]["ms"] < first["estimate_ms"]
    assert first["model"]["mca_coverage"] >= 0.98
    # one more model run adds exactly one run's model.so instructions
    assert first["model_insns_exact"] and first["model_insns_one_more_run"] == round(first["model"]["insns"])
    calls = first["runtime_calls"]
    assert calls["TVMBackendAllocWorkspace"] >= 1 and calls["TVMBackendAllocWorkspace"] == calls["TVMBackendFreeWorkspace"]
    assert calls["TVMBackendAllocWorkspace"] == int(calls["TVMBackendAllocWorkspace"])

    # 2. again, in-process, on the same input: identical instruction counts per kernel
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    second = estimate.estimate(arm, x, overhead=False, out_dir=tmp_path / "out")
    ins1 = {r["op"]: r["insns"] for r in first["per_op"]}
    ins2 = {r["op"]: r["insns"] for r in second["per_op"]}
    assert ins1 == ins2
    assert second["runtime_calls"] == calls  # no workspace calls outside model runs

    # the per-kernel rows are the kernels model.so exports (every one of them runs)
    assert set(ins1) == set(estimate.model_kernels(arm))
    assert abs(sum(r["share"] for r in first["per_op"]) - 1) < 1e-6

    # 3. the runner under the estimator ran the real model: its outputs equal the x86 bundle's
    names = [o["name"] for o in json.loads(open(os.path.join(arm, "manifest.json")).read())["outputs"]]
    got = {n: np.load(tmp_path / "out" / f"{n}.npy") for n in names}
    assert_close_outputs(got, bdp.load(x86)(x), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bdp bench: the onnxruntime INT8 baseline, the rpi4 tables


def test_int8_baseline_is_static_qdq_per_channel(tmp_path):
    import onnx
    from onnx import numpy_helper

    from bdp.toolchain.bench.suite import conv_layer_onnx, ort_int8_session, quantize_int8
    from bdp.toolchain.runtime.profile import ort_session

    model = conv_layer_onnx(16, 8, 10, binary=False)
    q = onnx.load(quantize_int8(model, str(tmp_path / "q.onnx"), "x", (1, 16, 8, 10)))
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    w_dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1])
    assert inits[w_dq.input[0]].dtype == np.int8 and inits[w_dq.input[1]].shape == (16,)  # one scale per channel
    x = np.random.default_rng(3).standard_normal((1, 16, 8, 10)).astype(np.float32)
    want = ort_session(model, 1).run(None, {"x": x})[0]
    got = ort_int8_session(model, 1, "x", x.shape).run(None, {"x": x})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 0.1


def test_bench_layer_row_has_int8_and_isa(tmp_path):
    from bdp.targets.spec import get_target
    from bdp.toolchain.bench.suite import bench_layer, isa_name

    spec = get_target("x86")
    row = bench_layer(64, 8, 10, threads=1, rounds=1, slow_rounds=1, spec=spec)
    assert row["ort_int8_ms"] == row["onnxruntime_int8"]["median_ms"] > 0
    assert row["x_ort_int8"] == pytest.approx(row["ort_int8_ms"] / row["bdp"]["median_ms"])
    assert row["ort_int8_max_rel_diff_vs_fp32"] < 0.1
    assert isa_name(spec) in ("AVX2", "AVX-512 VPOPCNTDQ", "AVX-512", "POPCNT")


@pytest.mark.slow
def test_bench_rpi4_layer_row(tmp_path):
    """One small layer of ``bdp bench --target rpi4``: binary and float builds for rpi4, both estimated."""
    from bdp.toolchain.bench import rpi4 as bench_rpi4

    row = bench_rpi4.bench_layer(64, 4, 5, str(tmp_path))
    assert row["bdp_max_rel_diff_vs_onnxruntime"] < 1e-5 and row["tvm_scheduled_max_rel_diff"] < 1e-4
    b, f = row["bdp"], row["tvm_scheduled_fp32"]
    assert 0 < b["kernels_ms"] < b["est_ms"] and f["est_ms"] > 0
    assert row["x_float"] == pytest.approx(f["est_ms"] / b["est_ms"]) and row["x_float"] > 1
    assert row["binary_macs_per_cycle"] == pytest.approx(64 * 64 * 9 * 4 * 5 / b["cycles"])
    assert any("binary_conv" in k["op"] for k in b["top_kernels"])
    assert "bdp est ms" in bench_rpi4.format_layers([row]) and "ESTIMATED" in bench_rpi4.format_layers([row])
