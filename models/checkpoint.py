"""bdp checkpoints: a dict of plain values and tensors, loadable with ``weights_only=True``.

Layout::

    {"format": "bdp-checkpoint", "version": 1, "arch": "bireal-tiny", "config": {...},
     "state_dict": {name: tensor}, "meta": {...}}

``meta`` may hold training state (epoch, optimizer state, metrics): plain values and tensors.
"""

from __future__ import annotations

import os

import torch

from bdp.errors import InputError, first_line
from bdp.files import atomic_path

FORMAT = "bdp-checkpoint"
VERSION = 1


def save_checkpoint(model, path, meta=None):
    arch = getattr(model, "bdp_arch", None)
    if arch is None:
        raise ValueError("model was not built from the bdp zoo (no bdp_arch)")
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "config": dict(model.bdp_config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


MAX_BYTES = 1 << 30  # a checkpoint file, and what its zip members unpack to


def _check_archive(path):
    """A checkpoint is a zip archive (torch.save's format) of at most MAX_BYTES, unpacked too: a
    small file must not make torch allocate gigabytes (a zip bomb, a storage size that lies)."""
    import zipfile

    try:
        size = os.path.getsize(path)
        zf = zipfile.ZipFile(path)
        unpacked = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise InputError(f"{path}: not a bdp checkpoint (not a zip archive; truncated, or saved with "
                         "_use_new_zipfile_serialization=False?)") from None
    if max(size, unpacked) > MAX_BYTES:
        raise InputError(f"{path}: {max(size, unpacked) / 2**30:.1f} GiB; bdp loads checkpoints up to "
                         f"{MAX_BYTES / 2**30:.0f} GiB")


# what a PyTorch user with their own network does instead of handing bdp a pickle or a state_dict
BRING_YOUR_OWN = ("Export the network: torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2') and "
                  "`bdp compile model.pt2`, or torch.onnx.export to .onnx, or from Python "
                  "bdp.compile(model, x, target=...)")


def _looks_like_weights(obj, depth=0) -> bool:
    """A mapping of names to tensors (a state_dict), or a training checkpoint holding one."""
    if not isinstance(obj, dict) or not obj or depth > 2:
        return False
    if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return True
    return any(_looks_like_weights(v, depth + 1) for k, v in obj.items() if k in ("state_dict", "model", "net",
                                                                                   "model_state_dict", "weights"))


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint dict (``weights_only=True``); InputError on anything wrong."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: is a folder, expected a checkpoint file (.pt)")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals
        text = str(e).strip()
        if "Weights only load failed" in text or "weights_only" in text:
            # torch.save(model): a pickle of the module's class, which only running code from the
            # file could rebuild; bdp never does
            raise InputError(f"{path}: not a bdp checkpoint but a whole pickled model (torch.save(model)); bdp never "
                             f"unpickles code from a file. {BRING_YOUR_OWN}") from None
        first = first_line(e, None)
        raise InputError(f"{path}: not a loadable bdp checkpoint ({first[:200]})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") != FORMAT and _looks_like_weights(ckpt):
        raise InputError(f"{path}: not a bdp checkpoint but a state_dict (weights without the network's code): bdp "
                         f"cannot rebuild your architecture from it. {BRING_YOUR_OWN}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not a bdp checkpoint (no 'format': '{FORMAT}' entry); "
                         "save models with bdp train / bdp init")
    if ckpt.get("version", 0) > VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this bdp reads ({VERSION})")
    for key in ("arch", "config", "state_dict"):
        if key not in ckpt:
            raise InputError(f"{path}: checkpoint has no '{key}' entry")
    if not isinstance(ckpt["arch"], str):
        raise InputError(f"{path}: checkpoint's 'arch' is not a name")
    if not isinstance(ckpt["config"], dict):
        raise InputError(f"{path}: checkpoint's 'config' is not a mapping")
    if not isinstance(ckpt["state_dict"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise InputError(f"{path}: checkpoint's 'state_dict' is not a mapping of names to tensors")
    return ckpt


def load_checkpoint(path, arch: str | None = None):
    """Build the checkpoint's architecture and load its weights; the module is in eval mode."""
    from .zoo import ARCHITECTURES, build_checked

    ckpt = read_checkpoint(path)
    name = ckpt["arch"]
    if arch is not None and name != arch:
        raise InputError(f"{path}: checkpoint is of architecture '{name}', expected '{arch}'")
    if name not in ARCHITECTURES:
        raise InputError(f"{path}: unknown architecture '{name[:60]}' (known: {', '.join(sorted(ARCHITECTURES))})")
    # the config is checked and the model built on the meta device first (no memory): a config
    # asking for 10**9 blocks or 360 GB of weights is refused before anything is allocated
    meta = build_checked(name, ckpt["config"], where=path, device="meta")
    state = ckpt["state_dict"]
    own = meta.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise InputError(f"{path}: missing key '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise InputError(f"{path}: unexpected key '{unexpected[0]}' for architecture '{name}'")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(f"{path}: '{k}' has shape {tuple(state[k].shape)}, architecture '{name}' "
                             f"with this config needs {tuple(v.shape)}")
        t = state[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: '{k}' holds NaN or infinite values (diverged training?); bdp does not "
                             "compile such weights")
    model = build_checked(name, ckpt["config"], where=path)
    model.load_state_dict(state)
    model.eval()
    return model
