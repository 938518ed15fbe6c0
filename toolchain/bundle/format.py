"""Bundles: a folder that runs on the device.

Layout::

    manifest.json      format, format version, versions, target, input, outputs, stats, files + sha256
                       (schema and reader/writer: :mod:`bdp.toolchain.bundle.manifest`)
    manifest.sig       optional: Ed25519 signature of manifest.json's exact bytes, base64, one line
    model.so           the compiled library (Relax VM executable)
    reference.onnx     the source model in float ONNX (for ``bdp profile``'s FP32 baseline and
                       for checks; omitted with ``--no-reference``)
    report.json        what the passes fused and what they left in float, with reasons
    lib/, bin/         arm64/rpi4 only: AArch64 TVM runtime and the native runner ``bin/bdp-run``

Bundles are written atomically: everything goes into a hidden temporary folder beside the
destination, which is renamed into place only when complete. An existing folder is replaced only
when it is a bdp bundle by its manifest holding nothing but the files that manifest lists
(``--force`` replaces any folder).

Loading checks, in this order, before any library is loaded: the manifest against its schema;
the signature when a trust key is configured (``trust=``/``--trust``/``$BDP_TRUST``); that every
path stays inside the bundle; every file's sha256; the target; the ELF structure of
``model.so`` (a truncated library would kill the process by SIGBUS).

Signing (:mod:`bdp.toolchain.bundle.signing`): the signed message is the exact bytes of
``manifest.json``, which hold the sha256 of every other file, so the signature covers the whole
bundle; it lives in ``manifest.sig`` (not listed in the manifest). ``bin/bdp-run --trust KEY.pub``
checks the same signature and hashes with the system's libcrypto before it loads ``model.so``.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

from bdp.errors import InputError, first_line
from bdp.files import atomic_folder, check_output_folder, only_these_files
from bdp.targets.spec import configure_runtime_threads

from . import manifest as _manifest
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, Manifest  # noqa: F401 (re-exported)
from .signing import SIGNATURE

LIBRARY = "model.so"


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
        data = _manifest.read_bytes(folder)
        man = Manifest.from_bytes(data, MANIFEST)
        has_format = b'"format"' in data and json.loads(data).get("format") == FORMAT
    except InputError as e:
        return False, f"its {MANIFEST} is not a bdp bundle manifest ({str(e).split(': ', 1)[-1][:80]})"
    if not has_format:  # a bundle of an older bdp, or someone else's manifest.json: not ours to delete
        return False, f"its {MANIFEST} has no \"format\": \"{FORMAT}\""
    return only_these_files(folder, set(man.files) | {MANIFEST, SIGNATURE})


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


def finalize_manifest(bundle_dir, manifest, sign=None) -> Manifest:
    """Hash every file in BUNDLE_DIR into the manifest's ``files``, check it against the schema
    and write manifest.json; with SIGN (a private key file) also manifest.sig. MANIFEST is a
    :class:`Manifest` or a dict of its fields (without ``files``)."""
    files = {}
    for root, _, names in os.walk(bundle_dir):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, bundle_dir).replace(os.sep, "/")
            if rel in (MANIFEST, SIGNATURE):
                continue
            files[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    if isinstance(manifest, Manifest):
        d = manifest.to_dict()
    else:
        d = dict(manifest)
    d.update(format=FORMAT, format_version=FORMAT_VERSION, files=dict(sorted(files.items())))
    man = Manifest.from_dict(d, where=os.path.join(str(bundle_dir), MANIFEST))
    data = man.write(bundle_dir)
    sig = os.path.join(str(bundle_dir), SIGNATURE)
    if os.path.exists(sig):
        os.remove(sig)  # a signature of the previous bytes
    if sign:
        from .signing import sign_manifest

        sign_manifest(bundle_dir, sign, data)
    return man


def _safe_rel(bundle_dir, rel):
    """The real path of REL inside BUNDLE_DIR; InputError when it leaves the bundle (also through
    a symbolic link)."""
    _manifest.safe_relpath(os.path.join(str(bundle_dir), MANIFEST), "files", rel)
    full = os.path.realpath(os.path.join(bundle_dir, rel))
    root = os.path.realpath(bundle_dir)
    if not full.startswith(root + os.sep):
        raise InputError(f"{bundle_dir}: manifest names a path outside the bundle {rel!r}")
    return full


def read_manifest(bundle_dir, verify=True, trust=None) -> Manifest:
    """Read and check a bundle's manifest: schema, signature (when a trust key is configured:
    TRUST or $BDP_TRUST), paths, and with VERIFY every file's sha256; InputError on any fault."""
    from .signing import trust_key_path, verify_manifest

    bundle_dir = str(bundle_dir)
    data = _manifest.read_bytes(bundle_dir)
    man = Manifest.from_bytes(data, os.path.join(bundle_dir, MANIFEST))
    key = trust_key_path(trust)
    if key:
        verify_manifest(bundle_dir, data, key)
    for rel in man.files:
        _safe_rel(bundle_dir, rel)
    if key:  # a signed bundle is exactly its signed files: nothing unlisted, no links, no devices
        ok, why = only_these_files(bundle_dir, set(man.files) | {MANIFEST, SIGNATURE})
        if not ok:
            raise InputError(f"{bundle_dir}: holds what its signed manifest does not list ({why[len('it holds '):]}); "
                             "with a trust key a bundle must be exactly its signed files (links and special files "
                             "are refused too)")
    if verify or key:
        for rel, meta in man.files.items():
            full = _safe_rel(bundle_dir, rel)
            if not os.path.isfile(full):
                raise InputError(f"{bundle_dir}: bundle is incomplete, {rel} is missing")
            if os.path.getsize(full) != meta.bytes or sha256_file(full) != meta.sha256:
                raise InputError(f"{bundle_dir}: {rel} does not match its sha256 in the manifest (tampered or corrupt); "
                                 "recompile the bundle")
    return man


def host_can_run(manifest) -> tuple[bool, str]:
    """Can this host load the bundle's library? (answered by the target registry)"""
    from bdp.targets.spec import spec_of_manifest

    target = manifest["target"]
    spec = spec_of_manifest(target)
    if spec is None:
        return False, f"built for an unknown target {target.get('name')!r}"
    return spec.host_runnable, spec.why_not_runnable()


class Bundle:
    """A loaded bundle: ``bundle(x) -> {output name: numpy array}``.

    One Bundle may be called from several threads: calls run one at a time (a lock; TVM's Relax
    VM keeps one frame stack per VM, and calls overlapping on it fail or corrupt each other). For
    calls in parallel, load the bundle once per thread."""

    def __init__(self, path, manifest, vm, dev, lib=None):
        import threading

        self._lock = threading.RLock()
        self.path = path
        self.lib = lib  # the loaded model.so (its kernels, for per-op timing)
        self.manifest = manifest
        self._vm = vm
        self._dev = dev
        self.input = manifest.input
        self.output_names = manifest.output_names

    def check_input(self, x):
        import numpy as np

        want = tuple(self.input.shape)
        if not isinstance(x, np.ndarray):
            raise InputError("input must be a numpy array")
        if tuple(x.shape) != want:
            raise InputError(f"input has shape {tuple(x.shape)}, the bundle expects {want} "
                             f"({self.input.name}, {self.input.dtype})")
        if x.dtype != np.dtype(self.input.dtype):
            if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
                x = x.astype(self.input.dtype)
            else:
                raise InputError(f"input has dtype {x.dtype}, the bundle expects {self.input.dtype}")
        return np.ascontiguousarray(x)

    def run_raw(self, tvm_input):
        configure_runtime_threads()  # TVM's pool is per thread: this one's, once (a no-op after)
        try:
            with self._lock:
                return self._vm["main"](tvm_input)
        except (ValueError, TypeError, RuntimeError) as e:  # TVM checks the arguments against the program
            msg = str(e)
            if "match_cast" not in msg and "ErrorContext" not in msg:
                raise
            raise InputError(f"{self.path}: {LIBRARY} does not take the input the manifest describes "
                             f"({self.input.name} {tuple(self.input.shape)} {self.input.dtype}): manifest.json was "
                             "edited or belongs to another library; recompile the bundle") from None

    def to_device(self, x):
        import tvm

        return tvm.runtime.tensor(self.check_input(x), self._dev)

    def outputs_to_dict(self, res):
        if hasattr(res, "numpy"):
            items = [res]
        else:
            items = [res[i] for i in range(len(res))]
        outs = self.manifest.outputs
        if len(items) != len(outs):
            raise InputError(f"{self.path}: {LIBRARY} returned {len(items)} outputs, manifest.json lists {len(outs)}: "
                             "the manifest was edited or belongs to another library; recompile the bundle")
        res = {}
        for o, t in zip(outs, items):
            a = t.numpy()
            if list(a.shape) != list(o.shape) or str(a.dtype) != o.dtype:
                raise InputError(f"{self.path}: output '{o.name}' is {a.dtype} {list(a.shape)}, manifest.json says "
                                 f"{o.dtype} {list(o.shape)}: the manifest was edited or belongs to another library; "
                                 "recompile the bundle")
            res[o.name] = a
        return res

    def __call__(self, x):
        with self._lock:  # outputs are read before another call may reuse the VM's buffers
            return self.outputs_to_dict(self.run_raw(self.to_device(x)))


def load_bundle(bundle_dir, verify=True, trust=None) -> Bundle:
    """Load a bundle built for this host. Everything :func:`read_manifest` checks, then the
    ELF structure of its library, before the library is loaded. TRUST: a public key file the
    manifest's signature must verify with (default $BDP_TRUST; none: unsigned bundles load)."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from bdp.targets import elf

    configure_runtime_threads()  # before TVM's thread pool starts (its first parallel call)
    manifest = read_manifest(bundle_dir, verify=verify, trust=trust)
    ok, why = host_can_run(manifest)
    if not ok:
        raise InputError(f"{bundle_dir}: cannot run on this host: {why}")
    lib_path = _safe_rel(bundle_dir, manifest.library)
    elf.validate(lib_path, manifest.target.arch, what=os.path.join(str(bundle_dir), manifest.library))
    try:
        # not kept alive for the whole process (tvm.runtime.load_module's default puts every
        # loaded module, constants included, on a global list: a robot that reloads its model
        # grew by the model's size on every load); the Bundle holds it
        lib = tvm_ffi.load_module(os.path.realpath(lib_path), keep_module_alive=False)
    except Exception as e:  # TVM raises several kinds for a library it cannot use
        raise InputError(f"{bundle_dir}: cannot load {manifest.library} "
                         f"({first_line(e, 160)})") from None
    dev = tvm.cpu()
    try:
        vm = relax.VirtualMachine(lib, dev)
    except Exception as e:
        raise InputError(f"{bundle_dir}: {manifest.library} is not a Relax VM executable "
                         f"({first_line(e, 160)})") from None
    return Bundle(str(bundle_dir), manifest, vm, dev, lib)
