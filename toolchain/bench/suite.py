"""``bdp bench``: the performance suite.

Two parts, both timed on this host with the same number of threads for every runtime
(``TVM_NUM_THREADS``, default: the physical cores, see
:func:`bdp.targets.spec.configure_runtime_threads`; onnxruntime ``intra_op_num_threads``,
``torch.set_num_threads``):

**layers** - one binary 3x3 conv layer (stride 1, pad 1, C_in = C_out, float input, float output:
binarize + pack + popcount conv + epilogue all counted) at the four feature-map shapes of a
256x320 image at strides 4, 8, 16, 32 (64x80x64, 32x40x128, 16x20x256, 8x10x512). bdp compiles it
the normal way: a float ONNX graph ``Where(x >= 0, 1, -1) -> Conv(alpha * sign(W)) + b`` goes
through bdp's passes (it becomes one ``bdp.BinaryConv``), the Relax import and ``build``; the
Relax VM runs it. The baselines run the same conv in float32 (``Conv(W) + b`` on the float input):
onnxruntime, TVM with the Relax default CPU pipeline (unscheduled loops), TVM with bdp's float
schedules (:mod:`bdp.targets.schedules`) and PyTorch; and onnxruntime INT8, the float conv
statically quantized (:func:`ort_int8_session`: QDQ, per-channel weights, calibrated on random
normal inputs). Reported: milliseconds (median and min),
binary MAC/s, speed-ups and their geometric mean, and the bdp output's difference from onnxruntime
running the binary graph (it should be float round-off).

**models** - every zoo architecture (``bdp.models.zoo.ARCHITECTURES``) at 1x3x256x320: a checkpoint
from ``zoo.build`` (seed 0) + ``save_checkpoint``, ``bdp.compile`` for x86 (wall time recorded),
then the bundle vs onnxruntime on the bundle's ``reference.onnx`` (the float model), FP32 and
statically quantized INT8. Also the
weight sizes (bundle constants vs float ONNX initializers, and the files).

Timings alternate between the runtimes in a few passes of consecutive runs (see
:func:`time_interleaved`), so that a change of the machine's load hits them alike; the median is
the headline number and the minimum is kept too. ``--quick`` is a smoke run: fewer
rounds, the first two layer shapes, one model. The output and the JSON (``isa``) name the popcount
ISA bdp's kernels use (AVX2, AVX-512 VPOPCNTDQ: the target spec's).

``--target rpi4`` makes the same two tables for a Raspberry Pi 4 from the Cortex-A72 estimator
instead of timing (:mod:`bdp.toolchain.bench.rpi4`). ``--only float-layers`` runs
:mod:`bdp.toolchain.bench.float_layers` instead: bdp's float (non-binary) layers against onnxruntime,
speed and round-off; ``--only wild`` the networks from the wild (:mod:`bdp.toolchain.bench.wild`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time

import numpy as np

from bdp.errors import first_line
from bdp.toolchain.runtime.timing import ort_session

from .table import (LAYER_SHAPES, MODEL_INPUT, conv_layer_onnx, fmt, geomean, host, setup_threads, time_interleaved,
                    versions, write_json)

GOALS = {"layer_geomean": 8.0, "layer_each": 5.0, "model_each": 4.0, "weights_ratio": 20.0,
           "compile_seconds": 60.0}


def targets_for(spec) -> dict:
    """The goals of the suite on target SPEC: GOALS, with the spec's ``bench_goals`` where the
    project's issues ask differently of its ISA."""
    return {**GOALS, **spec.bench_goals}


# ---------------------------------------------------------------------------------------------
# helpers


def isa_name(spec) -> str:
    """The popcount ISA bdp's kernels run with, as a reader knows it (from the target spec)."""
    return spec.isa_label or spec.popcount_isa or "?"


def int8_reduce_range() -> bool:
    """True on x86 without VNNI: there onnxruntime's 8-bit conv multiplies u8 x s8 pairs with
    VPMADDUBSW, whose 16-bit sums saturate with full-range weights (seen here on an AVX2 host: a
    3x3 conv 24% off instead of 2%); onnxruntime's guide says to quantize with ``reduce_range``
    (7-bit weights) on such hosts."""
    from bdp.targets.spec import cpu_flags

    flags = cpu_flags()
    return bool(flags) and not ({"avx512_vnni", "avx_vnni"} & flags)


def ort_int8_session(model_or_path, threads, input_name, shape, calib=4, seed=0):
    """An :func:`ort_session` of MODEL quantized to INT8 by :func:`quantize_int8`."""
    with tempfile.TemporaryDirectory(prefix="bdp-int8-") as d:
        out = os.path.join(d, "int8.onnx")
        quantize_int8(model_or_path, out, input_name, shape, calib, seed)
        return ort_session(out, threads)


def quantize_int8(model_or_path, out, input_name, shape, calib=4, seed=0):
    """onnxruntime INT8: MODEL pre-processed as onnxruntime's quantization guide asks
    (``quant_pre_process``: shape inference, BatchNormalization folded into Conv), then statically
    quantized with ``onnxruntime.quantization.quantize_static`` (QDQ, signed 8-bit activations and
    weights, per-channel weights: onnxruntime's recommended first choice), calibrated (min/max) on
    CALIB standard-normal inputs, 7-bit weights where :func:`int8_reduce_range` says so; the
    quantized model is written to OUT."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.data = iter([{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(calib)])

        def get_next(self):
            return next(self.data, None)

    with tempfile.TemporaryDirectory(prefix="bdp-int8-") as d:
        src = model_or_path
        if hasattr(model_or_path, "SerializeToString"):
            src = os.path.join(d, "fp32.onnx")
            onnx.save(model_or_path, src)
        pre = os.path.join(d, "pre.onnx")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs its advice on the root logger
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=int8_reduce_range(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    return out


def _int8(row, res, bdp_key="bdp"):
    """Flat INT8 keys of a row: ort_int8_ms (median) and x_ort_int8 (INT8 time / bdp time)."""
    if "onnxruntime_int8" in res:
        row["ort_int8_ms"] = res["onnxruntime_int8"]["median_ms"]
        row["x_ort_int8"] = row["ort_int8_ms"] / res[bdp_key]["median_ms"]


# ---------------------------------------------------------------------------------------------
# layers


def _vm_callable(ex, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    f = vm["main"]
    xt = tvm.runtime.tensor(x)
    return (lambda: f(xt)), (lambda: f(xt).numpy())


def bench_layer(c, h, w, *, threads, rounds, slow_rounds, spec):
    """One row of the layer table (see the module docstring)."""
    import torch
    import tvm

    from bdp.passes import run_pipeline
    from bdp.targets.kernels import BinaryConvParams
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.schedules import binary_conv_plan, binary_word

    row = {"shape": [c, h, w], "c_in": c, "c_out": c, "h": h, "w": w, "kernel": 3,
           "binary_macs": c * c * 9 * h * w}
    x = np.random.default_rng(1).standard_normal((1, c, h, w)).astype(np.float32)
    bin_model = conv_layer_onnx(c, h, w, binary=True)
    float_model = conv_layer_onnx(c, h, w, binary=False)

    t0 = time.perf_counter()
    final, _ = run_pipeline(bin_model, "default", shapes={"x": x.shape})
    ops = [n.op_type for n in final.graph.node]
    if ops != ["BinaryConv"]:
        raise RuntimeError(f"the binary layer did not become one bdp.BinaryConv: {ops}")
    ex_bin = build(import_onnx(final, {"x": list(x.shape)}, spec), spec)
    row["bdp_compile_s"] = time.perf_counter() - t0
    p = BinaryConvParams(n=1, c=c, h=h, w=w, m=c, kh=3, kw=3, strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1),
                         group=1, act_threshold=0.0, pad_value=0.0)
    p = dataclasses.replace(p, word_bits=binary_word(p, spec))
    row["bdp_plan"] = dict(binary_conv_plan(p, spec), word=p.word)
    run_bin, out_bin = _vm_callable(ex_bin, x)

    ref_bin = ort_session(bin_model, threads).run(None, {"x": x})[0]
    got = out_bin()
    row["bdp_max_rel_diff_vs_onnxruntime"] = float(np.abs(got - ref_bin).max() / max(1e-12, np.abs(ref_bin).max()))

    ort_float = ort_session(float_model, threads)
    ex_sched = build(import_onnx(float_model, {"x": list(x.shape)}, spec), spec)
    run_sched, out_sched = _vm_callable(ex_sched, x)
    want_f = ort_float.run(None, {"x": x})[0]
    row["tvm_scheduled_max_rel_diff"] = float(np.abs(out_sched() - want_f).max() / np.abs(want_f).max())

    torch.set_num_threads(threads)
    xt, wt = torch.from_numpy(x), torch.from_numpy(_initializer(float_model, "W"))
    bt = torch.from_numpy(_initializer(float_model, "b"))

    def run_torch():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, bt, padding=1)

    fns = {"bdp": run_bin, "onnxruntime_fp32": lambda: ort_float.run(None, {"x": x}),
           "tvm_scheduled_fp32": run_sched, "torch_fp32": run_torch}
    try:
        ort_q = ort_int8_session(float_model, threads, "x", x.shape)
        row["ort_int8_max_rel_diff_vs_fp32"] = float(np.abs(ort_q.run(None, {"x": x})[0] - want_f).max()
                                                     / np.abs(want_f).max())
        fns["onnxruntime_int8"] = lambda: ort_q.run(None, {"x": x})
    except Exception as e:  # onnxruntime's quantizer failing must not hide the rest of the row
        row["ort_int8_error"] = f"{type(e).__name__}: {first_line(e, 300, empty='')}"
    res = time_interleaved(fns, rounds)
    # TVM's default pipeline leaves the conv unscheduled: slow, so timed apart with few runs
    target = tvm.target.Target(spec.tvm)
    with target:
        ex_def = tvm.compile(import_onnx(float_model, {"x": list(x.shape)}), target=target, relax_pipeline="default")
    run_def, _ = _vm_callable(ex_def, x)
    res.update(time_interleaved({"tvm_default_fp32": run_def}, slow_rounds, warmup=1, cycles=1))
    for k, v in res.items():
        row[k] = v
    b = res["bdp"]["median_ms"]
    row["binary_gmac_per_s"] = row["binary_macs"] / (b * 1e-3) / 1e9
    row["binary_gmac_per_s_min"] = row["binary_macs"] / (res["bdp"]["min_ms"] * 1e-3) / 1e9
    row["speedup"] = {k: res[k]["median_ms"] / b for k in res if k != "bdp"}
    row["speedup_min"] = {k: res[k]["min_ms"] / res["bdp"]["min_ms"] for k in res if k != "bdp"}
    _int8(row, res)
    return row


def _initializer(model, name):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name).copy()


# ---------------------------------------------------------------------------------------------
# models


def bench_model(arch, workdir, *, threads, rounds):
    """One row of the model table (see the module docstring)."""
    import onnx
    import torch

    import bdp
    from bdp.models import zoo
    from bdp.models.checkpoint import save_checkpoint

    from bdp.toolchain.bundle.format import load_bundle

    row = {"arch": arch, "input_shape": list(MODEL_INPUT)}
    torch.manual_seed(0)
    model = zoo.build(arch).eval()
    try:
        macs = zoo.count_macs(model, MODEL_INPUT)
        total = macs["binary"] + macs["float"]
        row["binary_macs"], row["float_macs"] = macs["binary"], macs["float"]
        row["binary_mac_share"] = macs["binary"] / total if total else 0.0
    except Exception as e:  # noqa: BLE001 - the row goes on without the MAC counts, and says why
        row["binary_macs_error"] = f"{type(e).__name__}: {first_line(e, 300, empty='')}"
    ckpt = os.path.join(workdir, f"{arch}.pt")
    save_checkpoint(model, ckpt)
    out = os.path.join(workdir, f"{arch}.bundle")
    t0 = time.perf_counter()
    bdp.compile(ckpt, target="x86", out=out, input_shape=MODEL_INPUT)
    row["compile_s"] = time.perf_counter() - t0
    from bdp.toolchain.bundle.format import read_manifest

    man = read_manifest(out, verify=False)
    row["compile_stages_s"] = man.compile_seconds
    st = man.stats
    row.update({k: st.get(k) for k in ("binary_convs", "fp_convs", "weights_bytes", "source_weights_bytes", "left_float")})
    if st.get("weights_bytes"):
        row["weights_ratio"] = st["source_weights_bytes"] / st["weights_bytes"]
    ref = os.path.join(out, "reference.onnx")
    row["reference_onnx_bytes"] = os.path.getsize(ref)
    row["library_bytes"] = os.path.getsize(os.path.join(out, man.get("library", "model.so")))
    row["onnx_initializer_bytes"] = sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in onnx.load(ref, load_external_data=False).graph.initializer)

    bundle = load_bundle(out)
    x = np.random.default_rng(0).standard_normal(MODEL_INPUT).astype(np.float32)
    x_dev = bundle.to_device(x)
    sess = ort_session(ref, threads)
    name = sess.get_inputs()[0].name
    got = bundle(x)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: x})))
    row["max_rel_diff_vs_onnxruntime"] = {
        k: float(np.abs(got[k] - want[k]).max() / max(1.0, float(np.abs(want[k]).max()))) for k in got if k in want}
    fns = {"bdp": lambda: bundle.run_raw(x_dev), "onnxruntime_fp32": lambda: sess.run(None, {name: x})}
    try:
        q = ort_int8_session(ref, threads, name, MODEL_INPUT)
        fns["onnxruntime_int8"] = lambda: q.run(None, {name: x})
    except Exception as e:  # onnxruntime's quantizer failing must not hide the rest of the row
        row["ort_int8_error"] = f"{type(e).__name__}: {first_line(e, 300, empty='')}"
    res = time_interleaved(fns, rounds)
    row.update(res)
    _int8(row, res)
    row["speedup_vs_onnxruntime"] = res["onnxruntime_fp32"]["median_ms"] / res["bdp"]["median_ms"]
    row["speedup_vs_onnxruntime_min"] = res["onnxruntime_fp32"]["min_ms"] / res["bdp"]["min_ms"]
    return row


# ---------------------------------------------------------------------------------------------
# report


def format_layers(rows) -> str:
    lines = ["binary 3x3 conv layer, float in -> float out (ms, median of interleaved runs; x = other time / bdp time)",
             f"  {'C x H x W':>15} {'bdp':>8} {'GMAC/s':>7} {'ORT':>8} {'x':>6} {'ORT INT8':>8} {'x':>6} {'TVM-sched':>9} "
             f"{'x':>6} {'PyTorch':>8} {'x':>6} {'TVM-dflt':>9} {'x':>7}  plan"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['shape']}: {r['error']}")
            continue
        sp = r["speedup"]
        plan = r.get("bdp_plan", {})
        lines.append(
            f"  {r['c_in']:>5}x{r['h']:>3}x{r['w']:<4} {r['bdp']['median_ms']:8.3f} {r['binary_gmac_per_s']:7.0f} "
            f"{r['onnxruntime_fp32']['median_ms']:8.3f} {sp['onnxruntime_fp32']:6.1f} "
            f"{fmt(r.get('ort_int8_ms'), '.3f'):>8} {fmt(r.get('x_ort_int8'), '.1f'):>6} "
            f"{r['tvm_scheduled_fp32']['median_ms']:9.3f} {sp['tvm_scheduled_fp32']:6.1f} "
            f"{r['torch_fp32']['median_ms']:8.3f} {sp['torch_fp32']:6.1f} "
            f"{r['tvm_default_fp32']['median_ms']:9.1f} {sp['tvm_default_fp32']:7.0f}  "
            f"{plan.get('orient', '')}{'/w' + str(plan.get('word')) if plan else ''}")
    return "\n".join(lines)


def format_models(rows) -> str:
    lines = ["zoo models end to end at 1x3x256x320 (ms, median of interleaved runs)",
             f"  {'arch':<18} {'bdp':>8} {'ORT FP32':>9} {'x':>6} {'x(min)':>6} {'ORT INT8':>9} {'x':>6} {'compile s':>9} "
             f"{'weights x':>9} {'binary MAC':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['arch']:<18} error: {r['error']}")
            continue
        lines.append(
            f"  {r['arch']:<18} {r['bdp']['median_ms']:8.2f} {r['onnxruntime_fp32']['median_ms']:9.2f} "
            f"{r['speedup_vs_onnxruntime']:6.2f} {r['speedup_vs_onnxruntime_min']:6.2f} "
            f"{fmt(r.get('ort_int8_ms')):>9} {fmt(r.get('x_ort_int8')):>6} {r['compile_s']:9.1f} "
            f"{fmt(r.get('weights_ratio'), '.1f'):>9} {fmt(100 * r['binary_mac_share'] if 'binary_mac_share' in r else None, '.1f'):>9}%")
    return "\n".join(lines)


def summarize(res) -> dict:
    out = {}
    tg = res.get("targets") or GOALS
    layers = [r for r in res.get("layers", []) if "error" not in r]
    if layers:
        sp = [r["speedup"]["onnxruntime_fp32"] for r in layers]
        g = geomean(sp)
        out["layers"] = {"geomean_speedup_vs_onnxruntime": g, "min_speedup_vs_onnxruntime": min(sp),
                         "geomean_speedup_vs_torch": geomean([r["speedup"]["torch_fp32"] for r in layers]),
                         "geomean_speedup_vs_tvm_scheduled": geomean([r["speedup"]["tvm_scheduled_fp32"] for r in layers]),
                         "geomean_speedup_vs_onnxruntime_int8": geomean([r.get("x_ort_int8") for r in layers]),
                         "geomean_speedup_vs_onnxruntime_min_times": geomean(
                             [r["speedup_min"]["onnxruntime_fp32"] for r in layers]),
                         f"geomean_at_least_{tg['layer_geomean']:g}x": g >= tg["layer_geomean"],
                         f"each_at_least_{tg['layer_each']:g}x": min(sp) >= tg["layer_each"],
                         "all_four_shapes": len(layers) == len(LAYER_SHAPES)}
    models = [r for r in res.get("models", []) if "error" not in r]
    if models:
        out["models"] = {
            "speedup_vs_onnxruntime": {r["arch"]: r["speedup_vs_onnxruntime"] for r in models},
            "speedup_vs_onnxruntime_int8": {r["arch"]: r.get("x_ort_int8") for r in models},
            f"at_least_{tg['model_each']:g}x": [r["arch"] for r in models
                                                if r["speedup_vs_onnxruntime"] >= tg["model_each"]],
            f"below_{tg['model_each']:g}x": [r["arch"] for r in models
                                             if r["speedup_vs_onnxruntime"] < tg["model_each"]],
            f"weights_at_least_{tg['weights_ratio']:g}x_smaller": [
                r["arch"] for r in models if (r.get("weights_ratio") or 0) >= tg["weights_ratio"]],
            f"compile_under_{tg['compile_seconds']:g}s": [
                r["arch"] for r in models if r["compile_s"] < tg["compile_seconds"]],
            "max_compile_s": max(r["compile_s"] for r in models),
        }
        if "model_int8_each" in tg:
            out["models"][f"int8_below_{tg['model_int8_each']:g}x"] = [
                r["arch"] for r in models if (r.get("x_ort_int8") or 0) < tg["model_int8_each"]]
    return out


def write_chart(path, res):
    """The chart of RES at PATH (.png or .svg): latencies and speed-ups (:mod:`.chart`)."""
    from .chart import speedup_chart

    return speedup_chart(path, res)


def run(json_path="bench.json", chart="bench.png", quick=False, only="all", archs=None, workdir=None, target="x86",
        runs=1, wild_dir=None):
    """Run the suite, print the tables, write JSON_PATH and the PNG CHART; returns the results dict.
    TARGET "rpi4": the same tables ESTIMATED for a Raspberry Pi 4 (:mod:`bdp.toolchain.bench.rpi4`,
    RUNS model runs per estimator process; no chart)."""
    if target == "rpi4":
        from . import rpi4 as bench_rpi4

        return bench_rpi4.run(json_path=json_path, quick=quick, only=only, archs=archs, workdir=workdir, runs=runs)
    threads = setup_threads()  # sets TVM's thread-pool defaults before the pool starts
    from bdp.models import zoo
    from bdp.targets.spec import get_target

    spec = get_target("x86")
    res = {"bdp_bench": 1, "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": bool(quick),
           "threads": threads, "host": host(), "versions": versions(),
           "target": {"name": spec.name, "tvm": spec.tvm, "popcount": spec.popcount_isa}, "isa": isa_name(spec),
           "method": ("median (and min) of interleaved runs; every runtime uses the same thread count; "
                      "bdp layer = binarize + pack + popcount conv + float epilogue, float in and out; "
                      "onnxruntime INT8 = quantize_static, QDQ, S8S8, per-channel weights, min/max calibration "
                      "on 4 standard-normal inputs, reduce_range (7-bit weights) on hosts without VNNI"),
           "int8_reduce_range": int8_reduce_range(), "targets": targets_for(spec)}
    print(f"bdp bench: target {spec.name} ({spec.tvm.get('mcpu')}), bdp's popcount ISA {res['isa']}, "
          f"{threads} threads", flush=True)
    if only in ("wild", "training-code"):  # networks from the wild: toolchain/bench/wild.py, its own table and JSON
        from .wild import run_wild

        return run_wild(res, json_path, threads=threads, quick=quick, wild_dir=wild_dir, workdir=workdir,
                        training_code_only=only == "training-code")
    rounds = 5 if quick else 30
    if only == "float-layers":  # bdp's float layers vs onnxruntime: toolchain/bench_float.py
        from .float_layers import FLOAT_TARGET, METHOD, run_float_layers

        fspec = get_target(FLOAT_TARGET)
        res.update(target={"name": fspec.name, "tvm": fspec.tvm}, method=METHOD)
        res["float_layers"], res["summary"] = run_float_layers(threads=threads, quick=quick, spec_name=FLOAT_TARGET)
        print(res["summary"])
        write_json(json_path, res)
        print(f"wrote {json_path}")
        return res
    if only in ("layers", "all"):
        shapes = LAYER_SHAPES[:2] if quick else LAYER_SHAPES
        res["layers"] = []
        for c, h, w in shapes:
            try:
                row = bench_layer(c, h, w, threads=threads, rounds=rounds, slow_rounds=1 if quick else 3, spec=spec)
            except Exception as e:  # keep going: one broken shape must not hide the others
                row = {"shape": [c, h, w], "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
            res["layers"].append(row)
            print(format_layers([row]).splitlines()[-1], flush=True)
        print(format_layers(res["layers"]))
    if only in ("models", "all"):
        archs = list(archs) if archs else (["bireal-tiny"] if quick else list(zoo.ARCHITECTURES))
        res["models"] = []
        with tempfile.TemporaryDirectory(prefix="bdp-bench-", dir=workdir) as tmp:
            for arch in archs:
                try:
                    row = bench_model(arch, tmp, threads=threads, rounds=5 if quick else 20)
                except Exception as e:
                    row = {"arch": arch, "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
                res["models"].append(row)
                print(format_models([row]).splitlines()[-1], flush=True)
        print(format_models(res["models"]))
    res["host"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["summary"] = summarize(res)
    s = res["summary"]
    if "layers" in s:
        print(f"layers: geometric mean {s['layers']['geomean_speedup_vs_onnxruntime']:.2f}x onnxruntime FP32 "
              f"(min {s['layers']['min_speedup_vs_onnxruntime']:.2f}x), "
              f"{fmt(s['layers']['geomean_speedup_vs_onnxruntime_int8'])}x onnxruntime INT8, "
              f"{s['layers']['geomean_speedup_vs_torch']:.2f}x PyTorch, "
              f"{s['layers']['geomean_speedup_vs_tvm_scheduled']:.2f}x TVM scheduled FP32")
    if "models" in s:
        tg = res["targets"]
        below = s["models"][f"below_{tg['model_each']:g}x"]
        int8 = ""
        if "model_int8_each" in tg:
            low = s["models"]["int8_below_%gx" % tg["model_int8_each"]]
            int8 = f"; below {tg['model_int8_each']:g}x onnxruntime INT8: {', '.join(low) or 'none'}"
        print(f"models: {len(s['models']['speedup_vs_onnxruntime']) - len(below)} at >= {tg['model_each']:g}x "
              f"onnxruntime FP32; below: {', '.join(below) or 'none'}{int8}; "
              f"slowest compile {s['models']['max_compile_s']:.1f} s")
    write_json(json_path, res)
    try:
        write_chart(chart, res)
    except Exception as e:
        res["chart_error"] = f"{type(e).__name__}: {e}"
        write_json(json_path, res)
    print(f"wrote {json_path} and {chart}")
    return res
