"""``bdp bench --only float-layers``: bdp's float (non-binary) layers against onnxruntime FP32.

Every real binarized network keeps float layers: stems (7x7/2, 3x3/2), downsampling shortcuts
(1x1/2), depthwise convs, classifier heads (Gemm), pooling. :data:`FLOAT_LAYERS` is a set of
them at the sizes ImageNet-style BNNs use (QuickNet, Bi-Real, XNOR-Net, AlexNet-like: 56/28/14/7
feature maps, 8x8 beside 7x7 for comparison, 27x27 and 13x13 of AlexNet, batch 1).

Each layer is a one-node ONNX graph (conv/Gemm with its bias) compiled by bdp for the target
(``x86-avx2`` by default, the ISA every x86 host of the project has) and run by the Relax VM,
next to an onnxruntime FP32 session of the same graph with the same thread count, timed
interleaved (:func:`bdp.toolchain.bench.table.time_interleaved`). Exactness: both outputs against a
float64 numpy reference of the same layer, as the largest absolute error over the largest
absolute reference value ("rel err": round-off relative to the output's scale).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bdp.errors import first_line

FLOAT_TARGET = "x86-avx2"  # the ISA every x86 host of the project has
METHOD = ("each layer a one-node ONNX graph; bdp (Relax VM) and onnxruntime FP32 with the same threads, timed "
          "interleaved (3 passes; ratio = median over passes of bdp median / onnxruntime median, r(min) = ratio of "
          "minimums) and single-threaded in thread CPU time (r(1t), median of paired calls); errors against float64 "
          "numpy: max |y - y64| / max |y64| and RMS")


@dataclass(frozen=True)
class FloatLayer:
    """One float layer: ONNX op ``op`` on input ``shape`` (NCHW, or [1, K] for Gemm/MatMul)."""

    name: str
    op: str  # Conv, Gemm, MatMul, GlobalAveragePool, MaxPool, AveragePool
    shape: tuple
    out_channels: int = 0  # Conv: M; Gemm/MatMul: N
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    group: int = 1
    attrs: dict = field(default_factory=dict)

    @property
    def macs(self) -> int:
        n, c = self.shape[0], self.shape[1]
        if self.op in ("Gemm", "MatMul"):
            return n * c * self.out_channels
        h, w = self.out_hw
        if self.op == "Conv":
            return n * self.out_channels * h * w * (c // self.group) * self.kernel * self.kernel
        if self.op == "GlobalAveragePool":
            return n * c * self.shape[2] * self.shape[3]
        return n * c * h * w * self.kernel * self.kernel

    @property
    def out_hw(self):
        if self.op in ("Gemm", "MatMul"):
            return ()
        if self.op == "GlobalAveragePool":
            return (1, 1)
        return tuple((d + 2 * self.pad - self.kernel) // self.stride + 1 for d in self.shape[2:])


def _conv(name, c, m, hw, k=3, s=1, p=None, group=1):
    hw = (hw, hw) if isinstance(hw, int) else hw
    return FloatLayer(name, "Conv", (1, c, *hw), m, k, s, k // 2 if p is None else p, group)


FLOAT_LAYERS = [
    # 3x3 convs of the four stages (Bi-Real/XNOR-ResNet widths), 8x8 beside 7x7
    _conv("conv3x3 64 @56", 64, 64, 56),
    _conv("conv3x3 128 @28", 128, 128, 28),
    _conv("conv3x3 256 @14", 256, 256, 14),
    _conv("conv3x3 512 @7", 512, 512, 7),
    _conv("conv3x3 512 @8", 512, 512, 8),
    _conv("conv3x3 384->256 @13", 384, 256, 13),
    # stems
    _conv("stem 7x7/2 3->64 @224", 3, 64, 224, k=7, s=2),
    _conv("stem 3x3/2 3->32 @224", 3, 32, 224, k=3, s=2),
    _conv("conv3x3/2 32->64 @112", 32, 64, 112, k=3, s=2),
    _conv("alexnet 11x11/4 3->64 @224", 3, 64, 224, k=11, s=4, p=2),
    _conv("xnornet 11x11/4 3->96 @224", 3, 96, 224, k=11, s=4, p=4),
    _conv("alexnet 5x5 64->192 @27", 64, 192, 27, k=5),
    # downsampling shortcuts (1x1/2) and 1x1 convs
    _conv("1x1/2 64->128 @56", 64, 128, 56, k=1, s=2, p=0),
    _conv("1x1/2 128->256 @28", 128, 256, 28, k=1, s=2, p=0),
    _conv("1x1/2 256->512 @14", 256, 512, 14, k=1, s=2, p=0),
    _conv("1x1 512->512 @7", 512, 512, 7, k=1, p=0),
    # depthwise 3x3 (QuickNet/MobileNet-style transitions)
    _conv("dw3x3 64 @56", 64, 64, 56, group=64),
    _conv("dw3x3/2 128 @56", 128, 128, 56, s=2, group=128),
    _conv("dw3x3 512 @7", 512, 512, 7, group=512),
    # heads
    FloatLayer("gemm 4096x4096", "Gemm", (1, 4096), 4096),
    FloatLayer("gemm 9216->4096", "Gemm", (1, 9216), 4096),
    FloatLayer("gemm 512->1000", "Gemm", (1, 512), 1000),
    FloatLayer("matmul 512x1000", "MatMul", (1, 512), 1000),
    FloatLayer("global avgpool 512 @7", "GlobalAveragePool", (1, 512, 7, 7)),
    FloatLayer("maxpool 3x3/2 64 @112", "MaxPool", (1, 64, 112, 112), 0, 3, 2, 1),
    FloatLayer("maxpool 3x3/2 64 @55", "MaxPool", (1, 64, 55, 55), 0, 3, 2, 0),
    FloatLayer("avgpool 2x2/2 256 @14", "AveragePool", (1, 256, 14, 14), 0, 2, 2, 0),
]


def layer_onnx(layer: FloatLayer, seed=0):
    """(one-node ONNX model of LAYER, {initializer name: array}) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = {}, []
    c = layer.shape[1]
    if layer.op == "Conv":
        cg = c // layer.group
        inits["W"] = (rng.standard_normal((layer.out_channels, cg, layer.kernel, layer.kernel))
                      / np.sqrt(cg * layer.kernel ** 2)).astype(np.float32)
        inits["B"] = (0.1 * rng.standard_normal(layer.out_channels)).astype(np.float32)
        p = layer.pad
        nodes.append(helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=[layer.kernel] * 2,
                                      strides=[layer.stride] * 2, pads=[p] * 4, group=layer.group))
        out = (1, layer.out_channels, *layer.out_hw)
    elif layer.op == "Gemm":
        inits["W"] = (rng.standard_normal((layer.out_channels, c)) / np.sqrt(c)).astype(np.float32)
        inits["B"] = (0.1 * rng.standard_normal(layer.out_channels)).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1))
        out = (layer.shape[0], layer.out_channels)
    elif layer.op == "MatMul":
        inits["W"] = (rng.standard_normal((c, layer.out_channels)) / np.sqrt(c)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
        out = (layer.shape[0], layer.out_channels)
    elif layer.op == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["y"]))
        out = (1, c, 1, 1)
    else:  # MaxPool / AveragePool
        nodes.append(helper.make_node(layer.op, ["x"], ["y"], kernel_shape=[layer.kernel] * 2,
                                      strides=[layer.stride] * 2, pads=[layer.pad] * 4))
        out = (1, c, *layer.out_hw)
    graph = helper.make_graph(nodes, "bdp_float_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, layer.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, inits


def reference64(layer: FloatLayer, x, inits):
    """LAYER's output in float64 (numpy, no float32 rounding anywhere but the inputs)."""
    x = x.astype(np.float64)
    if layer.op == "Gemm":
        return x @ inits["W"].astype(np.float64).T + inits["B"].astype(np.float64)
    if layer.op == "MatMul":
        return x @ inits["W"].astype(np.float64)
    if layer.op == "GlobalAveragePool":
        return x.mean(axis=(2, 3), keepdims=True)
    k, s, p = layer.kernel, layer.stride, layer.pad
    n, c, h, w = x.shape
    oh, ow = layer.out_hw
    fill = -np.inf if layer.op == "MaxPool" else 0.0
    xp = np.full((n, c, h + 2 * p, w + 2 * p), fill)
    xp[:, :, p:p + h, p:p + w] = x
    # taps[n, c, r, q, oh, ow]
    taps = np.stack([np.stack([xp[:, :, r:r + s * (oh - 1) + 1:s, q:q + s * (ow - 1) + 1:s] for q in range(k)], 2)
                     for r in range(k)], 2)
    if layer.op == "MaxPool":
        return taps.max(axis=(2, 3))
    if layer.op == "AveragePool":
        return taps.mean(axis=(2, 3))
    wt = inits["W"].astype(np.float64)
    g = layer.group
    m = wt.shape[0]
    tg = taps.reshape(n, g, c // g, k, k, oh, ow)
    wg = wt.reshape(g, m // g, c // g, k, k)
    y = np.einsum("ngcrqhw,gmcrq->ngmhw", tg, wg, optimize=True).reshape(n, m, oh, ow)
    return y + inits["B"].astype(np.float64)[None, :, None, None]


def rel_err(got, ref) -> float:
    """Largest absolute error over the largest absolute reference value."""
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1e-30, np.abs(ref).max()))


def compile_layer(model, shape, spec, options=None):
    """The Relax VM executable bdp builds for one-layer MODEL."""
    from bdp.targets.lower import build, import_onnx
    from bdp.targets.options import CompileOptions

    opts = CompileOptions.of(options)
    return build(import_onnx(model, {"x": list(shape)}, spec, opts), spec, options=opts)


def vm_callable(ex, x):
    """(run, run-and-fetch) of executable EX's ``main`` on X (the input copied to the VM once)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    f = vm["main"]
    xt = tvm.runtime.tensor(x)
    return (lambda: f(xt)), (lambda: f(xt).numpy())


def _rounds(est_ms, budget_ms, lo=6, hi=60):
    return int(min(hi, max(lo, budget_ms / max(est_ms, 1e-3))))


def rms_rel_err(got, ref) -> float:
    """RMS error over the RMS of the reference (less at the mercy of one unlucky output than
    :func:`rel_err`)."""
    d = got.astype(np.float64) - ref
    return float(np.sqrt(np.mean(d * d)) / max(1e-30, np.sqrt(np.mean(ref * ref))))


def set_tvm_threads(n):
    """Resize TVM's thread pool to N threads (0: back to the default); with 1 the work runs on
    the calling thread."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(n))


def time_paired_cpu(fns: dict, seconds: float, min_pairs: int = 10) -> dict:
    """Single-threaded timing that a busy machine disturbs little: the functions are called in
    turn (one call each, repeatedly, for SECONDS) and each call is timed in CPU time of the
    calling thread (``time.thread_time``: time spent descheduled does not count). Returns
    {name: {p10_ms, median_ms, runs}} and, under "pair_ratio", the median over rounds of the
    first function's time over the second's."""
    names = list(fns)
    times = {k: [] for k in names}
    for f in fns.values():
        f()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times[names[0]]) < min_pairs:
        for k in names:
            t = time.thread_time()
            fns[k]()
            times[k].append((time.thread_time() - t) * 1e3)
    out = {k: {"p10_ms": float(np.percentile(v, 10)), "median_ms": float(np.median(v)), "runs": len(v)}
           for k, v in times.items()}
    a, b = np.asarray(times[names[0]]), np.asarray(times[names[1]])
    out["pair_ratio"] = float(np.median(a / np.maximum(b, 1e-9)))
    return out


def bench_float_layer(layer: FloatLayer, *, threads, spec, budget_ms=600.0, repeats=3, cpu_seconds=2.0):
    """One row of the float-layer table.

    Wall time with THREADS threads for both runtimes: REPEATS passes of
    :func:`bdp.toolchain.bench.table.time_interleaved`; ``ratio`` is the median over passes of bdp's
    median time over onnxruntime's, ``ratio_min`` the ratio of the minimum times. On a machine
    shared with other jobs both swing by 2x from pass to pass; a second measurement is
    single-threaded in thread CPU time (:func:`time_paired_cpu`, CPU_SECONDS): ``ratio_1t``.
    Errors: both outputs against :func:`reference64` (:func:`rel_err`, :func:`rms_rel_err`)."""
    from .table import time_interleaved
    from bdp.toolchain.runtime.timing import ort_session

    model, inits = layer_onnx(layer)
    x = np.random.default_rng(1).standard_normal(layer.shape).astype(np.float32)
    row = {"name": layer.name, "op": layer.op, "shape": list(layer.shape), "macs": layer.macs}
    t0 = time.perf_counter()
    ex = compile_layer(model, layer.shape, spec)
    row["bdp_compile_s"] = time.perf_counter() - t0
    run_bdp, out_bdp = vm_callable(ex, x)
    sess = ort_session(model, threads)
    ref = reference64(layer, x, inits)
    got, want = out_bdp(), sess.run(None, {"x": x})[0]
    row["bdp_rel_err"], row["ort_rel_err"] = rel_err(got, ref), rel_err(want, ref)
    row["bdp_rms_err"], row["ort_rms_err"] = rms_rel_err(got, ref), rms_rel_err(want, ref)
    fns = {"bdp": run_bdp, "onnxruntime_fp32": lambda: sess.run(None, {"x": x})}
    t = time.perf_counter()
    run_bdp()
    rounds = _rounds((time.perf_counter() - t) * 1e3, budget_ms)
    ratios, merged = [], {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        res = time_interleaved(fns, rounds, cycles=5)
        ratios.append(res["bdp"]["median_ms"] / res["onnxruntime_fp32"]["median_ms"])
        for k, v in res.items():
            merged[k].append(v)
    for k, v in merged.items():
        row[k] = {"median_ms": float(np.median([s["median_ms"] for s in v])),
                  "min_ms": float(min(s["min_ms"] for s in v)), "runs": int(sum(s["runs"] for s in v))}
    row["ratio"] = float(np.median(ratios))  # bdp time / onnxruntime time, median over passes
    row["ratio_passes"] = ratios
    row["ratio_min"] = row["bdp"]["min_ms"] / row["onnxruntime_fp32"]["min_ms"]
    row["gflops"] = 2 * layer.macs / (row["bdp"]["min_ms"] * 1e-3) / 1e9
    if cpu_seconds:
        sess1 = ort_session(model, 1)
        set_tvm_threads(1)
        try:
            one = time_paired_cpu({"bdp": run_bdp, "onnxruntime_fp32": lambda: sess1.run(None, {"x": x})}, cpu_seconds)
        finally:
            set_tvm_threads(threads)
        row["one_thread_cpu"] = one
        row["ratio_1t"] = one["pair_ratio"]
    return row


def format_float_layers(rows) -> str:
    lines = ["float layers, bdp vs onnxruntime FP32. ms: minimum of interleaved runs (both runtimes with the same "
             "threads); ratio = bdp / onnxruntime: of medians (median over passes), of minimums, and single-threaded "
             "in thread CPU time (1t); err = max |y - y64| / max |y64| (and RMS) against float64 numpy",
             f"  {'layer':<28} {'bdp ms':>8} {'ORT ms':>8} {'ratio':>6} {'r(min)':>6} {'r(1t)':>6} {'GFLOP/s':>7} "
             f"{'bdp err':>8} {'ORT err':>8} {'bdp rms':>8} {'ORT rms':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['name']:<28} error: {r['error']}")
            continue
        r1 = r.get("ratio_1t")
        lines.append(f"  {r['name']:<28} {r['bdp']['min_ms']:8.3f} {r['onnxruntime_fp32']['min_ms']:8.3f} "
                     f"{r['ratio']:6.2f} {r['ratio_min']:6.2f} {'-' if r1 is None else format(r1, '6.2f'):>6} "
                     f"{r['gflops']:7.1f} {r['bdp_rel_err']:8.1e} {r['ort_rel_err']:8.1e} "
                     f"{r['bdp_rms_err']:8.1e} {r['ort_rms_err']:8.1e}")
    return "\n".join(lines)


def summarize_float_layers(rows, limit=1.5) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {}
    from .table import geomean

    out = {"geomean_ratio": geomean([r["ratio"] for r in ok]), "max_ratio": max(r["ratio"] for r in ok),
           "slowest": max(ok, key=lambda r: r["ratio"])["name"],
           f"over_{limit:g}x": [r["name"] for r in ok if r["ratio"] > limit],
           f"min_times_over_{limit:g}x": [r["name"] for r in ok if r["ratio_min"] > limit],
           # "not <=": a NaN is worse
           "err_worse_than_onnxruntime": [r["name"] for r in ok if not r["bdp_rel_err"] <= r["ort_rel_err"]],
           "rms_err_worse_than_onnxruntime": [r["name"] for r in ok if not r["bdp_rms_err"] <= r["ort_rms_err"]]}
    one = [r for r in ok if r.get("ratio_1t") is not None]
    if one:
        out["geomean_ratio_1t"] = geomean([r["ratio_1t"] for r in one])
        out[f"one_thread_over_{limit:g}x"] = [r["name"] for r in one if r["ratio_1t"] > limit]
    return out


def run_float_layers(*, threads, spec_name=FLOAT_TARGET, quick=False, names=None, repeats=3, print_rows=True):
    """The float-layer table: rows for FLOAT_LAYERS (those whose name contains one of NAMES),
    printed as they come; returns (rows, summary)."""
    from bdp.targets.spec import get_target

    spec = get_target(spec_name)
    layers = [lay for lay in FLOAT_LAYERS if not names or any(n in lay.name for n in names)]
    if quick:
        layers = layers[:4]
    rows = []
    if print_rows:
        print(format_float_layers([]), flush=True)
    for layer in layers:
        try:
            row = bench_float_layer(layer, threads=threads, spec=spec, budget_ms=150.0 if quick else 600.0,
                                    repeats=1 if quick else repeats, cpu_seconds=0.5 if quick else 2.0)
        except Exception as e:  # keep going: one broken layer must not hide the others
            row = {"name": layer.name, "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
        rows.append(row)
        if print_rows:
            print(format_float_layers([row]).splitlines()[-1], flush=True)
    return rows, summarize_float_layers(rows)
