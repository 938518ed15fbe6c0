"""The ``bdp bench`` chart (matplotlib, PNG or SVG): bdp beside the FP32 (and INT8) runtimes.

Two rows, one for the binary conv layers and one for the zoo models; in each, the left panel
is the latency of every runtime (milliseconds, grouped bars, a log axis when the runtimes span
decades) and the right panel is bdp's speed-up over onnxruntime (FP32, and INT8 where the
results have it) with the suite's target marked.

Result rows are read defensively (:func:`bdp.toolchain.runtime.charts.median_ms`): a runtime whose key
no row holds is left out of the chart, a single missing value is marked "n/a". The onnxruntime
INT8 column is looked up as ``onnxruntime_int8`` / ``ort_int8`` (a stats dict) or ``*_ms`` (a
number).

Without the CLI, from a saved bench JSON::

    python -m bdp.toolchain.bench.chart docs/bench.json docs/bench.png
"""

from __future__ import annotations

import json
import math
import sys

from bdp.errors import InputError

from bdp.toolchain.runtime.charts import (RUNTIME_COLOURS, chart_format, fmt_ms, fmt_x, host_line, median_ms,
                                          new_figure, save_figure, use_log)

INT8_KEYS = ("onnxruntime_int8", "ort_int8", "int8_onnxruntime", "onnxruntime_int8_qdq")
LAYER_SERIES = [("bdp", ("bdp",)),
                ("onnxruntime FP32", ("onnxruntime_fp32", "ort_fp32")),
                ("onnxruntime INT8", INT8_KEYS),
                ("TVM FP32 (bdp schedules)", ("tvm_scheduled_fp32",)),
                ("TVM FP32 (default pipeline)", ("tvm_default_fp32",)),
                ("PyTorch FP32", ("torch_fp32",))]
MODEL_SERIES = [("bdp", ("bdp",)),
                ("onnxruntime FP32", ("onnxruntime_fp32", "ort_fp32")),
                ("onnxruntime INT8", INT8_KEYS),
                ("TVM FP32", ("tvm_fp32", "tvm_scheduled_fp32", "tvm_default_fp32"))]
SPEEDUP_OVER = ["onnxruntime FP32", "onnxruntime INT8"]


def _ok(rows):
    return [r for r in rows or [] if isinstance(r, dict) and "error" not in r]


def _layer_label(r):
    shape = r.get("shape") or [r.get("c_in"), r.get("h"), r.get("w")]
    return "x".join(str(d) for d in shape)


def table(rows, series, label):
    """(labels, [(series name, [ms or None per row])]) with the series no row has left out."""
    labels = [label(r) for r in rows]
    cols = [(name, [median_ms(r, *keys) for r in rows]) for name, keys in series]
    return labels, [(n, v) for n, v in cols if any(x is not None for x in v)]


def _latency_panel(ax, labels, cols, title):
    """Grouped horizontal bars of milliseconds; bdp's value and each baseline's ratio to bdp."""
    n = len(cols)
    h = 0.8 / max(n, 1)
    vals = [v for _, vs in cols for v in vs if v]
    log = use_log(vals)
    seen = set()
    for j, (name, vs) in enumerate(cols):
        for i, v in enumerate(vs):
            y = i + (j - (n - 1) / 2) * h
            if v is None:
                ax.text(min(vals) if vals else 0, y, "  n/a", va="center", fontsize=7, color="#777")
                continue
            ax.barh([y], [v], height=h * 0.92, color=RUNTIME_COLOURS.get(name, "#777"),
                    label=None if name in seen else name)
            seen.add(name)
            bdp = cols[0][1][i] if cols[0][0] == "bdp" else None
            text = fmt_ms(v) if name == "bdp" or not bdp else f"{fmt_ms(v)} ({fmt_x(v / bdp)})"
            ax.annotate(text, (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(vals) / 1.6, max(vals) * 5)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # "10", not "10^1"
    elif vals:
        ax.set_xlim(0, max(vals) * 1.35)
    ax.set_xlabel("latency per run (ms, median)" + (", log scale" if log else ""), fontsize=9)
    ax.set_title(title, fontsize=10.5, loc="left")
    ax.grid(axis="x", which="major", alpha=0.3)


def _speedup_panel(ax, labels, cols, target, target_text):
    """bdp's speed-up (baseline ms / bdp ms) over the onnxruntime columns; 1x and the target marked."""
    bdp = dict(cols).get("bdp") or [None] * len(labels)
    over = [(n, vs) for n, vs in cols if n in SPEEDUP_OVER]
    n = max(len(over), 1)
    h = min(0.8 / n, 0.5)
    sp_all = []
    for j, (name, vs) in enumerate(over):
        for i, (v, b) in enumerate(zip(vs, bdp)):
            y = i + (j - (n - 1) / 2) * h
            if not (v and b):
                ax.text(1.0, y, " n/a", va="center", fontsize=7, color="#777")
                continue
            sp = v / b
            sp_all.append(sp)
            ax.barh([y], [sp], height=h * 0.92, color=RUNTIME_COLOURS[name])
            ax.annotate(fmt_x(sp), (sp, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5)
    ax.set_xscale("log")
    lo = min(sp_all + [1.0]) / 1.5
    hi = max(sp_all + [target or 1.0, 2.0]) * 2.2
    ax.set_xlim(lo, hi)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))  # "2x", not "2 x 10^0"
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (0.5, 1, 2, 3, 4, 6, 8, 10, 15, 20, 30, 50, 100) if lo <= t <= hi])
    ax.axvline(1.0, color="#444", linestyle=":", linewidth=1)
    ax.text(1.0, 1.0, " 1x ", transform=ax.get_xaxis_transform(), ha="right", va="bottom", fontsize=8, color="#444")
    if target:
        ax.axvline(target, color="#c0392b", linestyle="--", linewidth=1.2)
        right = math.log(target / lo) > 0.6 * math.log(hi / lo)  # near the right edge: the label goes left
        ax.text(target, 1.0, f" {target_text} " if right else f" {target_text}", transform=ax.get_xaxis_transform(),
                ha="right" if right else "left", va="bottom", fontsize=8, color="#c0392b")
    ax.set_yticks(range(len(labels)), [""] * len(labels))
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("speed-up of bdp (x times faster, log scale; 1x = as fast)", fontsize=9)
    fp32 = dict(over).get("onnxruntime FP32") or []
    g = _geomean([v / b for v, b in zip(fp32, bdp) if v and b])
    ax.set_title("bdp's speed-up over onnxruntime" + (f", FP32 geometric mean {fmt_x(g)}" if g else ""),
                 fontsize=10.5, loc="left", pad=14)
    ax.grid(axis="x", which="major", alpha=0.3)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def bench_figure(res):
    """The matplotlib Figure of a bench result dict (see the module docstring)."""
    from matplotlib.patches import Patch

    targets = res.get("targets") or {}
    sections = []
    layers = _ok(res.get("layers"))
    if layers:
        labels, cols = table(layers, LAYER_SERIES, _layer_label)
        sections.append(("binary 3x3 conv layer, C x H x W (float in and out; the baselines run the same conv in FP32)",
                         labels, cols, targets.get("layer_geomean"), "target: geometric mean {:g}x"))
    models = _ok(res.get("models"))
    if models:
        shape = "x".join(str(d) for d in (models[0].get("input_shape") or [])) or "?"
        labels, cols = table(models, MODEL_SERIES, lambda r: str(r.get("arch", "?")))
        sections.append((f"zoo models end to end at {shape} (the baselines run the float model)",
                         labels, cols, targets.get("model_each"), "target: {:g}x each"))
    # pixel layout: header, shared legend, then per section a title, the axes and the x label
    head, legend_h, title_h, xlabel_h, foot = 62, 34, 36, 58, 30
    axes_h = [len(lb) * (len(cols) * 15 + 20) for _, lb, cols, _, _ in sections]
    W = 1400
    H = head + legend_h + sum(title_h + h + xlabel_h for h in axes_h) + foot
    fig = new_figure(W, H)
    present = [n for s in sections for n, _ in s[2]]
    names = [n for n, _ in LAYER_SERIES + MODEL_SERIES if n in present]
    names = list(dict.fromkeys(names))
    quick = " (--quick smoke run)" if res.get("quick") else ""
    vs = " / ".join(n for n in names if n != "bdp") or "nothing"
    fig.suptitle(f"bdp bench: bdp vs {vs}{quick}", x=0.012, y=1 - 8 / H, ha="left", va="top",
                 fontsize=13, fontweight="bold")
    v = res.get("versions") or {}
    vers = ", ".join(f"{k} {v[k]}" for k in ("bdp", "tvm", "onnxruntime", "torch") if v.get(k))
    fig.text(0.012, 1 - 34 / H, f"{host_line(res.get('host'), res.get('threads'), res.get('target'))}"
             f"{'; ' + str(res['date']) if res.get('date') else ''}{'; ' + vers if vers else ''}",
             ha="left", va="top", fontsize=9, color="#333")
    if not sections:
        fig.text(0.5, 0.4, "no results (every row failed or none was run)", ha="center", fontsize=12)
        return fig
    fig.legend(handles=[Patch(color=RUNTIME_COLOURS.get(n, "#777"), label=n) for n in names], loc="upper left",
               bbox_to_anchor=(0.012, 1 - head / H), ncols=len(names), frameon=False, fontsize=9.5,
               handlelength=1.4, columnspacing=1.6, borderaxespad=0)
    left, mid, right = 130, 850, 1385
    y = head + legend_h
    for (title, labels, cols, target, ttext), ah in zip(sections, axes_h):
        y += title_h
        ax = fig.add_axes([left / W, 1 - (y + ah) / H, (mid - left) / W, ah / H])
        _latency_panel(ax, labels, cols, title)
        ax2 = fig.add_axes([(mid + 20) / W, 1 - (y + ah) / H, (right - mid - 20) / W, ah / H])
        _speedup_panel(ax2, labels, cols, target, ttext.format(target) if target else None)
        y += ah + xlabel_h
    failed = [_layer_label(r) if "arch" not in r else str(r["arch"]) for r in (res.get("layers") or []) +
              (res.get("models") or []) if isinstance(r, dict) and "error" in r]
    fig.text(0.012, 8 / H, "Bars: median of interleaved runs, the same thread count for every runtime. "
             "On a baseline's bar: its time and (its time / bdp's time)."
             + (f" Left out, failed in this run (see the JSON): {', '.join(failed)}." if failed else ""),
             fontsize=8, color="#555", va="bottom")
    return fig


def speedup_chart(path, res):
    """Write the chart of bench result RES to PATH (.png or .svg); returns PATH."""
    chart_format(path)
    return save_figure(bench_figure(res), path)


def chart_from_json(json_path, out_path):
    """Draw OUT_PATH (.png or .svg) from a saved ``bdp bench`` JSON file; returns OUT_PATH."""
    chart_format(out_path)
    try:
        with open(json_path) as f:
            res = json.load(f)
    except OSError as e:
        raise InputError(f"{json_path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise InputError(f"{json_path}: not JSON ({str(e)[:160]})") from None
    if not isinstance(res, dict) or not ("layers" in res or "models" in res):
        raise InputError(f"{json_path}: not a bdp bench result (no 'layers' or 'models')")
    return speedup_chart(out_path, res)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bdp.toolchain.bench.chart BENCH.json OUT.png|OUT.svg", file=sys.stderr)
        return 2
    try:
        print(chart_from_json(argv[0], argv[1]))
    except InputError as e:
        print(f"bdp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
