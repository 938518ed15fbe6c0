"""``bdp profile``: latency of a bundle (median, p90, p99), per-op breakdown, FP32 baseline.

Local profiling times the bundle's Relax VM on this host: warm-up runs, then N timed runs of
the whole model; per-op times (each ``call_tir`` kernel, by its symbol) come from timing every
kernel call of one real run on its own (:func:`per_op_breakdown`). The FP32 baseline is the
bundle's ``reference.onnx`` run by onnxruntime on the same host, timed the same way, with the
same number of threads.
"""

from __future__ import annotations

import json
import os

import numpy as np

from bdp.errors import InputError
from bdp.targets.spec import runtime_threads

from .timing import host_info, ort_session, summarize, time_callable


def _out_shape(args):
    for a in reversed(args):
        shape = getattr(a, "shape", None)
        if shape is not None:
            try:
                return [int(d) for d in shape]
            except (TypeError, ValueError):
                return None
    return None


def _kernel_module(lib, symbol):
    """The module in LIB's import tree that holds the compiled kernel SYMBOL, or None."""
    todo = [lib]
    while todo:
        m = todo.pop()
        try:
            if m.implements_function(symbol, False):
                return m
        except (RuntimeError, ValueError, TypeError, AttributeError):  # a module kind that cannot say: not it
            pass
        todo.extend(getattr(m, "imports", ()) or ())
    return None


def per_op_breakdown(bundle, x_dev, repeat=15) -> tuple[list, str]:
    """([{op, calls, total_ms, share, shape}], note): each kernel call of ``main`` timed on its
    own with TVM's ``time_evaluator`` (median of REPEAT, on the arguments that call got in a
    real run; SHAPE is the kernel's output, its last tensor argument).

    The calls and their arguments come from one pass through the VM with its instrumentation
    hook. Timing them inside that hook would add the hook's own cost (a Python call that
    converts every argument, tens of microseconds) to every kernel: several times the run time
    of a small binary conv."""
    import tvm

    calls = []

    def instrument(func, func_symbol, before_run, ret_value, *args):
        if before_run and not func_symbol.startswith("vm.builtin."):
            calls.append((func_symbol, list(args)))
        return 0

    vm = bundle._vm
    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    try:
        bundle.run_raw(x_dev)
    finally:
        vm.set_instrument(None)
    timed, acc, shapes, untimed = {}, {}, {}, set()
    for sym, args in calls:
        key = (sym, tuple(tuple(getattr(a, "shape", ())) for a in args))
        if key not in timed:
            mod = _kernel_module(bundle.lib, sym)
            if mod is None:
                untimed.add(sym)
                continue
            t = mod.time_evaluator(sym, bundle._dev, number=1, repeat=3)(*args)
            est = float(np.median(t.results))  # pick NUMBER so one repeat takes about 2 ms
            number = max(1, min(200, int(2e-3 / max(est, 1e-7))))
            t = mod.time_evaluator(sym, bundle._dev, number=number, repeat=repeat)(*args)
            timed[key] = float(np.median(t.results)) * 1e3
        d = acc.setdefault(sym, [0, 0.0])
        d[0] += 1
        d[1] += timed[key]
        shapes.setdefault(sym, _out_shape(args))
    total = sum(v[1] for v in acc.values()) or 1.0
    rows = [{"op": k, "calls": v[0], "total_ms": v[1], "share": v[1] / total, "shape": shapes.get(k)}
            for k, v in acc.items()]
    rows.sort(key=lambda r: -r["total_ms"])
    note = (f"each kernel call timed on its own (warm caches, median of {repeat}); "
            f"kernels sum to {total:.3f} ms per run")
    if untimed:
        note += f"; not found in the library, not timed: {', '.join(sorted(untimed))}"
    return rows, note


def fp32_baseline(bundle_dir, manifest, x, runs, warmup):
    ref = os.path.join(bundle_dir, "reference.onnx")
    if not os.path.isfile(ref):
        return None, "bundle compiled with --no-reference: no FP32 model to time"
    sess = ort_session(ref, runtime_threads())
    name = sess.get_inputs()[0].name
    times = time_callable(lambda: sess.run(None, {name: x}), runs, warmup)
    return summarize(times), None


def profile_local(bundle_dir, runs=50, warmup=5, trust=None):
    from bdp.toolchain.bundle.format import load_bundle

    bundle = load_bundle(bundle_dir, trust=trust)
    manifest = bundle.manifest
    shape = tuple(manifest.input.shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x_dev = bundle.to_device(x)
    times = time_callable(lambda: bundle.run_raw(x_dev), runs, warmup)
    result = {
        "device": "local",
        "host": host_info(),
        "bundle": os.path.abspath(bundle_dir),
        "target": manifest.target.name,
        "input_shape": list(shape),
        "threads": runtime_threads(),
        "latency": summarize(times),
    }
    result["per_op"], result["per_op_note"] = per_op_breakdown(bundle, x_dev)
    base, why = fp32_baseline(bundle_dir, manifest, x, runs, warmup)
    result["fp32_onnxruntime"] = base
    if base:
        result["speedup_vs_fp32"] = base["median_ms"] / result["latency"]["median_ms"]
    else:
        result["fp32_note"] = why
    return result


def run_profile(bundle_dir, device="local", rpc=None, tracker=None, key=None, runs=None, warmup=5, trust=None):
    """``bdp profile``: timed here (``local``), on a board over TVM RPC, or estimated for a
    Cortex-A72 (``cortex-a72-model``, :mod:`bdp.toolchain.runtime.estimate`). RUNS None: 50 timed runs
    (1 model run for the estimate, whose instruction counts are exact)."""
    from .estimate import DEVICE

    if device == DEVICE:
        if rpc or tracker:
            raise InputError(f"--device {DEVICE} runs the bundle here under qemu; drop --rpc / --tracker")
        from .estimate import estimate

        return estimate(bundle_dir, runs=1 if runs is None else runs)
    runs = 50 if runs is None else runs
    check_runs(runs)
    if rpc or tracker or device != "local":
        from . import remote

        return remote.profile_remote(bundle_dir, device=device, rpc=rpc, tracker=tracker, key=key, runs=runs,
                                     warmup=warmup)
    return profile_local(bundle_dir, runs=runs, warmup=warmup, trust=trust)


def format_text(res) -> str:
    if res.get("estimate"):
        from .estimate import format_text as estimate_text

        return estimate_text(res)
    lat = res["latency"]
    lines = [f"bdp profile: {res['bundle']} on {res['device']} ({res.get('host', {}).get('cpu', '')}), "
             f"target {res['target']}, input {res['input_shape']}, {lat['runs']} runs",
             f"  bdp      median {lat['median_ms']:.3f} ms   p90 {lat['p90_ms']:.3f} ms   p99 {lat['p99_ms']:.3f} ms"]
    base = res.get("fp32_onnxruntime")
    if base:
        lines.append(f"  FP32 ORT median {base['median_ms']:.3f} ms   p90 {base['p90_ms']:.3f} ms   p99 {base['p99_ms']:.3f} ms"
                     f"   (bdp is {res['speedup_vs_fp32']:.2f}x)")
    elif res.get("fp32_note"):
        lines.append(f"  FP32 baseline: {res['fp32_note']}")
    if res.get("per_op_note"):
        lines.append(f"  per op: {res['per_op_note']}")
    if res.get("per_op"):
        lines.append("  per op (ms/run, share, calls, output shape, kernel):")
        for r in res["per_op"][:15]:
            shape = "x".join(str(d) for d in r["shape"]) if r.get("shape") else "?"
            op = r["op"] if len(r["op"]) <= 80 else r["op"][:77] + "..."
            lines.append(f"    {r['total_ms']:9.3f}  {100 * r['share']:5.1f}%  x{r['calls']:<3d} {shape:<16} {op}")
    return "\n".join(lines)


def chart_png(path, res):
    """The profile chart at PATH (.png or .svg): latency beside the baselines, per-op stacked bar
    (:func:`bdp.toolchain.runtime.charts.profile_chart`)."""
    from .charts import profile_chart

    return profile_chart(path, res)


def check_runs(runs):
    if runs < 1:
        raise InputError("--runs must be at least 1")


def write_json(path, res):
    from bdp.files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
