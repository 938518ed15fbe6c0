"""Charts (bdp profile / bdp bench, PNG and SVG), the pictures of ``bdp run --viz`` and the image
loader's size cap."""

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

import bdp
from bdp.errors import InputError
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint
from bdp.models.data import CLASS_NAMES

from conftest import assert_input_error, like_trained, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_JSON = os.path.join(ROOT, "docs", "bench.json")
SHAPE = (1, 3, 32, 40)


def svg_text(path):
    """All text of an SVG file (it must parse as XML)."""
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return " ".join(t for el in root.iter() for t in (el.text,) if t)


def png(path):
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    im = Image.open(path)
    im.load()
    return im


def find(big, tile):
    """Top-left corners (y, x) where TILE occurs exactly in BIG (uint8 RGB arrays)."""
    h, w = tile.shape[:2]
    ys, xs = np.nonzero(np.all(big[:big.shape[0] - h + 1, :big.shape[1] - w + 1] == tile[0, 0], axis=-1))
    # narrow the candidates down on a few sample pixels (vectorised), then compare whole tiles
    for sy, sx in np.random.default_rng(0).integers(0, (h, w), size=(48, 2)):
        keep = np.all(big[ys + sy, xs + sx] == tile[sy, sx], axis=-1)
        ys, xs = ys[keep], xs[keep]
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(big[y:y + h, x:x + w], tile)]


def nearest(img, w):
    """IMG enlarged by a whole factor to width W, each pixel a block (computed with numpy)."""
    k = w // img.shape[1]
    assert k * img.shape[1] == w
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("charts")
    torch.manual_seed(0)
    return save_checkpoint(like_trained(zoo.build("bireal-tiny", width=16), shape=SHAPE), str(d / "m.pt"))


@pytest.fixture(scope="module")
def bundle(checkpoint):
    return bdp.compile(checkpoint, target="x86", out=os.path.join(os.path.dirname(checkpoint), "b"), input_shape=SHAPE)


@pytest.fixture(scope="module")
def profile_result(bundle):
    from bdp.toolchain.runtime.profile import profile_local

    return profile_local(bundle, runs=5, warmup=1)


# ---------------------------------------------------------------------------------------------
# charts


def test_profile_chart_png_and_svg(profile_result, tmp_path):
    from bdp.toolchain.runtime.charts import short_op
    from bdp.toolchain.runtime.profile import chart_png

    res = profile_result
    assert res["per_op"] and res["fp32_onnxruntime"]
    im = png(chart_png(tmp_path / "p.png", res))
    assert im.size[0] == 1100 and im.size[1] > 400 and im.mode == "RGBA"
    assert len(np.unique(np.asarray(im).reshape(-1, 4), axis=0)) > 20  # drawn, not blank
    text = svg_text(chart_png(tmp_path / "p.svg", res))
    assert "bdp profile" in text and "onnxruntime FP32" in text and res["host"]["cpu"] in text
    assert "latency per run (ms" in text and "per-op breakdown" in text
    for r in res["per_op"][:5]:  # the top kernels are in the stacked bar's legend
        assert short_op(r["op"]) in text, r["op"]
    assert "onnxruntime INT8" not in text
    # an INT8 baseline is drawn when the result has one
    text8 = svg_text(chart_png(tmp_path / "p8.svg", dict(res, int8_onnxruntime={"median_ms": 1.0, "p90_ms": 1.1,
                                                                                "p99_ms": 1.2})))
    assert "onnxruntime INT8" in text8


def test_bench_chart_from_saved_json(tmp_path):
    from bdp.toolchain.bench import suite as bench
    from bdp.toolchain.bench.chart import chart_from_json
    from bdp.toolchain.runtime.charts import fmt_x

    res = json.load(open(BENCH_JSON))
    im = png(chart_from_json(BENCH_JSON, tmp_path / "b.png"))
    assert im.size[0] == 1400 and im.size[1] > 700
    text = svg_text(chart_from_json(BENCH_JSON, tmp_path / "b.svg"))
    assert res["host"]["cpu"] in text and "log scale" in text
    for m in res["models"]:
        assert m["arch"] in text
        assert fmt_x(m["onnxruntime_fp32"]["median_ms"] / m["bdp"]["median_ms"]) in text
    assert "onnxruntime INT8" not in text and "TVM FP32 (bdp schedules)" in text
    # INT8 columns in either style appear; a failed row is named as left out
    for r in res["layers"]:
        r["onnxruntime_int8"] = {"median_ms": r["onnxruntime_fp32"]["median_ms"] / 2, "min_ms": 0.1, "runs": 3}
    for r in res["models"][1:]:
        r["ort_int8_ms"] = r["onnxruntime_fp32"]["median_ms"] / 3
    res["models"][0] = {"arch": "no-such-net", "error": "RuntimeError: boom"}
    text8 = svg_text(bench.write_chart(str(tmp_path / "b8.svg"), res))
    assert "onnxruntime INT8" in text8 and "n/a" not in text8
    assert "no-such-net" in text8 and "Left out" in text8
    r = res["models"][1]
    assert fmt_x(r["ort_int8_ms"] / r["bdp"]["median_ms"]) in text8


def test_chart_extension_other_than_png_svg_is_exit_2(bundle, tmp_path):
    from bdp.toolchain.runtime.charts import chart_format

    for bad in ("c.pdf", "c.jpg", "c"):
        with pytest.raises(InputError, match="png or .svg"):
            chart_format(tmp_path / bad)
    line = assert_input_error(run_cli("profile", bundle, "--runs", "1", "--chart", tmp_path / "c.pdf"), "c.pdf")
    assert "'.pdf'" in line
    assert_input_error(run_cli("bench", "--quick", "--json", tmp_path / "b.json", "--chart", tmp_path / "b.jpg"),
                       "b.jpg")
    assert not (tmp_path / "b.json").exists()  # refused before the suite ran
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "bdp.toolchain.bench.chart", BENCH_JSON, str(tmp_path / "b.gif")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "b.gif" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# pictures


def test_run_viz_pictures(bundle, tmp_path):
    from bdp.toolchain.runtime.viz import PALETTE, PANEL_MIN_W

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    p = run_cli("run", bundle, "--input", tmp_path / "photo.png", "-o", tmp_path / "o.npz", "--viz", tmp_path / "viz")
    assert p.returncode == 0, p.stderr
    out = dict(np.load(tmp_path / "o.npz"))
    man = json.load(open(os.path.join(bundle, "manifest.json")))
    seg = next(o for o in man["outputs"] if o["task"] == "semseg")
    assert seg["classes"] == CLASS_NAMES  # a checkpoint of the synthetic set's classes
    assert sorted(os.listdir(tmp_path / "viz")) == ["depth.png", "overview.png", "semseg.png"]
    w = PANEL_MIN_W  # 40 columns -> 8x
    photo = np.asarray(Image.open(tmp_path / "photo.png").convert("RGB").resize((SHAPE[3], SHAPE[2]),
                                                                               Image.Resampling.BILINEAR))
    seg_rgb = PALETTE[np.argmax(out["semseg"][0], axis=0)]
    for name in ("semseg", "depth", "overview"):
        im = png(tmp_path / "viz" / f"{name}.png").convert("RGB")
        a = np.asarray(im)
        # the input, each pixel an 8x8 block, is in every picture, one image pixel to one picture pixel
        assert len(find(a, nearest(photo, w))) == 1, name
        if name != "depth":
            assert len(find(a, nearest(seg_rgb, w))) == 1, name
    assert png(tmp_path / "viz" / "overview.png").size[0] >= 3 * w


def test_pictures_of_every_task_from_a_real_model(tmp_path):
    """mtinet's four heads (torch forward, no compile) through save_pictures: one picture per
    task, each panel at least PANEL_MIN_W wide and the picture exactly the data."""
    from matplotlib import colormaps

    from bdp.toolchain.runtime.viz import PANEL_MIN_W, render, save_pictures

    torch.manual_seed(0)
    net = like_trained(zoo.build("mtinet", width=8), shape=(1, 3, 24, 30))
    x = torch.randn(1, 3, 24, 30)
    with torch.no_grad():
        outs = {k: v.numpy() for k, v in net(x).items()}
    assert set(outs) == {"semseg", "depth", "normals", "edges"}
    manifest = {"input": {"shape": [1, 3, 24, 30], "preprocess": {"scale": 1 / 255, "mean": [0] * 3, "std": [1] * 3}},
                "outputs": [{"name": k, "task": k} for k in outs], "source": {"arch": "mtinet"},
                "target": {"name": "x86"}}
    img = np.random.default_rng(1).integers(0, 255, (24, 30, 3), dtype=np.uint8)
    written = save_pictures(tmp_path, outs, manifest, image=img, source="scene.png")
    assert sorted(os.path.basename(p) for p in written) == sorted([f"{k}.png" for k in outs] + ["overview.png"])
    w = 330  # 30 columns -> 11x: the smallest whole factor reaching 320
    assert w >= PANEL_MIN_W
    n = outs["normals"][0] / np.linalg.norm(outs["normals"][0], axis=0, keepdims=True)
    expect = {"normals": ((n.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8),
              "edges": (np.asarray(colormaps["gray_r"](1 / (1 + np.exp(-outs["edges"][0, 0].astype(np.float64)))))
                        [..., :3] * 255).round().astype(np.uint8),
              "semseg": render("semseg", "semseg", outs["semseg"][0])["rgb"],
              "depth": render("depth", "depth", outs["depth"][0])["rgb"]}
    # white = no edge, black = edge: the grey falls as the probability rises
    p = 1 / (1 + np.exp(-outs["edges"][0, 0].astype(np.float64)))
    np.testing.assert_allclose(expect["edges"][..., 0], 255 * (1 - p), atol=2.5)
    overview = np.asarray(Image.open(tmp_path / "overview.png").convert("RGB"))
    assert len(find(overview, nearest(img, w))) == 1
    for k, rgb in expect.items():
        a = np.asarray(Image.open(tmp_path / f"{k}.png").convert("RGB"))
        assert len(find(a, nearest(img, w))) == 1, k
        assert len(find(a, nearest(rgb, w))) == 1, k
        assert len(find(overview, nearest(rgb, w))) == 1, k


def test_class_names_from_manifest_or_numbered():
    from bdp.toolchain.runtime.viz import render

    y = np.zeros((3, 4, 5), np.float32)
    y[1, :1] = 1.0  # the top row class 1, the rest class 0
    named = render("semseg", "semseg", y, {"outputs": [{"name": "semseg", "classes": ["floor", "wall", "sky"]}]})
    assert [e[0] for e in named["key"]["entries"]] == ["floor", "wall"] and named["key"]["entries"][0][2] == 0.75
    plain = render("semseg", "semseg", y, {"outputs": [{"name": "semseg"}]})
    assert [e[0] for e in plain["key"]["entries"]] == ["class 0", "class 1"]
    assert "2 of 3 classes" in plain["key"]["note"]


# ---------------------------------------------------------------------------------------------
# image loading


def test_huge_image_is_an_input_error(bundle, tmp_path, monkeypatch):
    from bdp.toolchain.runtime import run

    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 megapixels in a few kB
    assert big.stat().st_size < 1_000_000
    p = run_cli("run", bundle, "--input", big)
    line = assert_input_error(p, "big.png", "12000x12000", "megapixel limit")
    assert "DecompressionBomb" not in p.stderr + p.stdout and line.startswith("bdp: error:")
    with pytest.raises(InputError, match="over the 64 megapixel limit"):
        run.load_image(big, {}, SHAPE)
    # the cap is bdp's own, not Pillow's: move it and an image just over it is refused, one at it is read
    monkeypatch.setattr(run, "MAX_IMAGE_PIXELS", 60 * 50)
    Image.new("RGB", (60, 50), (255, 0, 0)).save(tmp_path / "at.png")
    Image.new("RGB", (61, 50), (255, 0, 0)).save(tmp_path / "over.png")
    x, arr = run.load_image(tmp_path / "at.png", {"scale": 1 / 255}, SHAPE)
    assert arr.shape == (32, 40, 3) and np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1:], 0.0)
    with pytest.raises(InputError, match="61x50"):
        run.load_image(tmp_path / "over.png", {}, SHAPE)


def test_image_preprocessing_and_orientation(tmp_path):
    from bdp.toolchain.runtime.run import load_image

    rng = np.random.default_rng(3)
    src = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "a.png")
    pre = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x, arr = load_image(tmp_path / "a.png", pre, (2, 3, 32, 40))
    want = np.asarray(Image.fromarray(src).resize((40, 32), Image.Resampling.BILINEAR), np.float64)
    want = (want / 255 - np.array(pre["mean"])) / np.array(pre["std"])
    assert x.shape == (2, 3, 32, 40) and x.dtype == np.float32
    np.testing.assert_allclose(x[1], want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    # EXIF orientation 6 (the camera was turned): the picture is shown upright, as a viewer shows it
    tall = np.zeros((40, 32, 3), np.uint8)
    tall[:20] = (255, 0, 0)  # upright: red on top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees counter-clockwise; rotate clockwise to show
    Image.fromarray(tall).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "r.jpg", exif=exif, quality=95)
    _, up = load_image(tmp_path / "r.jpg", {}, (1, 3, 40, 32))
    assert up[:16, :, 0].mean() > 200 and up[24:, :, 0].mean() < 60
