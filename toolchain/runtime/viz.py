"""Pictures of dense outputs (matplotlib on Agg): one PNG per output, the input beside it, and an
``overview.png`` with the input and every dense output side by side.

Every panel has a title and says how to read it: the segmentation a legend of the classes it
shows (names from the manifest's ``classes`` of the output, else "class k"), depth a colour bar
in metres, edges a colour bar of the edge probability, normals the RGB encoding and a key (a
sphere's normals drawn the same way). Panels are at least :data:`PANEL_MIN_W` pixels wide:
small outputs are enlarged by a whole factor with nearest-neighbour resampling (Pillow), so every
output pixel stays a visible block of one colour. Images are drawn one image pixel to one
picture pixel.
"""

from __future__ import annotations

import math
import os

import numpy as np

PANEL_MIN_W = 320
LEGEND_MAX = 12  # classes named in a segmentation legend (the most frequent ones)

# a 20-colour qualitative palette (class i -> RGB); classes beyond 20 reuse it
PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32], [0, 0, 0],
], dtype=np.uint8)

# layout, in pixels
_PAD, _GAP, _HEAD, _TITLE = 14, 22, 46, 40
_ROW = 19  # one legend row


def _upscale(img: np.ndarray, size) -> np.ndarray:
    """IMG (uint8 [H, W, 3]) resized to SIZE = (h, w) with nearest-neighbour (Pillow)."""
    from PIL import Image

    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.NEAREST))


def panel_size(shapes) -> tuple[int, int]:
    """(h, w) of every panel: the largest of SHAPES ((h, w) pairs), enlarged by the smallest whole
    factor that makes it at least PANEL_MIN_W wide."""
    h, w = max(shapes, key=lambda s: s[0] * s[1])
    k = max(1, math.ceil(PANEL_MIN_W / max(w, 1)))
    return h * k, w * k


def _scalar_rgb(v, cmap, norm):
    return (np.asarray(cmap(norm(v)))[..., :3] * 255).round().astype(np.uint8)


def class_names(manifest, name, n):
    """N class names of output NAME: the manifest's ``classes`` of that output when it has N of
    them, else "class k"."""
    for o in manifest.get("outputs", []):
        if o.get("name") == name and isinstance(o.get("classes"), list) and len(o["classes"]) == n:
            return [str(c) for c in o["classes"]]
    return [f"class {k}" for k in range(n)]


def render(name: str, task: str, y: np.ndarray, manifest=None) -> dict:
    """One panel of output Y ([C, H, W], one batch element): {"title", "rgb" (uint8 [H, W, 3]),
    "key": what goes under the picture}."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    y = np.asarray(y, dtype=np.float32)
    c = y.shape[0]
    if task == "semseg" or (task == "unknown" and c > 3):
        labels = np.argmax(y, axis=0)
        names = class_names(manifest or {}, name, c)
        counts = np.bincount(labels.ravel(), minlength=c)
        shown = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
        entries = [(names[k], PALETTE[k % len(PALETTE)], counts[k] / labels.size) for k in shown[:LEGEND_MAX]]
        more = len(shown) - len(entries)
        return {"title": f"{name}: segmentation (argmax of {c} classes)",
                "rgb": PALETTE[labels % len(PALETTE)],
                "key": {"kind": "classes", "entries": entries,
                        "note": f"{len(shown)} of {c} classes present" + (f", {more} small ones not listed" if more else "")}}
    if task == "normals" or (task == "unknown" and c == 3):
        n = y[:3] / np.maximum(np.linalg.norm(y[:3], axis=0, keepdims=True), 1e-6)
        rgb = ((n.transpose(1, 2, 0) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        if task == "normals":
            return {"title": f"{name}: surface normals", "rgb": rgb, "key": {"kind": "normals"}}
        return {"title": f"{name}: 3 channels as RGB", "rgb": rgb,
                "key": {"kind": "text", "text": "RGB = (v + 1) / 2 of the channels 0, 1, 2\nnormalised to unit length"}}
    if task == "edges":
        p = 1.0 / (1.0 + np.exp(-y[0].astype(np.float64)))
        cmap, norm = colormaps["gray_r"], Normalize(0.0, 1.0)
        return {"title": f"{name}: edge probability", "rgb": _scalar_rgb(p, cmap, norm),
                "key": {"kind": "colorbar", "cmap": cmap, "norm": norm, "extend": "neither",
                        "label": "edge probability (sigmoid of the logit)"}}
    v = y[0]
    finite = v[np.isfinite(v)]
    lo, hi = (float(np.percentile(finite, 2)), float(np.percentile(finite, 98))) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    if task == "depth":
        cmap, label, title = colormaps["magma_r"], "depth (m): near is bright", f"{name}: depth in metres"
    else:
        cmap, label, title = colormaps["viridis"], "value of channel 0", f"{name}: channel 0 of {c}"
    norm = Normalize(lo, hi)
    return {"title": title, "rgb": _scalar_rgb(np.nan_to_num(v, nan=lo), cmap, norm),
            "key": {"kind": "colorbar", "cmap": cmap, "norm": norm, "extend": "both",
                    "label": label + " (2nd-98th percentile range)"}}


def input_picture(x: np.ndarray, manifest) -> np.ndarray:
    """The network input [N, 3, H, W] as the RGB image it was made from (preprocess undone)."""
    pre = manifest["input"].get("preprocess", {})
    img = x[0, :3].transpose(1, 2, 0) * np.asarray(pre.get("std", [1, 1, 1])) + np.asarray(pre.get("mean", [0, 0, 0]))
    img = img / float(pre.get("scale", 1 / 255.0))
    return img.round().clip(0, 255).astype(np.uint8)


def _pct(share) -> str:
    return "<1%" if share < 0.005 else f"{100 * share:.0f}%"


def _key_height(key, w) -> int:
    kind = key.get("kind")
    if kind == "classes":
        cols = max(1, w // 150)
        return 28 + _ROW * math.ceil(max(len(key["entries"]), 1) / cols)
    if kind == "colorbar":
        return 64
    if kind == "normals":
        return 84
    return 36 if key.get("text") else 8


def _normals_key() -> np.ndarray:
    """A sphere seen from the camera, its normals (x right, y down, z forward, facing the
    camera) drawn as RGB = (n + 1) / 2; outside the disc white."""
    s = 64
    u, v = np.meshgrid((np.arange(s) + 0.5) / s * 2 - 1, (np.arange(s) + 0.5) / s * 2 - 1)
    r2 = u * u + v * v
    inside = r2 <= 1
    n = np.stack([u, v, -np.sqrt(np.clip(1 - r2, 0, 1))], -1)
    rgb = ((n + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    rgb[~inside] = 255
    return rgb


def _draw_key(fig, key, x, y, w, H, W):
    """Draw KEY in the box at pixel (x, y) (top left, y down) of width w under a panel."""
    from matplotlib.patches import Patch

    kind = key.get("kind")

    def box(x0, y0, bw, bh):
        return [x0 / W, 1 - (y0 + bh) / H, bw / W, bh / H]

    if kind == "classes":
        cols = max(1, w // 150)
        rows = math.ceil(max(len(key["entries"]), 1) / cols)
        ax = fig.add_axes(box(x, y, w, 28 + _ROW * rows))
        ax.axis("off")
        handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="#444", linewidth=0.5,
                         label=f"{name} {_pct(share)}") for name, c, share in key["entries"]]
        ax.legend(handles=handles, loc="upper left", ncols=cols, frameon=False, fontsize=8.5, borderaxespad=0,
                  handlelength=1.2, columnspacing=1.0, title=key.get("note"), title_fontsize=8, alignment="left")
    elif kind == "colorbar":
        from matplotlib.cm import ScalarMappable

        cax = fig.add_axes(box(x + 4, y + 6, w - 8, 12))
        cb = fig.colorbar(ScalarMappable(norm=key["norm"], cmap=key["cmap"]), cax=cax, orientation="horizontal",
                          extend=key.get("extend", "neither"))
        cb.ax.tick_params(labelsize=8)
        cb.set_label(key["label"], fontsize=8.5)
    elif kind == "normals":
        ax = fig.add_axes(box(x, y + 6, 64, 64))
        ax.imshow(_normals_key(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        fig.text((x + 74) / W, 1 - (y + 10) / H,
                 "RGB = (n + 1) / 2 of the unit normal n\n(camera frame: x right -> red,\n"
                 "y down -> green, z forward -> blue)\nleft: a sphere drawn the same way",
                 fontsize=8, va="top", ha="left")
    else:
        fig.text((x + 2) / W, 1 - (y + 8) / H, key.get("text", ""), fontsize=8.5, va="top", ha="left", wrap=True)


def draw(path, panels, title):
    """Write PANELS ([{"title", "rgb", "key"}]) side by side as one PNG at PATH."""
    from matplotlib.patches import Rectangle

    from .charts import new_figure, save_figure

    ph, pw = panel_size([p["rgb"].shape[:2] for p in panels])
    key_h = max(_key_height(p["key"], pw) for p in panels)
    W = 2 * _PAD + len(panels) * pw + (len(panels) - 1) * _GAP
    H = _HEAD + _TITLE + ph + key_h + _PAD
    fig = new_figure(W, H)
    fig.text(_PAD / W, 1 - 10 / H, title, fontsize=11.5, fontweight="bold", va="top", ha="left")
    for i, p in enumerate(panels):
        x = _PAD + i * (pw + _GAP)
        y = _HEAD + _TITLE
        ax = fig.add_axes([x / W, 1 - (y + ph) / H, pw / W, ph / H])
        ax.imshow(_upscale(p["rgb"], (ph, pw)), interpolation="nearest", aspect="auto", resample=False)
        ax.set_axis_off()  # no spines over the picture's edge pixels: a frame two pixels outside instead
        fig.add_artist(Rectangle(((x - 2.5) / W, 1 - (y + ph + 2.5) / H), (pw + 5) / W, (ph + 5) / H,
                                 transform=fig.transFigure, fill=False, edgecolor="#555", linewidth=0.75))
        fig.text(x / W, 1 - (y - 6) / H, p["title"], fontsize=10, va="bottom", ha="left")
        _draw_key(fig, p["key"], x, y + ph + 4, pw, H, W)
    return save_figure(fig, path)


def save_pictures(viz_dir, outputs: dict, manifest, image=None, x=None, source=None):
    """One PNG per dense output (the input beside it) and ``overview.png`` in VIZ_DIR; returns the
    paths. IMAGE: the RGB image the network saw (uint8 [H, W, 3]); else X, the input tensor, is
    turned back into one. SOURCE: the input's file name, for the titles."""
    os.makedirs(viz_dir, exist_ok=True)
    base = image if image is not None else (input_picture(x, manifest) if x is not None else None)
    tasks = {o["name"]: o.get("task", "unknown") for o in manifest["outputs"]}
    src = manifest.get("source") or {}
    model = src.get("arch") or src.get("file") or "model"
    target = (manifest.get("target") or {}).get("name", "?")
    inp = None
    if base is not None:
        h, w = base.shape[:2]
        what = os.path.basename(str(source)) if source else "the input tensor"
        how = (f"resized to the network's {w}x{h}" if image is not None
               else f"{w}x{h}, the preprocessing undone")
        inp = {"title": f"input: {what}\n{how}", "rgb": base, "key": {"kind": "text", "text": ""}}
    panels, written = [], []
    batch = max((np.asarray(y).shape[0] for y in outputs.values() if np.ndim(y) == 4), default=1)
    of = f" (batch element 0 of {batch})" if batch > 1 else ""
    for name, y in outputs.items():
        y = np.asarray(y)
        if y.ndim != 4:
            continue
        p = render(name, tasks.get(name, "unknown"), y[0], manifest)
        p["title"] += f"\n{y.shape[3]}x{y.shape[2]} output, {y.shape[1]} channel{'s' if y.shape[1] > 1 else ''}"
        panels.append(p)
        path = os.path.join(viz_dir, f"{name}.png")
        draw(path, ([inp] if inp else []) + [p], f"{model} ({target} bundle): {name}{of}")
        written.append(path)
    if panels:
        path = os.path.join(viz_dir, "overview.png")
        draw(path, ([inp] if inp else []) + panels,
             f"{model} ({target} bundle): the input and its {len(panels)} dense output{'s' if len(panels) > 1 else ''}{of}")
        written.append(path)
    return written
