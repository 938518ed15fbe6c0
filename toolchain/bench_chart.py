"""The ``bdp bench`` chart: speed-ups over onnxruntime FP32, one panel per section (Pillow only)."""

from __future__ import annotations

import math
import os

COLOURS = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (117, 80, 123), (193, 125, 17), (85, 87, 83)]


def speedup_chart(path, title, sections, width=1000):
    """Horizontal grouped bars on a log scale.

    SECTIONS: [{"title": str, "target": float or None, "series": [names],
    "rows": [(label, [value or None per series])]}]; values are speed-ups (x times faster than the
    baseline, 1 = as fast). A dashed line marks 1x and, when given, the section's target.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, label_w, bar_h, gap = 12, 230, 14, 8
    plot_l, plot_r = label_w + pad, width - 90
    values = [v for s in sections for _, vs in s["rows"] for v in vs if v]
    vmax = max(values + [s.get("target") or 1 for s in sections] + [2.0])
    vmin = min(values + [1.0])
    lo, hi = math.log10(min(vmin, 1.0) / 1.5), math.log10(vmax * 1.5)

    def xpos(v):
        return plot_l + (plot_r - plot_l) * (math.log10(v) - lo) / (hi - lo)

    height = pad * 2 + 24
    for s in sections:
        height += 56 + len(s["rows"]) * (len(s["series"]) * bar_h + gap)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), title, fill="black", font=font)
    y = pad + 24
    for s in sections:
        d.text((pad, y), s["title"], fill="black", font=font)
        y += 16
        # legend
        lx = plot_l
        for i, name in enumerate(s["series"]):
            d.rectangle([lx, y + 2, lx + 10, y + 12], fill=COLOURS[i % len(COLOURS)])
            d.text((lx + 14, y), name, fill="black", font=font)
            lx += 24 + 7 * len(name)
        y += 22
        top = y
        for label, vals in s["rows"]:
            d.text((pad, y + 2), str(label)[:36], fill="black", font=font)
            for i, v in enumerate(vals):
                yy = y + i * bar_h
                if not v:
                    d.text((plot_l + 4, yy), "n/a", fill="gray", font=font)
                    continue
                x1 = xpos(v)
                x0 = xpos(10 ** lo)
                d.rectangle([x0, yy + 1, max(x1, x0 + 1), yy + bar_h - 2], fill=COLOURS[i % len(COLOURS)])
                d.text((max(x1, x0) + 4, yy), f"{v:.2f}x", fill="black", font=font)
            y += len(vals) * bar_h + gap
        bottom = y
        for v, colour in ((1.0, (120, 120, 120)), (s.get("target"), (204, 0, 0))):
            if not v:
                continue
            x = xpos(v)
            for yy in range(top, bottom, 6):
                d.line([x, yy, x, min(yy + 3, bottom)], fill=colour)
            d.text((x + 2, bottom), f"{v:g}x" + (" target" if v != 1.0 else ""), fill=colour, font=font)
        y = bottom + 18
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
