"""``bdp run``: inputs in (``.npy`` or an image), outputs out (``.npz``), pictures (``--viz``)."""

from __future__ import annotations

import os

import numpy as np

from bdp.errors import InputError, first_line

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 64_000_000  # input images larger than this are refused (decompression bombs)


MAX_NPY_BYTES = 1 << 30  # an input array (README: "an input of at most 1 GiB")


def _npy_header(path, f):
    """(shape, dtype, data bytes) of the open .npy file F, from its header alone; InputError when
    it is not one, holds objects or is over :data:`MAX_NPY_BYTES`."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npf.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npf.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = npf._read_array_header(f, version)
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy array "
                         f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if dtype.hasobject or not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise InputError(f"{path}: array of dtype {dtype}; expected float32")
    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * dtype.itemsize
    if nbytes > MAX_NPY_BYTES:
        raise InputError(f"{path}: array of shape {tuple(shape)} {dtype} is {nbytes / 2**30:.1f} GiB, over the "
                         f"{MAX_NPY_BYTES / 2**30:.0f} GiB limit for an input")
    return tuple(shape), dtype, nbytes


def load_npy(path, shape=None) -> np.ndarray:
    """The array in the .npy file PATH; its header is checked first (dtype, size, and SHAPE when
    given) so that a wrong or huge array is refused before its data is read."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            got, _dtype, nbytes = _npy_header(path, f)
            if shape is not None and got != tuple(shape):
                raise InputError(f"{path}: array has shape {got}, the bundle expects {tuple(shape)}")
            have = os.fstat(f.fileno()).st_size - f.tell()
            if have < nbytes:
                raise InputError(f"{path}: truncated .npy ({have:,} bytes of data, its header says {nbytes:,})")
            f.seek(0)
            x = np.load(f, allow_pickle=False)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy array ({first_line(e, 160)})") from None
    if not isinstance(x, np.ndarray):
        raise InputError(f"{path}: expected one array (.npy), got an archive")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{path}: array of dtype {x.dtype}; expected float32")
    return x


def load_image(path, preprocess: dict, shape) -> tuple[np.ndarray, np.ndarray]:
    """(network input [N, 3, H, W] float32, the resized RGB image uint8 [H, W, 3]).

    Pillow reads the file (the EXIF orientation applied, as a photo viewer shows it), converts it
    to RGB and resizes it to the bundle's H x W (bilinear); numpy scales and normalises it as the
    manifest's ``preprocess`` says. Images over :data:`MAX_IMAGE_PIXELS` are refused from their
    header, before anything is decoded (a small file can declare a huge image)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    n, c, h, w = shape
    if c != 3:
        raise InputError(f"{path}: the bundle's input has {c} channels; images give 3 (pass a .npy)")
    limit = f"the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixel limit for input images"
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 MP and raises from ~179 MP; bdp's own, lower cap decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                iw, ih = im.size
                if iw * ih > MAX_IMAGE_PIXELS:
                    raise InputError(f"{path}: image of {iw}x{ih} pixels ({iw * ih / 1e6:.0f} megapixels) "
                                     f"is over {limit}")
                im.load()
                rgb = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError:
        raise InputError(f"{path}: image is over {limit} (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        msg = first_line(e, 160)
        raise InputError(f"{path}: not a readable image ({msg})") from None
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    mean = np.asarray(preprocess.get("mean", [0, 0, 0]), np.float32)
    std = np.asarray(preprocess.get("std", [1, 1, 1]), np.float32)
    x = (arr.astype(np.float32) * np.float32(preprocess.get("scale", 1 / 255.0)) - mean) / std
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    if n != 1:
        x = np.repeat(x, n, axis=0)
    return x, arr


def load_input(path, manifest) -> tuple[np.ndarray, np.ndarray | None]:
    inp = manifest.input
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".npy":
        x = load_npy(path, inp.shape)
        want = tuple(inp.shape)
        if tuple(x.shape) != want:
            raise InputError(f"{path}: array has shape {tuple(x.shape)}, the bundle expects {want}")
        return x.astype(np.float32), None
    if ext in IMAGE_EXTS:
        if (inp.preprocess or {}).get("kind", "image") != "image" or len(inp.shape) != 4:
            raise InputError(f"{path}: this bundle's input {inp.name} {list(inp.shape)} is not an image; "
                             "pass the tensor as a .npy file")
        return load_image(path, inp.preprocess or {}, inp.shape)
    raise InputError(f"{path}: unknown input type '{ext}' (expected .npy or an image: {', '.join(IMAGE_EXTS)})")


def save_npz(path, outputs: dict):
    from bdp.files import atomic_path

    import io

    buf = io.BytesIO()  # zipfile seeks back: built in memory, then written (a device or FIFO cannot seek)
    np.savez(buf, **outputs)  # a file object: numpy appends no ".npz" to a name without it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def device_of(manifest):
    """The device module (:mod:`bdp.targets.devices`) that runs a bundle of MANIFEST's target
    through its own runner, or None."""
    from bdp.targets.devices import get_device
    from bdp.targets.spec import spec_of_manifest

    spec = spec_of_manifest(manifest["target"])
    return get_device(spec.device) if spec is not None and spec.device else None


def _viz_owned(manifest, also=None):
    """A ``--viz`` folder bdp wrote for this bundle holds only its pictures, and ALSO (the
    ``-o`` file's path inside it, '/'-separated, when ``-o`` names a file in the folder: the same
    command wrote it there before)."""
    from bdp.files import only_these_files

    names = {f"{n}.png" for n in manifest.output_names} | {"overview.png"}
    if also:
        names.add(also)
    return lambda folder: only_these_files(folder, names)


def run_bundle(bundle_dir, input_path, out_path=None, viz_dir=None, force=False, trust=None):
    """Run BUNDLE on INPUT; writes OUT.npz (and pictures). Returns {name: array}.

    Both outputs are checked before the run (OUT.npz: not a folder, its parent writable; the
    picture folder: absent, empty or holding only pictures of this bundle's outputs, unless
    FORCE) and written only when both are ready; a failure leaves neither. TRUST: a public key the
    bundle's signature must verify with (default $BDP_TRUST)."""
    from bdp.files import (atomic_folder, check_output_file, check_output_folder, is_inside, refuse_inside,
                           remove_quietly)

    from bdp.toolchain.bundle.format import host_can_run, load_bundle, read_manifest

    manifest = read_manifest(bundle_dir, trust=trust)
    if out_path:
        out_path = check_output_file(out_path, "output .npz")
        refuse_inside(out_path, bundle_dir, "output .npz", "bundle")
    inner = None  # the -o file's path inside the picture folder, when it lies there
    if viz_dir:
        refuse_inside(viz_dir, bundle_dir, "picture folder", "bundle")
        viz_abs = os.path.abspath(os.fspath(viz_dir))
        if out_path and out_path == viz_abs:
            raise InputError(f"{out_path}: -o and --viz name the same path")
        if out_path and out_path.startswith(viz_abs.rstrip(os.sep) + os.sep):
            inner = os.path.relpath(out_path, viz_abs).replace(os.sep, "/")
            if inner in {f"{n}.png" for n in manifest.output_names} | {"overview.png"}:
                raise InputError(f"{out_path}: -o names a picture that --viz writes; choose another name")
        if input_path is not None and is_inside(input_path, viz_abs):
            raise InputError(f"{input_path}: the input lies inside the picture folder {viz_abs}, which --viz "
                             "replaces; keep inputs outside it")
        viz_dir = check_output_folder(viz_dir, _viz_owned(manifest, inner), force, "picture folder")
    x, image = load_input(input_path, manifest)
    ok, _why = host_can_run(manifest)
    if ok:
        outputs = load_bundle(bundle_dir, verify=False, trust=False)(x)  # checked just above
    elif device_of(manifest) is not None:
        outputs = device_of(manifest).run_bundle(bundle_dir, x, manifest.output_names)
    else:
        raise InputError(f"{bundle_dir}: cannot run on this host: {_why}")
    existed = out_path is not None and os.path.exists(out_path)
    try:
        if viz_dir:
            from .viz import save_pictures

            with atomic_folder(viz_dir, _viz_owned(manifest, inner), force, "picture folder") as tmp:
                save_pictures(tmp, outputs, manifest, image=image, x=x, source=input_path)
                if inner:  # -o inside the picture folder: written into the folder being built
                    dest = os.path.join(tmp, *inner.split("/"))
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    save_npz(dest, outputs)
                elif out_path:
                    save_npz(out_path, outputs)  # inside: a failure here leaves no pictures
        elif out_path:
            save_npz(out_path, outputs)
    except BaseException:
        if out_path and not existed:
            remove_quietly(out_path)
        raise
    return outputs

