"""bdp checkpoints: a dict of plain values and tensors, loadable with ``weights_only=True``.

Layout::

    {"format": "bdp-checkpoint", "version": 1, "arch": "bireal-tiny", "config": {...},
     "state_dict": {name: tensor}, "meta": {...}}

``meta`` may hold training state (epoch, optimizer state, metrics): plain values and tensors.
"""

from __future__ import annotations

import os

import torch

from bdp.errors import InputError
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


def read_checkpoint(path) -> dict:
    """Read and validate a checkpoint dict (``weights_only=True``); InputError on anything wrong."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a loadable bdp checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not a bdp checkpoint (no 'format': '{FORMAT}' entry); "
                         "save models with bdp train / bdp init")
    if ckpt.get("version", 0) > VERSION:
        raise InputError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this bdp reads ({VERSION})")
    for key in ("arch", "config", "state_dict"):
        if key not in ckpt:
            raise InputError(f"{path}: checkpoint has no '{key}' entry")
    return ckpt


def load_checkpoint(path, arch: str | None = None):
    """Build the checkpoint's architecture and load its weights; the module is in eval mode."""
    from .zoo import ARCHITECTURES, build

    ckpt = read_checkpoint(path)
    name = ckpt["arch"]
    if arch is not None and name != arch:
        raise InputError(f"{path}: checkpoint is of architecture '{name}', expected '{arch}'")
    if name not in ARCHITECTURES:
        raise InputError(f"{path}: unknown architecture '{name}' (known: {', '.join(sorted(ARCHITECTURES))})")
    try:
        model = build(name, **ckpt["config"])
    except TypeError as e:
        raise InputError(f"{path}: config does not fit architecture '{name}': {e}") from None
    state = ckpt["state_dict"]
    own = model.state_dict()
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
    model.load_state_dict(state)
    model.eval()
    return model
