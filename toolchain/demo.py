"""``bdp demo``: train a small model, compile it, run it on a real photograph, profile it.

Everything lands in one folder (default ``demo-out/``)::

    model.pt                 the trained checkpoint
    bundle-x86/              the x86 bundle
    bundle-rpi4/             the Raspberry Pi 4 bundle (when the cross tools are installed)
    photo/                   the photograph's pictures (input beside every dense output), outputs.npz
    synthetic-scene.png      a synthetic scene (the input of ...)
    synthetic/               ... its pictures and outputs.npz
    profile.json, profile.png

A second run replaces what the first one wrote. A folder holding anything else (a user's file
beside the demo's, or inside one of its folders) is refused with exit code 2, unless FORCE.
"""

from __future__ import annotations

import os
import re
import shutil

import click
import numpy as np

PHOTO = "motorcycle_left.png"  # an indoor photograph shipped in scikit-image's wheel


def photo_path():
    """Path of a real photograph shipped inside a PyPI package (scikit-image), or None."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = os.path.join(root, "data", PHOTO)
        if os.path.isfile(p):
            return p
    return None


# what the demo writes at the top of its folder (anything else there is the user's)
DEMO_FILES = ("model.pt", "bundle-x86", "bundle-rpi4", "photo", "synthetic", "synthetic-scene.png",
              "profile.json", "profile.png", ".bundle-x86-small", "x_small.npy")
# temporaries of an interrupted demo (files.py's .NAME.tmp-PID-XXXX / .NAME.old-PID-XXXX)
_TEMP = re.compile(r"\.(?:%s)\.(?:tmp|old)-\d+-[A-Za-z0-9_]+(?:\.[A-Za-z0-9]+)?" % "|".join(map(re.escape, DEMO_FILES)))


def check_demo_folder(out, force=False):
    """InputError unless OUT is absent, a folder holding only what the demo writes, or FORCE."""
    from bdp.errors import InputError
    from bdp.files import check_output_folder

    def owned(folder):
        extra = sorted(n for n in os.listdir(folder) if n not in DEMO_FILES and not _TEMP.fullmatch(n))
        return (not extra), (f"it holds {', '.join(extra[:3])}" if extra else "")

    def pictures(folder):  # a picture folder of the demo: PNGs of the outputs and outputs.npz
        extra = sorted(n for n in os.listdir(folder)
                       if not (n == "outputs.npz" or n.endswith(".png")) or not os.path.isfile(os.path.join(folder, n)))
        return (not extra), (f"it holds {', '.join(extra[:3])}" if extra else "")

    if os.path.isdir(out) and force:
        return
    check_output_folder(out, owned, False, "demo folder")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"{out}: exists and is not a folder")
    # every folder the demo will replace, checked now: a refusal comes before any training
    from .bundle.format import check_bundle_output

    for name in ("bundle-x86", "bundle-rpi4", ".bundle-x86-small"):
        if os.path.lexists(os.path.join(out, name)):
            check_bundle_output(os.path.join(out, name))
    for name in ("photo", "synthetic"):
        if os.path.lexists(os.path.join(out, name)):
            check_output_folder(os.path.join(out, name), pictures, False, "picture folder")


def run_demo(out="demo-out", arch="bireal-tiny", epochs=4, size=(128, 160), n_train=256, rpi4=True, force=False):
    from bdp.models import train as _train

    from .compile import compile_model
    from .runtime.profile import chart_png, format_text, profile_local, write_json
    from .runtime.run import run_bundle

    check_demo_folder(out, force)
    os.makedirs(out, exist_ok=True)
    ck = os.path.join(out, "model.pt")
    click.secho(f"[1/5] training {arch} on the synthetic scene set ({epochs} epochs)", bold=True)
    _train.train(arch, ck, epochs=epochs, data="synth", size=(64, 80), n_train=n_train, progress=True)

    click.secho(f"[2/5] compiling for x86 at {size[0]}x{size[1]}", bold=True)
    bx = os.path.join(out, "bundle-x86")
    compile_model(ck, target="x86", out=bx, input_shape=(1, 3, *size), progress=True, verify=True, force=force)
    from .bundle.format import read_manifest

    st = read_manifest(bx, verify=False).stats
    click.echo(f"      {st['binary_convs']} binary convs packed-bit, {st['fp_convs']} float convs, "
               f"weights {st['weights_bytes'] / 1024:.1f} KiB")

    click.secho("[3/5] running on a photograph and on a synthetic scene", bold=True)
    photo = photo_path()
    if photo:
        run_bundle(bx, photo, os.path.join(out, "photo", "outputs.npz"), os.path.join(out, "photo"), force=force)
        click.echo(f"      {photo} -> {out}/photo/overview.png")
    else:
        click.echo("      (scikit-image not installed: no photograph; `pip install scikit-image`)")
    try:
        from PIL import Image

        from bdp.models.data import SyntheticScenes

        ds = SyntheticScenes(1, size=size, seed=12345)
        img = _denormalize(ds[0][0].numpy())
        syn = os.path.join(out, "synthetic-scene.png")
        from bdp.files import atomic_path

        with atomic_path(syn) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        run_bundle(bx, syn, os.path.join(out, "synthetic", "outputs.npz"), os.path.join(out, "synthetic"),
                   force=force)
        click.echo(f"      {syn} -> {out}/synthetic/overview.png")
    except ImportError:
        pass

    click.secho("[4/5] profiling on this host", bold=True)
    res = profile_local(bx, runs=30, warmup=3)
    click.echo(format_text(res))
    write_json(os.path.join(out, "profile.json"), res)
    chart_png(os.path.join(out, "profile.png"), res)

    click.secho("[5/5] Raspberry Pi 4 bundle", bold=True)
    from bdp.targets.devices import aarch64

    ok, why = aarch64.tools_available()
    if not rpi4:
        click.echo("      skipped (--no-rpi4)")
    elif not ok:
        click.echo(f"      skipped: {why}")
    else:
        br = os.path.join(out, "bundle-rpi4")
        small = (1, 3, 64, 80)  # qemu emulates the Pi slowly: a small input for the check
        compile_model(ck, target="rpi4", out=br, input_shape=small, progress=True, force=force)
        bx_small = os.path.join(out, ".bundle-x86-small")
        compile_model(ck, target="x86", out=bx_small, input_shape=small, force=force)
        x = np.random.default_rng(0).standard_normal(small).astype(np.float32)
        np.save(os.path.join(out, "x_small.npy"), x)
        arm = run_bundle(br, os.path.join(out, "x_small.npy"))
        ref = run_bundle(bx_small, os.path.join(out, "x_small.npy"))
        diff = max(float(np.abs(arm[k] - ref[k]).max()) for k in ref)
        shutil.rmtree(bx_small, ignore_errors=True)
        os.remove(os.path.join(out, "x_small.npy"))
        click.echo(f"      {br}/ ran under qemu-aarch64 through its own bin/bdp-run: max |arm - x86| = {diff:.2e}")
        click.echo(f"      copy {br}/ to a Pi 4 and run: ./bin/bdp-run . input.npy out/")
    click.secho(f"done: see {out}/", bold=True)


def _denormalize(x):
    from bdp.models import data as _data

    mean = np.asarray(getattr(_data, "IMAGE_MEAN", [0.485, 0.456, 0.406]), np.float32)
    std = np.asarray(getattr(_data, "IMAGE_STD", [0.229, 0.224, 0.225]), np.float32)
    img = x.transpose(1, 2, 0) * std + mean
    return (img * 255).clip(0, 255).astype(np.uint8)
