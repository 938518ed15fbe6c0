"""Timing on this host, shared by ``bdp profile``, the remote and estimated profiles and ``bdp
bench``: warm-up and quiet-process waits, run statistics, the onnxruntime FP32 session the
baselines use, the host record every result carries, and writing a result's JSON."""

from __future__ import annotations

import os
import time

import numpy as np


def summarize(times_ms) -> dict:
    a = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(a.size),
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
        "mean_ms": float(a.mean()),
    }


def warm_up(fn, warmup, warm_s=0.1):
    """Wait for the process to go idle (:func:`quiesce`), then call FN at least WARMUP times and
    for at least WARM_S seconds: a worker thread woken from sleep may start on the caller's core,
    and on a 2-core VM a 0.14 ms layer then ran at half speed (both threads on one core) until
    the scheduler moved one, some milliseconds later."""
    quiesce()
    t_end, n = time.perf_counter() + warm_s, 0
    while n < warmup or (time.perf_counter() < t_end and n < 1000):
        fn()
        n += 1


def time_callable(fn, runs, warmup):
    """RUNS timings (ms) of FN after :func:`warm_up`."""
    warm_up(fn, warmup)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def ort_session(model_or_path, threads):
    """An onnxruntime CPU session for the FP32 baseline: THREADS intra-op threads, onnxruntime's
    defaults otherwise (graph optimizations on, workers spinning between runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else model_or_path
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def quiesce(max_wait=2.0, window=0.02, busy=0.05):
    """Sleep until this process's other threads stop using the CPU (at most MAX_WAIT seconds).

    Runtimes keep their worker threads spinning for a while after a call: TVM's thread pool for
    about 300000 ``sched_yield`` calls (~0.15 s here), onnxruntime's and OpenMP's for tens of
    milliseconds. A runtime timed in that window shares its cores with another one's spinning
    threads. Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while True:
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(window)
        used = (time.process_time() - c0) / max(time.perf_counter() - w0, 1e-9)
        if used < busy or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


def host_info():
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine()}

