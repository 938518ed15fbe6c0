"""Bundles: a folder that runs on the device.

Layout::

    manifest.json      format version, versions, target, input, outputs, stats, files + sha256
    model.so           the compiled library (Relax VM executable)
    reference.onnx     the source model in float ONNX (for ``bdp profile``'s FP32 baseline and
                       for checks; omitted with ``--no-reference``)
    report.json        what the passes fused and what they left in float, with reasons
    lib/, bin/         arm64/rpi4 only: AArch64 TVM runtime and the native runner ``bin/bdp-run``

Bundles are written atomically: everything goes into a hidden temporary folder beside the
destination, which is renamed into place only when complete. Loading checks the format
version, the target, that every path stays inside the bundle, and every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from contextlib import contextmanager

from bdp.errors import InputError
from bdp.files import atomic_folder, check_output_folder, only_these_files

FORMAT = "bdp-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
LIBRARY = "model.so"
MAX_MANIFEST_BYTES = 1 << 20


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def bundle_owned(folder) -> tuple[bool, str]:
    """(True, "") when FOLDER is a bdp bundle by its manifest (``"format": "bdp-bundle"``) and
    holds nothing but the files that manifest lists (and the manifest and its signature): only
    then may a compile replace it. Else (False, why)."""
    try:
        with open(os.path.join(folder, MANIFEST), "rb") as f:
            man = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False, f"no readable {MANIFEST}"
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        return False, f"its {MANIFEST} is not a bdp bundle manifest"
    files = man.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) for k in files):
        return False, f"its {MANIFEST} lists no files"
    return only_these_files(folder, set(files) | {MANIFEST, SIGNATURE})


def check_bundle_output(out, force=False) -> str:
    """Raise InputError unless OUT may be written as a bundle (see :func:`bundle_owned`)."""
    return check_output_folder(out, bundle_owned, force, "bdp bundle")


@contextmanager
def atomic_bundle(out, force=False):
    """Yield a temporary folder; on success it replaces OUT, on failure it vanishes. OUT is
    replaced only when it is absent, empty or a bundle holding nothing but its files (else
    InputError; FORCE replaces any folder)."""
    with atomic_folder(out, bundle_owned, force, "bdp bundle") as tmp:
        yield tmp


def finalize_manifest(bundle_dir, manifest: dict):
    """Hash every file in BUNDLE_DIR into manifest['files'] and write manifest.json."""
    files = {}
    for root, _, names in os.walk(bundle_dir):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, bundle_dir).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            files[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = dict(sorted(files.items()))
    with open(os.path.join(bundle_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def _safe_rel(bundle_dir, rel):
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or rel.startswith("\\"):
        raise InputError(f"{bundle_dir}: manifest names an unsafe path {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts):
        raise InputError(f"{bundle_dir}: manifest names a path outside the bundle {rel!r}")
    full = os.path.realpath(os.path.join(bundle_dir, rel))
    root = os.path.realpath(bundle_dir)
    if not full.startswith(root + os.sep):
        raise InputError(f"{bundle_dir}: manifest names a path outside the bundle {rel!r}")
    return full


def read_manifest(bundle_dir, verify=True) -> dict:
    """Read and check a bundle's manifest (format, paths, hashes); InputError on any fault."""
    bundle_dir = str(bundle_dir)
    if not os.path.isdir(bundle_dir):
        raise InputError(f"{bundle_dir}: no such bundle folder")
    mpath = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(mpath):
        raise InputError(f"{bundle_dir}: not a bdp bundle (no {MANIFEST})")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        raise InputError(f"{mpath}: corrupt manifest (not valid JSON)") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{mpath}: corrupt manifest")
    fv = manifest.get("format_version")
    if not isinstance(fv, int):
        raise InputError(f"{mpath}: manifest has no format_version")
    if fv > FORMAT_VERSION:
        raise InputError(f"{bundle_dir}: bundle format {fv} is newer than this bdp reads ({FORMAT_VERSION}); upgrade bdp")
    for key in ("target", "input", "outputs", "files"):
        if key not in manifest:
            raise InputError(f"{mpath}: manifest has no '{key}'")
    files = manifest["files"]
    if not isinstance(files, dict) or LIBRARY not in files:
        raise InputError(f"{mpath}: manifest lists no {LIBRARY}")
    for rel in files:
        _safe_rel(bundle_dir, rel)
    for key in ("library",):
        if key in manifest:
            _safe_rel(bundle_dir, manifest[key])
    if verify:
        for rel, meta in files.items():
            full = _safe_rel(bundle_dir, rel)
            if not os.path.isfile(full):
                raise InputError(f"{bundle_dir}: bundle is incomplete, {rel} is missing")
            want = meta.get("sha256") if isinstance(meta, dict) else None
            if not want or sha256_file(full) != want:
                raise InputError(f"{bundle_dir}: {rel} does not match its sha256 in the manifest (tampered or corrupt); "
                                 "recompile the bundle")
    return manifest


def host_can_run(manifest) -> tuple[bool, str]:
    target = manifest.get("target", {})
    arch = target.get("arch")
    machine = platform.machine().lower()
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if arch == "cuda":
        return False, "a CUDA bundle needs an NVIDIA GPU and TVM's CUDA runtime"
    if arch != host:
        return False, f"built for {arch} ({target.get('name')}), this host is {host}"
    return True, ""


class Bundle:
    """A loaded bundle: ``bundle(x) -> {output name: numpy array}``."""

    def __init__(self, path, manifest, vm, dev, lib=None):
        self.path = path
        self.lib = lib  # the loaded model.so (its kernels, for per-op timing)
        self.manifest = manifest
        self._vm = vm
        self._dev = dev
        self.input = manifest["input"]
        self.output_names = [o["name"] for o in manifest["outputs"]]

    def check_input(self, x):
        import numpy as np

        want = tuple(self.input["shape"])
        if not isinstance(x, np.ndarray):
            raise InputError("input must be a numpy array")
        if tuple(x.shape) != want:
            raise InputError(f"input has shape {tuple(x.shape)}, the bundle expects {want} "
                             f"({self.input['name']}, {self.input['dtype']})")
        if x.dtype != np.dtype(self.input["dtype"]):
            if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
                x = x.astype(self.input["dtype"])
            else:
                raise InputError(f"input has dtype {x.dtype}, the bundle expects {self.input['dtype']}")
        return np.ascontiguousarray(x)

    def run_raw(self, tvm_input):
        return self._vm["main"](tvm_input)

    def to_device(self, x):
        import tvm

        return tvm.runtime.tensor(self.check_input(x), self._dev)

    def outputs_to_dict(self, res):
        if hasattr(res, "numpy"):
            items = [res]
        else:
            items = [res[i] for i in range(len(res))]
        if len(items) != len(self.output_names):
            raise RuntimeError(f"bundle returned {len(items)} outputs, manifest lists {len(self.output_names)}")
        return {n: t.numpy() for n, t in zip(self.output_names, items)}

    def __call__(self, x):
        return self.outputs_to_dict(self.run_raw(self.to_device(x)))


def load_bundle(bundle_dir, verify=True) -> Bundle:
    import tvm
    from tvm import relax

    from bdp.targets.spec import configure_runtime_threads

    configure_runtime_threads()  # before TVM's thread pool starts (its first parallel call)
    manifest = read_manifest(bundle_dir, verify=verify)
    ok, why = host_can_run(manifest)
    if not ok:
        raise InputError(f"{bundle_dir}: cannot run on this host: {why}")
    lib_path = _safe_rel(bundle_dir, LIBRARY)
    try:
        lib = tvm.runtime.load_module(lib_path)
    except Exception as e:
        raise InputError(f"{bundle_dir}: cannot load {LIBRARY} ({str(e).strip().splitlines()[0][:160]})") from None
    dev = tvm.cpu()
    vm = relax.VirtualMachine(lib, dev)
    return Bundle(str(bundle_dir), manifest, vm, dev, lib)
