"""Charts drawn with matplotlib: the shared helpers and the ``bdp profile`` latency chart.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas and never through
``pyplot``: no GUI backend is ever touched, and a user's own pyplot state is left alone. The
file's extension picks the format: ``.png`` (raster) or ``.svg`` (vector, text kept as text);
anything else is an :class:`~bdp.errors.InputError`.
"""

from __future__ import annotations

import math
import os

from bdp.errors import InputError

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 100
# runtimes in a fixed order and colour, so that every chart reads the same
RUNTIME_COLOURS = {"bdp": "#1f5fa8", "onnxruntime FP32": "#d1495b", "onnxruntime INT8": "#edae49",
                   "TVM FP32 (bdp schedules)": "#00798c", "TVM FP32 (default pipeline)": "#8d99ae",
                   "TVM FP32": "#00798c", "PyTorch FP32": "#66a182"}


def chart_format(path) -> str:
    """'png' or 'svg' from PATH's extension; InputError for anything else (checked before any
    measuring starts, so a typo costs nothing)."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in FORMATS:
        raise InputError(f"{path}: cannot write a chart as '{ext or '(no extension)'}'; "
                         f"give a file ending in {' or '.join(FORMATS)}")
    return FORMATS[ext]


def new_figure(width_px, height_px):
    """A Figure of WIDTH_PX x HEIGHT_PX pixels (at :data:`DPI`) on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path):
    """Write FIG to PATH in the format its extension names (atomically); returns PATH."""
    import matplotlib

    from bdp.files import atomic_path

    fmt = chart_format(path)
    import bdp

    meta = {"Creator": f"bdp {bdp.__version__} (matplotlib {matplotlib.__version__})"} if fmt == "svg" else \
        {"Software": f"bdp {bdp.__version__} (matplotlib {matplotlib.__version__})"}
    if fmt == "svg":
        meta["Date"] = None  # the same results give the same file
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bdp"}):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)
            mask = os.umask(0)
            os.umask(mask)
            if os.path.isfile(tmp):  # not a device or FIFO written in place
                os.chmod(tmp, 0o666 & ~mask)  # a temporary file is private; the chart is not
    return str(path)


def median_ms(row, *keys):
    """Milliseconds (a median) under the first of KEYS that ROW holds, else None.

    A key may hold a stats dict (``{"median_ms": ...}``, today's bench and profile rows) or a
    number; ``KEY_ms`` is tried too (``ort_int8_ms``-style fields). Anything else (missing,
    not a positive finite number) is None: a chart draws what is there and leaves out the rest.
    """
    if not isinstance(row, dict):
        return None
    for k in keys:
        for kk in (k, k + "_ms"):
            v = row.get(kk)
            if isinstance(v, dict):
                v = v.get("median_ms")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                return float(v)
    return None


def fmt_ms(v) -> str:
    if v >= 100:
        return f"{v:.0f} ms"
    if v >= 10:
        return f"{v:.1f} ms"
    if v >= 1:
        return f"{v:.2f} ms"
    return f"{v:.3f} ms"


def fmt_x(v) -> str:
    return f"{v:.0f}x" if v >= 100 else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def use_log(values, span=20.0) -> bool:
    """Log scale when the largest of VALUES is more than SPAN times the smallest."""
    vs = [v for v in values if v]
    return bool(vs) and max(vs) / min(vs) > span


def host_line(host, threads=None, target=None) -> str:
    """'AMD EPYC (x86_64, 2 cores), 2 threads, target x86 (icelake-server, avx512-vpopcntdq)'."""
    host = host or {}
    bits = [host.get("cpu") or "unknown CPU"]
    inner = [s for s in (host.get("machine"), f"{host['cores']} cores" if host.get("cores") else None) if s]
    if inner:
        bits[0] += f" ({', '.join(inner)})"
    if threads:
        bits.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if target:
        if isinstance(target, dict):
            tvm = target.get("tvm") if isinstance(target.get("tvm"), dict) else {}
            isa = [s for s in (tvm.get("mcpu") or tvm.get("mattr"), target.get("popcount")) if s]
            name = target.get("name") or "?"
            bits.append(f"target {name}" + (f" ({', '.join(map(str, isa))})" if isa else ""))
        else:
            bits.append(f"target {target}")
    return ", ".join(bits)


# ---------------------------------------------------------------------------------------------
# bdp profile

# onnxruntime baselines of a profile result: (label, keys); INT8 appears when a result has it
PROFILE_BASELINES = [("onnxruntime FP32", ("fp32_onnxruntime", "onnxruntime_fp32", "ort_fp32")),
                     ("onnxruntime INT8", ("int8_onnxruntime", "onnxruntime_int8", "ort_int8"))]
TOP_OPS = 12


def short_op(name, limit=46) -> str:
    """A kernel symbol short enough for a legend (TVM's fused names run to 100+ characters)."""
    s = str(name)
    for pre in ("fused_", "tvmgen_default_"):
        if s.startswith(pre):
            s = s[len(pre):]
    return s if len(s) <= limit else s[:limit - 3] + "..."


def profile_chart(path, res):
    """The ``bdp profile`` chart at PATH (.png or .svg): end-to-end latency of the bundle beside
    the onnxruntime baselines (median bar, p90 and p99 marks), and the per-op breakdown as a
    stacked bar (the top kernels by time, the rest as one 'other' segment)."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    chart_format(path)
    rows = [("bdp", res.get("latency") or {})]
    notes = []
    for label, keys in PROFILE_BASELINES:
        stats = next((res[k] for k in keys if isinstance(res.get(k), dict)), None)
        if stats and median_ms(stats, "median_ms") is not None:
            rows.append((label, stats))
        elif label.endswith("FP32") and res.get("fp32_note"):
            import textwrap

            notes += textwrap.wrap(f"{label}: {res['fp32_note']}", 150)  # one line of the chart's width
    ops = [r for r in res.get("per_op") or [] if median_ms(r, "total_ms") is not None]
    top, rest = ops[:TOP_OPS], ops[TOP_OPS:]
    n_legend = len(top) + (1 if rest else 0)

    # pixel layout, top down
    W, left, right = 1100, 200, 1020
    lat_y, lat_h = 92, 46 * len(rows) + 10
    notes_y = lat_y + lat_h + 44
    ops_y = notes_y + 16 * len(notes) + 34
    bar_h = 50
    legend_y = ops_y + bar_h + 50
    H = (legend_y + 26 + 19 * n_legend + 16) if ops else ops_y + 10
    fig = new_figure(W, H)

    def box(x0, y0, w, h):
        return [x0 / W, 1 - (y0 + h) / H, w / W, h / H]

    bundle = os.path.basename(str(res.get("bundle", "")).rstrip("/")) or "bundle"
    shape = "x".join(str(d) for d in res.get("input_shape") or []) or "?"
    runs = (res.get("latency") or {}).get("runs")
    device = res.get("device", "?")
    where = "this host" if device == "local" else f"device {device}"
    fig.suptitle(f"bdp profile: bundle {bundle} (target {res.get('target', '?')}), measured on {where}",
                 x=0.02, y=1 - 10 / H, ha="left", va="top", fontsize=13, fontweight="bold")
    fig.text(0.02, 1 - 38 / H, f"{host_line(res.get('host'), res.get('threads'))}; input {shape}, "
             f"{runs if runs else '?'} timed runs per runtime", ha="left", va="top", fontsize=9.5, color="#333")

    # latency: median bars with p90 / p99 marks
    ax = fig.add_axes(box(left, lat_y, right - left, lat_h))
    meds = [median_ms(s, "median_ms") or 0.0 for _, s in rows]
    tails = [max(s.get("p99_ms") or 0, s.get("p90_ms") or 0) for _, s in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, meds, height=0.6, color=[RUNTIME_COLOURS.get(n, "#777") for n, _ in rows])
    for yi, (name, st), m in zip(y, rows, meds):
        for key, mark in (("p90_ms", "|"), ("p99_ms", "x")):
            if isinstance(st.get(key), (int, float)):
                ax.plot([st[key]], [yi], marker=mark, color="black", markersize=9, linestyle="none")
        text = f"{fmt_ms(m)} median"
        if name != "bdp" and meds[0] and m:
            text += f"  (bdp is {fmt_x(m / meds[0])} faster)" if m >= meds[0] else f"  ({fmt_x(meds[0] / m)} faster than bdp)"
        ax.annotate(text, (max(m, st.get("p99_ms") or 0), yi), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_yticks(y, [n for n, _ in rows], fontsize=10)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    hi = max(meds + tails + [1e-6])
    if use_log([m for m in meds if m]):
        ax.set_xscale("log")
        ax.set_xlim(min(m for m in meds if m) / 2, hi * 6)
    else:
        ax.set_xlim(0, hi * 1.55)
    ax.set_xlabel("latency per run (ms)" + (", log scale" if ax.get_xscale() == "log" else ""), fontsize=9.5)
    ax.set_title("end-to-end latency: bar = median, | = p90, x = p99", fontsize=10.5, loc="left")
    ax.grid(axis="x", alpha=0.3)
    for i, n in enumerate(notes):
        fig.text(left / W, 1 - (notes_y + 16 * i) / H, n, fontsize=8.5, color="#555", va="top")

    # per-op breakdown: one stacked bar
    if not ops:
        fig.text(left / W, 1 - ops_y / H, (res.get("per_op_note") or "per-op breakdown: not available"),
                 fontsize=9, color="#555", va="bottom")
        return save_figure(fig, path)
    total = sum(r["total_ms"] for r in ops)
    binary = sum(r["total_ms"] for r in ops if "binary" in str(r["op"]))
    segs = [(short_op(r["op"]), r["total_ms"], r.get("calls"), r.get("shape")) for r in top]
    if rest:
        segs.append((f"other ({len(rest)} kernels)", sum(r["total_ms"] for r in rest),
                     sum(r.get("calls") or 0 for r in rest), None))
    ax2 = fig.add_axes(box(left, ops_y, right - left, bar_h))
    cmap = colormaps["tab20"]
    x0, handles = 0.0, []
    for i, (label, ms, calls, shp) in enumerate(segs):
        colour = "#bbbbbb" if label.startswith("other (") else cmap(i % 20)
        ax2.barh([0], [ms], left=x0, height=0.7, color=colour, edgecolor="white", linewidth=0.6)
        if ms / total > 0.05:
            ax2.text(x0 + ms / 2, 0, f"{100 * ms / total:.0f}%", ha="center", va="center", fontsize=8.5,
                     color="white" if i % 2 == 0 and colour != "#bbbbbb" else "black")
        x0 += ms
        shape_s = "x".join(str(d) for d in shp) if shp else ""
        handles.append(Patch(color=colour, label=f"{fmt_ms(ms):>9}  {100 * ms / total:4.1f}%  x{calls or '?':<3} "
                                                 f"{label}" + (f"  [{shape_s}]" if shape_s else "")))
    ax2.set_xlim(0, total)
    ax2.set_yticks([0], ["kernels"], fontsize=10)
    ax2.set_xlabel("milliseconds per run (each kernel's calls summed; every call timed on its own)", fontsize=9.5)
    ax2.set_title(f"per-op breakdown: {fmt_ms(total)} of kernel time per run in {len(ops)} kernels; "
                  f"binary conv kernels {100 * binary / total:.0f}% of it", fontsize=10.5, loc="left")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(left / W, 1 - legend_y / H), frameon=False,
               prop={"family": "monospace", "size": 8.5}, handlelength=1.2, borderaxespad=0,
               title="time per run, share of the kernels' time, calls, kernel [output shape]", title_fontsize=9,
               alignment="left")
    return save_figure(fig, path)
