"""``bdp run``: inputs in (``.npy`` or an image), outputs out (``.npz``), pictures (``--viz``)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from bdp.errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def load_npy(path) -> np.ndarray:
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy array ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not isinstance(x, np.ndarray):
        raise InputError(f"{path}: expected one array (.npy), got an archive")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{path}: array of dtype {x.dtype}; expected float32")
    return x


def load_image(path, preprocess: dict, shape) -> tuple[np.ndarray, np.ndarray]:
    """(network input [1, 3, H, W] float32, the resized RGB image uint8 [H, W, 3])."""
    from PIL import Image, UnidentifiedImageError

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: not a readable image ({str(e).splitlines()[0][:160]})") from None
    n, c, h, w = shape
    if c != 3:
        raise InputError(f"{path}: the bundle's input has {c} channels; images give 3 (pass a .npy)")
    rgb = rgb.resize((w, h), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    x = arr.astype(np.float32) * float(preprocess.get("scale", 1 / 255.0))
    x = (x - np.asarray(preprocess.get("mean", [0, 0, 0]), np.float32)) / np.asarray(preprocess.get("std", [1, 1, 1]), np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))
    if n != 1:
        x = np.repeat(x, n, axis=0)
    return x, arr


def load_input(path, manifest) -> tuple[np.ndarray, np.ndarray | None]:
    inp = manifest.input
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".npy":
        x = load_npy(path)
        want = tuple(inp.shape)
        if tuple(x.shape) != want:
            raise InputError(f"{path}: array has shape {tuple(x.shape)}, the bundle expects {want}")
        return x.astype(np.float32), None
    if ext in IMAGE_EXTS:
        if len(inp.shape) != 4:
            raise InputError(f"{path}: the bundle's input has shape {tuple(inp.shape)}, not N,C,H,W; pass a .npy")
        return load_image(path, inp.preprocess or {}, inp.shape)
    raise InputError(f"{path}: unknown input type '{ext}' (expected .npy or an image: {', '.join(IMAGE_EXTS)})")


def save_npz(path, outputs: dict):
    from bdp.files import atomic_path

    with atomic_path(path) as tmp:
        np.savez(tmp, **outputs)


def _viz_owned(manifest):
    """A ``--viz`` folder bdp wrote for this bundle holds only its pictures."""
    from bdp.files import only_these_files

    names = {f"{n}.png" for n in manifest.output_names} | {"overview.png"}
    return lambda folder: only_these_files(folder, names)


def run_bundle(bundle_dir, input_path, out_path=None, viz_dir=None, force=False, trust=None):
    """Run BUNDLE on INPUT; writes OUT.npz (and pictures). Returns {name: array}.

    Both outputs are checked before the run (OUT.npz: not a folder, its parent writable; the
    picture folder: absent, empty or holding only pictures of this bundle's outputs, unless
    FORCE) and written only when both are ready; a failure leaves neither. TRUST: a public key the
    bundle's signature must verify with (default $BDP_TRUST)."""
    from bdp.files import atomic_folder, check_output_file, check_output_folder, remove_quietly

    from .bundle import host_can_run, load_bundle, read_manifest

    manifest = read_manifest(bundle_dir, trust=trust)
    if out_path:
        out_path = check_output_file(out_path, "output .npz")
    if viz_dir:
        viz_dir = check_output_folder(viz_dir, _viz_owned(manifest), force, "picture folder")
    if out_path and viz_dir and out_path == viz_dir:
        raise InputError(f"{out_path}: -o and --viz name the same path")
    x, image = load_input(input_path, manifest)
    ok, _why = host_can_run(manifest)
    if ok:
        outputs = load_bundle(bundle_dir, verify=False, trust=False)(x)  # checked just above
    elif manifest.target.arch == "aarch64":
        outputs = _run_aarch64(bundle_dir, x, manifest)
    else:
        raise InputError(f"{bundle_dir}: cannot run on this host: {_why}")
    existed = out_path is not None and os.path.exists(out_path)
    try:
        if viz_dir:
            from .viz import save_pictures

            with atomic_folder(viz_dir, _viz_owned(manifest), force, "picture folder") as tmp:
                save_pictures(tmp, outputs, manifest, image=image, x=x)
                if out_path:
                    save_npz(out_path, outputs)  # inside: a failure here leaves no pictures
        elif out_path:
            save_npz(out_path, outputs)
    except BaseException:
        if out_path and not existed:
            remove_quietly(out_path)
        raise
    return outputs


def _run_aarch64(bundle_dir, x, manifest):
    """Run an arm64 bundle's own bin/bdp-run under qemu-aarch64 (on a non-ARM host)."""
    from bdp.targets import aarch64

    with tempfile.TemporaryDirectory() as td:
        inp = os.path.join(td, "input.npy")
        np.save(inp, x.astype(np.float32))
        outdir = os.path.join(td, "out")
        os.makedirs(outdir)
        proc = aarch64.run_under_qemu(bundle_dir, inp, outdir)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise InputError(f"{bundle_dir}: bin/bdp-run failed (exit {proc.returncode}): {msg[-1] if msg else ''}")
        return {n: np.load(os.path.join(outdir, n + ".npy"), allow_pickle=False) for n in manifest.output_names}
