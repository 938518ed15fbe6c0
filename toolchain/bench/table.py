"""What every table of ``bdp bench`` shares: the layer shapes and model input, interleaved
timing, rows' statistics, the host and versions a table records, the 3x3 conv layer model, and
writing a table's JSON. The suite (:mod:`.suite`) and its rpi4, float-layer and wild tables
(:mod:`.rpi4`, :mod:`.float_layers`, :mod:`.wild`) all build on it; it imports none of them."""

from __future__ import annotations

import math
import os
import platform
import time

import numpy as np

from bdp.toolchain.runtime.timing import host_info, warm_up


LAYER_SHAPES = [(64, 64, 80), (128, 32, 40), (256, 16, 20), (512, 8, 10)]  # C, H, W


MODEL_INPUT = (1, 3, 256, 320)


def setup_threads() -> int:
    from bdp.targets.spec import configure_runtime_threads

    return configure_runtime_threads()


def _stats(ts_ms) -> dict:
    a = np.asarray(ts_ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "runs": int(a.size)}


def time_interleaved(fns: dict, rounds: int, warmup: int = 2, cycles: int = 3, warm_s: float = 0.1) -> dict:
    """{name: stats}: CYCLES passes over the functions; in each pass every function waits for the
    process to go idle (:func:`bdp.toolchain.runtime.timing.quiesce`), gets untimed calls (at least
    WARMUP, and for at least WARM_S seconds), then ROUNDS / CYCLES timed calls in a row.

    Runs of one runtime stay together within a pass, after the others' threads have stopped: a
    runtime's idle worker threads spin for a while after each call (TVM's thread pool,
    onnxruntime's, OpenMP in PyTorch), and a runtime timed while another one's threads spin gets
    fewer cores. The warm-up is timed, not counted (see :func:`bdp.toolchain.runtime.timing.warm_up`).
    Repeating the passes spreads any change of the machine's load over all runtimes.
    """
    times = {k: [] for k in fns}
    per = max(1, -(-rounds // cycles))
    for _ in range(cycles if rounds > 1 else 1):
        for k, f in fns.items():
            warm_up(f, warmup, warm_s)
            for _ in range(per):
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: _stats(v) for k, v in times.items()}


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def host() -> dict:
    h = host_info()
    try:
        h["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return h


def versions() -> dict:
    import onnxruntime
    import torch
    import tvm

    import bdp

    return {"bdp": bdp.__version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def conv_layer_onnx(c, h, w, *, binary, seed=0):
    """ONNX model of a 3x3 conv C->C on [1, C, H, W] with pad 1: float, or Sign -> Conv(alpha*sign W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    wf = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    b = (0.1 * rng.standard_normal(c)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    nodes = []
    conv_in = "x"
    if binary:
        alpha = np.abs(wf).mean(axis=(1, 2, 3), keepdims=True).astype(np.float32)
        inits.append(numpy_helper.from_array((alpha * np.where(wf >= 0, 1.0, -1.0)).astype(np.float32), "W"))
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "t"),
                  numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                  numpy_helper.from_array(np.array(-1.0, np.float32), "mone")]
        nodes += [helper.make_node("GreaterOrEqual", ["x", "t"], ["ge"]),
                  helper.make_node("Where", ["ge", "one", "mone"], ["xs"])]
        conv_in = "xs"
    else:
        inits.append(numpy_helper.from_array(wf, "W"))
    nodes.append(helper.make_node("Conv", [conv_in, "W", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "bdp_bench_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, c, h, w))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, c, h, w))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_json(path, res):
    from bdp.toolchain.runtime.profile import write_json as write

    write(path, res)
