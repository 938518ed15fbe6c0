"""Small PNG charts drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import os


def bar_chart(path, title, bars, unit="ms", width=900):
    """Horizontal bars: [(label, value)]; writes a PNG at PATH."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row, pad, label_w = 22, 10, 300
    h = pad * 3 + 20 + row * max(1, len(bars))
    img = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), title, fill="black", font=font)
    vmax = max([v for _, v in bars if v is not None] + [1e-9])
    colours = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (117, 80, 123), (193, 125, 17)]
    for i, (label, v) in enumerate(bars):
        y = pad * 2 + 20 + i * row
        d.text((pad, y + 4), str(label)[:48], fill="black", font=font)
        if v is None:
            d.text((label_w, y + 4), "n/a", fill="gray", font=font)
            continue
        bw = int((width - label_w - 120) * v / vmax)
        d.rectangle([label_w, y + 2, label_w + max(bw, 1), y + row - 4], fill=colours[i % len(colours)])
        d.text((label_w + bw + 6, y + 4), f"{v:.3f} {unit}" if unit else f"{v:.3g}", fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
