"""``bdp bench --target rpi4``: the layer and zoo tables for a Raspberry Pi 4, ESTIMATED with the
Cortex-A72 model of :mod:`bdp.toolchain.runtime.estimate` (instructions counted exactly under
qemu-aarch64, cycles from llvm-mca, one thread at 1.5 GHz; it ignores caches, memory bandwidth,
branch mispredictions and threads), not measured on a Pi.

**layers** - the binary 3x3 conv layers of ``bdp bench`` (:data:`bdp.toolchain.bench.table.LAYER_SHAPES`,
the same ONNX graphs), compiled for rpi4 the normal way (``bdp compile --target rpi4``), beside the
float conv of the same shape compiled for rpi4 with bdp's float schedules (TVM FP32).

**models** - every zoo architecture at 1x3x256x320 (seed 0, as ``bdp bench``) compiled for rpi4,
beside its float network (the bundle's ``reference.onnx``, compiled for rpi4 with the
``canonicalize`` pipeline: no binary ops, bdp's float schedules).

Columns: estimated ms per run (model.so kernels + the per-run runtime cost: TVM VM, workspace
allocations), binary MACs per estimated cycle, and x float (TVM FP32 estimate / bdp estimate).
Each row also keeps the workspace allocation calls per run and the bdp outputs' difference from
onnxruntime (run on this host). The JSON is rewritten after every row, so a long run keeps what
it has done.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from bdp.errors import first_line

from bdp.toolchain.runtime.estimate import GHZ, IGNORES, IGNORES_SHORT

QUICK_ARCHS = ["bireal-tiny"]


def _summary(e: dict) -> dict:
    """The parts of an estimate a bench row keeps."""
    rt = e.get("runtime") or {}
    return {"est_ms": e["estimate_ms"], "kernels_ms": e["model"]["ms"], "runtime_ms": rt.get("ms"),
            "cycles": e["model"]["cycles"] + (rt.get("cycles") or 0.0), "kernel_insns": e["model"]["insns"],
            "runtime_insns": rt.get("insns"), "mca_coverage": e["model"]["mca_coverage"],
            "runtime_calls": e.get("runtime_calls"),
            "top_kernels": [{k: r[k] for k in ("op", "total_ms", "share", "insns")} for r in e["per_op"][:6]]}


def _rel_diff(got: dict, want: dict) -> dict:
    return {k: float(np.abs(got[k] - want[k]).max() / max(1.0, float(np.abs(want[k]).max()))) for k in want if k in got}


def _outputs(bundle: str, out_dir: str) -> dict:
    from bdp.toolchain.bundle.format import read_manifest

    names = read_manifest(bundle, verify=False).output_names
    return {n: np.load(os.path.join(out_dir, f"{n}.npy")) for n in names}


def _compile(src, out, **kw) -> tuple[str, float]:
    from bdp.toolchain.compile import compile_model

    t0 = time.perf_counter()
    compile_model(src, target="rpi4", out=out, **kw)
    return out, time.perf_counter() - t0


def _finish(row: dict, binary_macs: int) -> dict:
    b, f = row["bdp"], row.get("tvm_scheduled_fp32")
    row["binary_macs_per_cycle"] = binary_macs / b["cycles"] if b["cycles"] else None
    row["x_float"] = f["est_ms"] / b["est_ms"] if f else None
    return row


def bench_layer(c, h, w, workdir, *, runs=1, float_baseline=True):
    """One row of the layer table: the binary layer and its float twin, both estimated for rpi4."""
    import onnx

    from .table import conv_layer_onnx
    from bdp.toolchain.runtime.estimate import estimate
    from bdp.toolchain.runtime.timing import ort_session

    d = os.path.join(workdir, f"layer{c}x{h}x{w}")
    os.makedirs(d, exist_ok=True)
    row = {"shape": [c, h, w], "c_in": c, "c_out": c, "h": h, "w": w, "kernel": 3, "binary_macs": c * c * 9 * h * w}
    x = np.random.default_rng(1).standard_normal((1, c, h, w)).astype(np.float32)
    bin_model, float_model = conv_layer_onnx(c, h, w, binary=True), conv_layer_onnx(c, h, w, binary=False)
    onnx.save(bin_model, os.path.join(d, "bin.onnx"))
    b, row["bdp_compile_s"] = _compile(os.path.join(d, "bin.onnx"), os.path.join(d, "bin"), reference=False)
    e = estimate(b, x, runs=runs, out_dir=os.path.join(d, "bin-out"))
    row["bdp"] = _summary(e)
    want = ort_session(bin_model, 1).run(None, {"x": x})[0]
    row["bdp_max_rel_diff_vs_onnxruntime"] = _rel_diff(_outputs(b, os.path.join(d, "bin-out")), {"y": want})["y"]
    if float_baseline:
        onnx.save(float_model, os.path.join(d, "float.onnx"))
        fb, _ = _compile(os.path.join(d, "float.onnx"), os.path.join(d, "float"), reference=False)
        ef = estimate(fb, x, runs=runs, out_dir=os.path.join(d, "float-out"))
        row["tvm_scheduled_fp32"] = _summary(ef)
        want_f = ort_session(float_model, 1).run(None, {"x": x})[0]
        row["tvm_scheduled_max_rel_diff"] = _rel_diff(_outputs(fb, os.path.join(d, "float-out")), {"y": want_f})["y"]
    return _finish(row, row["binary_macs"])


def bench_model(arch, workdir, *, runs=1, float_baseline=True):
    """One row of the zoo table: ARCH at 1x3x256x320 for rpi4, and its float network, estimated."""
    import torch

    from bdp.models import zoo
    from bdp.models.checkpoint import save_checkpoint

    from .table import MODEL_INPUT
    from bdp.toolchain.bundle.format import read_manifest
    from bdp.toolchain.runtime.estimate import estimate
    from bdp.toolchain.runtime.timing import ort_session

    d = os.path.join(workdir, arch)
    os.makedirs(d, exist_ok=True)
    row = {"arch": arch, "input_shape": list(MODEL_INPUT)}
    torch.manual_seed(0)
    model = zoo.build(arch).eval()
    macs = zoo.count_macs(model, MODEL_INPUT)
    row["binary_macs"], row["float_macs"] = macs["binary"], macs["float"]
    row["binary_mac_share"] = macs["binary"] / max(1, macs["binary"] + macs["float"])
    ckpt = save_checkpoint(model, os.path.join(d, f"{arch}.pt"))
    b, row["compile_s"] = _compile(ckpt, os.path.join(d, "bundle"), input_shape=MODEL_INPUT)
    st = read_manifest(b)["stats"]
    row.update({k: st.get(k) for k in ("binary_convs", "fp_convs", "weights_bytes", "left_float")})
    x = np.random.default_rng(0).standard_normal(MODEL_INPUT).astype(np.float32)
    e = estimate(b, x, runs=runs, out_dir=os.path.join(d, "out"))
    row["bdp"] = _summary(e)
    row["workspace_calls_per_run"] = e["runtime_calls"]
    ref = os.path.join(b, "reference.onnx")
    sess = ort_session(ref, 1)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    row["max_rel_diff_vs_onnxruntime"] = _rel_diff(_outputs(b, os.path.join(d, "out")), want)
    if float_baseline:
        fb, row["float_compile_s"] = _compile(ref, os.path.join(d, "float"), input_shape=MODEL_INPUT,
                                              pipeline="canonicalize", reference=False)
        fst = read_manifest(fb)["stats"]
        if fst.get("binary_convs"):
            raise RuntimeError(f"the float twin of {arch} has {fst['binary_convs']} binary convs")
        ef = estimate(fb, x, runs=runs, out_dir=os.path.join(d, "float-out"))
        row["tvm_scheduled_fp32"] = _summary(ef)
    shutil.rmtree(d, ignore_errors=True)
    return _finish(row, row["binary_macs"])


def _f(v, spec):
    return "-" if v is None else format(v, spec)


HEADER = f"ESTIMATED for a Raspberry Pi 4 (Cortex-A72 model, 1 thread, {GHZ} GHz; ignores {IGNORES_SHORT})"


def format_layers(rows) -> str:
    lines = ["binary 3x3 conv layer, float in -> float out, " + HEADER,
             f"  {'C x H x W':>15} {'bdp est ms':>10} {'bin MAC/cyc':>11} {'TVM FP32 est ms':>15} {'x float':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['shape']}: {r['error']}")
            continue
        f = r.get("tvm_scheduled_fp32") or {}
        lines.append(f"  {r['c_in']:>5}x{r['h']:>3}x{r['w']:<4} {r['bdp']['est_ms']:10.3f} "
                     f"{_f(r['binary_macs_per_cycle'], '.1f'):>11} {_f(f.get('est_ms'), '.3f'):>15} "
                     f"{_f(r['x_float'], '.1f'):>7}")
    return "\n".join(lines)


def format_models(rows) -> str:
    lines = ["zoo models end to end at 1x3x256x320, " + HEADER,
             f"  {'arch':<18} {'bdp est ms':>10} {'bin MAC/cyc':>11} {'TVM FP32 est ms':>15} {'x float':>7} "
             f"{'allocs/run':>10} {'binary MAC':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['arch']:<18} error: {r['error']}")
            continue
        f = r.get("tvm_scheduled_fp32") or {}
        calls = (r.get("workspace_calls_per_run") or {}).get("TVMBackendAllocWorkspace")
        lines.append(f"  {r['arch']:<18} {r['bdp']['est_ms']:10.2f} {_f(r['binary_macs_per_cycle'], '.2f'):>11} "
                     f"{_f(f.get('est_ms'), '.2f'):>15} {_f(r['x_float'], '.2f'):>7} {_f(calls, ',.0f'):>10} "
                     f"{100 * r['binary_mac_share']:9.1f}%")
    return "\n".join(lines)


def _commit():
    """The git commit of the bdp source that ran (an editable install), else None."""
    import subprocess

    try:
        p = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def run(json_path="bench-rpi4.json", quick=False, only="all", archs=None, workdir=None, runs=1, float_baseline=True,
        shapes=None):
    """Run the rpi4 tables, print them, write JSON_PATH (after every row); returns the results dict."""
    from bdp.models import zoo
    from bdp.targets.spec import get_target

    from .table import LAYER_SHAPES, host, versions, write_json
    from bdp.toolchain.runtime.estimate import tools

    tools()  # InputError with the apt command before any compiling
    spec = get_target("rpi4")
    res = {"bdp_bench": 1, "estimate": True, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "quick": bool(quick), "command": "bdp " + " ".join(sys.argv[1:]) if sys.argv else None,
           "threads": 1, "host": host(), "versions": versions(),
           "target": {"name": spec.name, "tvm": spec.tvm, "popcount": spec.popcount_isa}, "isa": spec.isa_label,
           "device": "cortex-a72-model", "ghz": GHZ, "ignores": IGNORES,
           "method": ("ESTIMATES: bin/bdp-run under qemu-aarch64 (TVM_NUM_THREADS=1), executed AArch64 "
                      "instructions counted per translation block, cycles per block from llvm-mca "
                      "-mcpu=cortex-a72, ms = cycles / 1.5 GHz; est ms = model.so kernels + per-run runtime "
                      "(TVM VM, workspace allocations, from RUNS vs RUNS+1 model runs)"),
           "runs_per_process": runs, "source_commit": _commit()}
    with tempfile.TemporaryDirectory(prefix="bdp-bench-rpi4-", dir=workdir) as tmp:
        if only in ("layers", "all"):
            res["layers"] = []
            for c, h, w in shapes or (LAYER_SHAPES[:2] if quick else LAYER_SHAPES):
                try:
                    row = bench_layer(c, h, w, tmp, runs=runs, float_baseline=float_baseline)
                except Exception as e:  # one broken shape must not hide the others
                    row = {"shape": [c, h, w], "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
                res["layers"].append(row)
                print(format_layers([row]).splitlines()[-1], flush=True)
                write_json(json_path, res)
            print(format_layers(res["layers"]))
        if only in ("models", "all"):
            archs = list(archs) if archs else (QUICK_ARCHS if quick else list(zoo.ARCHITECTURES))
            res["models"] = []
            for arch in archs:
                try:
                    row = bench_model(arch, tmp, runs=runs, float_baseline=float_baseline)
                except Exception as e:
                    row = {"arch": arch, "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
                res["models"].append(row)
                print(format_models([row]).splitlines()[-1], flush=True)
                write_json(json_path, res)
            print(format_models(res["models"]))
    write_json(json_path, res)
    print(f"wrote {json_path}")
    return res
