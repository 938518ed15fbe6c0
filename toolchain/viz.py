"""Pictures of dense outputs: segmentation palette, depth colormap, normals as RGB, edges.

``save_pictures`` writes one PNG per output (input on the left, prediction on the right) and an
``overview.png`` with the input and every output side by side.
"""

from __future__ import annotations

import os

import numpy as np

# a 20-colour qualitative palette (class i -> RGB)
PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32], [0, 0, 0],
], dtype=np.uint8)

# anchor colours of a perceptual "magma-like" map, interpolated linearly
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """Map a 2-D array to RGB uint8 (robust 2nd..98th percentile range; near is bright)."""
    v = np.asarray(v, dtype=np.float32)
    finite = v[np.isfinite(v)]
    lo, hi = (np.percentile(finite, 2), np.percentile(finite, 98)) if finite.size else (0.0, 1.0)
    t = np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1)
    t = 1.0 - t  # near = bright
    pos = t * (len(_CMAP) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_CMAP) - 2)
    f = (pos - i)[..., None]
    return (_CMAP[i] * (1 - f) + _CMAP[i + 1] * f).astype(np.uint8)


def render(name: str, task: str, y: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] picture of one output [C, H, W] (first batch element)."""
    if task == "semseg" or (task == "unknown" and y.shape[0] > 3):
        return PALETTE[np.argmax(y, axis=0) % len(PALETTE)]
    if task == "normals" or (task == "unknown" and y.shape[0] == 3):
        n = y[:3] / np.maximum(np.linalg.norm(y[:3], axis=0, keepdims=True), 1e-6)
        return ((n.transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    if task == "edges":
        p = 1.0 / (1.0 + np.exp(-y[0]))
        g = (255 * (1.0 - p)).astype(np.uint8)
        return np.stack([g, g, g], -1)
    return colormap(y[0])


def input_picture(x: np.ndarray, manifest) -> np.ndarray:
    pre = manifest["input"].get("preprocess", {})
    img = x[0, :3].transpose(1, 2, 0) * np.asarray(pre.get("std", [1, 1, 1])) + np.asarray(pre.get("mean", [0, 0, 0]))
    img = img / float(pre.get("scale", 1 / 255.0))
    return img.clip(0, 255).astype(np.uint8)


def _fit(img, h, w):
    from PIL import Image

    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.NEAREST))


def save_pictures(viz_dir, outputs: dict, manifest, image=None, x=None):
    from PIL import Image

    os.makedirs(viz_dir, exist_ok=True)
    base = image if image is not None else (input_picture(x, manifest) if x is not None else None)
    tasks = {o["name"]: o.get("task", "unknown") for o in manifest["outputs"]}
    tiles = []
    written = []
    for name, y in outputs.items():
        if y.ndim != 4:
            continue
        pic = render(name, tasks.get(name, "unknown"), y[0])
        h, w = pic.shape[:2]
        row = [pic] if base is None else [_fit(base, h, w), pic]
        path = os.path.join(viz_dir, f"{name}.png")
        Image.fromarray(np.concatenate(row, axis=1)).save(path)
        written.append(path)
        tiles.append(pic)
    if tiles:
        h, w = tiles[0].shape[:2]
        row = ([_fit(base, h, w)] if base is not None else []) + [_fit(t, h, w) for t in tiles]
        path = os.path.join(viz_dir, "overview.png")
        Image.fromarray(np.concatenate(row, axis=1)).save(path)
        written.append(path)
    return written
