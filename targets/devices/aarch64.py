"""AArch64 (arm64 / Raspberry Pi 4) device files for a bundle, and running them under qemu.

A bundle for an AArch64 target is made self-contained here: next to its ``model.so`` (a
Relax VM executable cross-linked with ``aarch64-linux-gnu-g++``) go

- ``lib/libtvm_runtime.so`` and ``lib/libtvm_ffi.so``: the TVM runtime from PyPI's aarch64
  ``apache-tvm`` / ``apache-tvm-ffi`` wheels, the same versions as installed here;
- ``bin/bdp-run``: a native runner (``targets/devices/runtime/bdp_run.cc``) linked with rpath
  ``$ORIGIN/../lib``, so the folder can be moved anywhere;
- ``README.device.md``: how to run it on the device, and the glibc / libstdc++ it needs.

``bin/bdp-run BUNDLE INPUT.npy OUTDIR`` reads the output names (and the expected input shape)
straight from ``BUNDLE/manifest.json`` with tvm-ffi's own JSON reader, so there is no side
file to keep in sync and ``add_device_files`` may run before or after the manifest is written.

Environment:

- ``BDP_CACHE``: cache root (default ``~/.cache/bdp``); the runtime lands in
  ``$BDP_CACHE/aarch64-runtime/<tvm version>/`` and built runners next to it.
- ``BDP_AARCH64_RUNTIME``: a folder holding ``libtvm_runtime.so`` and ``libtvm_ffi.so`` for
  AArch64 (or the two aarch64 wheels); when set, nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from bdp.errors import ToolMissingError

TVM_VERSION = importlib.metadata.version("apache-tvm")
FFI_VERSION = importlib.metadata.version("apache-tvm-ffi")

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
QEMU_LD_PREFIX = "/usr/aarch64-linux-gnu"
APT_HINT = "apt-get install qemu-user g++-aarch64-linux-gnu"

# PyPI tags: apache-tvm ships manylinux_2_27/2_28 aarch64 (py3-none), apache-tvm-ffi
# manylinux_2_24/2_28 aarch64 per CPython version; pip's manylinux_2_28 accepts both.
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_PYTHON = "3.11"  # only picks the apache-tvm-ffi wheel; libtvm_ffi.so does not use Python

# library name -> (distribution, member inside its wheel)
RUNTIME_LIBS = {
    "libtvm_runtime.so": ("apache-tvm", "tvm/lib/libtvm_runtime.so"),
    "libtvm_ffi.so": ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so"),
}

RUNNER_SOURCE = Path(__file__).with_name("runtime") / "bdp_run.cc"
RUNNER_FLAGS = ("-std=c++17", "-O2", "-Wall")

_VERSIONS_FILE = "VERSIONS"


# ----------------------------------------------------------------------------- helpers

def _host_is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def default_cc() -> str:
    """The C++ compiler that builds AArch64 code on this host."""
    return "g++" if _host_is_aarch64() else CROSS_CXX


def _cache_root(cache: str | os.PathLike | None = None) -> Path:
    if cache is not None:
        return Path(cache)
    env = os.environ.get("BDP_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "bdp"


def _versions_stamp() -> str:
    return f"apache-tvm=={TVM_VERSION}\napache-tvm-ffi=={FFI_VERSION}\n"


def _is_aarch64_elf(path: Path) -> bool:
    from ..elf import machine

    return machine(path) == "EM_AARCH64"


def _runtime_complete(d: Path) -> bool:
    return all(_is_aarch64_elf(d / name) for name in RUNTIME_LIBS)


def _extract_from_wheels(wheels: Sequence[Path], dest: Path) -> None:
    """Copy the runtime .so files out of the aarch64 wheels into dest (nothing else)."""
    members = {member: name for name, (_, member) in RUNTIME_LIBS.items()}
    found = set()
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if member in members:
                    out = dest / members[member]
                    with z.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(members[member])
    missing = sorted(set(RUNTIME_LIBS) - found)
    if missing:
        raise RuntimeError(f"the aarch64 wheels {[w.name for w in wheels]} lack {', '.join(missing)}")
    for name in RUNTIME_LIBS:
        if not _is_aarch64_elf(dest / name):
            raise RuntimeError(f"{name} from the downloaded wheels is not an AArch64 ELF library")


def _manual_hint() -> str:
    return (f"put libtvm_runtime.so and libtvm_ffi.so from the aarch64 wheels apache-tvm=={TVM_VERSION} "
            f"and apache-tvm-ffi=={FFI_VERSION} (or the wheels themselves) in a folder and set "
            f"BDP_AARCH64_RUNTIME=that folder")


def _pip_download(dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON,
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
           "-d", str(dest), f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={FFI_VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ToolMissingError(f"cannot run pip to fetch the AArch64 TVM runtime ({e}); {_manual_hint()}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) < 2:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise ToolMissingError(f"could not download the AArch64 TVM runtime wheels from PyPI (offline?): {why}; "
                           f"{_manual_hint()}")
    return wheels


# ----------------------------------------------------------------------------- runtime

def runtime_dir(cache: str | os.PathLike | None = None) -> Path:
    """The folder holding AArch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so``; fetches them once.

    ``BDP_AARCH64_RUNTIME`` (a folder with the two .so files, or with the two aarch64 wheels)
    wins over everything. Otherwise the files live in ``<cache>/aarch64-runtime/<tvm version>/``
    where ``cache`` defaults to ``$BDP_CACHE`` or ``~/.cache/bdp``; when absent they are taken
    from ``pip download`` of the aarch64 wheels (about 100 MB, once), extracting only the two
    libraries. The folder appears atomically (written under a temporary name, then renamed).
    Raises RuntimeError with a one-line message when the files cannot be had.
    """
    manual = os.environ.get("BDP_AARCH64_RUNTIME")
    if manual:
        d = Path(manual).expanduser()
        if _runtime_complete(d):
            return d
        wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
        if not wheels:
            raise ToolMissingError(f"BDP_AARCH64_RUNTIME={manual} holds neither AArch64 libtvm_runtime.so + "
                               f"libtvm_ffi.so nor the aarch64 apache-tvm / apache-tvm-ffi wheels")
        for dist, ver in (("apache_tvm-", TVM_VERSION), ("apache_tvm_ffi-", FFI_VERSION)):
            if not any(w.name.startswith(f"{dist}{ver}-") for w in wheels):
                raise ToolMissingError(f"BDP_AARCH64_RUNTIME={manual} has no {dist}{ver}-*aarch64*.whl "
                                   f"(the installed version); {_manual_hint()}")
        wanted = (f"apache_tvm-{TVM_VERSION}-", f"apache_tvm_ffi-{FFI_VERSION}-")
        wheels = [w for w in wheels if w.name.startswith(wanted)]
        source = ("wheels", wheels)
    else:
        source = None

    final = _cache_root(cache) / "aarch64-runtime" / TVM_VERSION
    stamp = final / _VERSIONS_FILE
    if _runtime_complete(final) and stamp.is_file() and stamp.read_text() == _versions_stamp():
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TVM_VERSION}.", dir=final.parent))
    try:
        lib = tmp / "lib"
        lib.mkdir()
        if source is None:
            wheels = _pip_download(tmp / "wheels")
        else:
            wheels = source[1]
        _extract_from_wheels(wheels, lib)
        (lib / _VERSIONS_FILE).write_text(_versions_stamp())
        if final.exists():  # stale (other versions) or incomplete: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{TVM_VERSION}.old.", dir=final.parent))
            try:
                os.replace(final, old / "x")
            except OSError:
                pass
        try:
            os.rename(lib, final)
        except OSError:
            # Another process won the race; use its copy if it is good.
            if not (_runtime_complete(final) and stamp.is_file() and stamp.read_text() == _versions_stamp()):
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for old in final.parent.glob(f".{TVM_VERSION}.old.*"):
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- runner

def _include_dirs() -> list[Path]:
    """Header folders of the installed (host) wheels: tvm-ffi (with dlpack) and tvm."""
    dirs = []
    for pkg in ("tvm_ffi", "tvm"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"python package '{pkg}' is not installed; pip install apache-tvm=={TVM_VERSION}")
        inc = Path(list(spec.submodule_search_locations)[0]) / "include"
        if not inc.is_dir():
            raise RuntimeError(f"{inc} is missing: the installed {pkg} wheel has no C++ headers")
        dirs.append(inc)
    return dirs


def _cc_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise ToolMissingError(f"C++ compiler '{cc}' not found; {APT_HINT}") from None
    return out.splitlines()[0] if out else cc


def build_runner(out_path: str | os.PathLike, cc: str | None = None) -> Path:
    """Compile ``runtime/bdp_run.cc`` for AArch64 into ``out_path`` (rpath ``$ORIGIN/../lib``).

    The binary is cached in ``<cache>/aarch64-runtime/runners/`` by a hash of the source, the
    TVM / tvm-ffi versions, the compiler's version line and the flags.
    """
    cc = cc or default_cc()
    out_path = Path(out_path)
    src = RUNNER_SOURCE.read_bytes()
    key = hashlib.sha256()
    for part in (src, _versions_stamp().encode(), _cc_version(cc).encode(), " ".join(RUNNER_FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    digest = key.hexdigest()[:16]
    cache_dir = _cache_root() / "aarch64-runtime" / "runners"
    cached = cache_dir / f"bdp-run-{digest}"

    if not _is_aarch64_elf(cached):
        libdir = runtime_dir()
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".bdp-run-{digest}.", dir=cache_dir)
        os.close(fd)
        cmd = [cc, *RUNNER_FLAGS, str(RUNNER_SOURCE)]
        for inc in _include_dirs():
            cmd += ["-isystem", str(inc)]
        cmd += ["-L", str(libdir), "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime", "-Wl,--as-needed",
                "-Wl,-rpath,$ORIGIN/../lib", "-o", tmp_name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                errs = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()[-1:]
                raise RuntimeError(f"building bdp-run with {cc} failed: {errs[0] if errs else proc.returncode}")
            os.chmod(tmp_name, 0o755)
            os.replace(tmp_name, cached)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out_path)
    os.chmod(out_path, 0o755)
    return out_path


# ----------------------------------------------------------------------------- requirements

def _max_version(versions, prefix: str) -> str | None:
    best = None
    for v in versions:
        if v.startswith(prefix):
            try:
                t = tuple(int(x) for x in v[len(prefix):].split("."))
            except ValueError:
                continue
            if best is None or t > best:
                best = t
    return ".".join(map(str, best)) if best else None


# GLIBCXX symbol version -> first GCC whose libstdc++ provides it
_GLIBCXX_GCC = {"3.4.22": "6", "3.4.23": "7", "3.4.24": "7.2", "3.4.25": "8", "3.4.26": "9",
                "3.4.27": "9.2", "3.4.28": "10", "3.4.29": "11", "3.4.30": "12", "3.4.31": "13",
                "3.4.32": "13.2", "3.4.33": "14"}


def device_requirements(files: Sequence[str | os.PathLike]) -> dict:
    """The newest glibc and libstdc++ symbol versions the given ELF files need.

    Returns {"glibc": "2.34", "glibcxx": "3.4.29", "gcc": "11"} (values None when unused).
    """
    from ..elf import version_needs

    glibc, glibcxx = set(), set()
    for f in files:
        for vers in version_needs(Path(f)).values():
            for v in vers:
                if v.startswith("GLIBC_"):
                    glibc.add(v)
                elif v.startswith("GLIBCXX_"):
                    glibcxx.add(v)
    gxx = _max_version(glibcxx, "GLIBCXX_")
    return {"glibc": _max_version(glibc, "GLIBC_"), "glibcxx": gxx, "gcc": _GLIBCXX_GCC.get(gxx or "")}


_README = """\
# Running this bundle on a Raspberry Pi 4 / AArch64 Linux

This folder runs as is on 64-bit ARM Linux: no Python, no TVM install, no bdp.

    model.so            the compiled network (TVM Relax VM executable)
    manifest.json       input shape, output names and shapes
    bin/bdp-run         the runner (finds lib/ through its rpath, $ORIGIN/../lib)
    lib/libtvm_runtime.so, lib/libtvm_ffi.so   TVM {tvm} / tvm-ffi {ffi} runtime (from PyPI's aarch64 wheels)

## Run

    scp -r BUNDLE pi@raspberrypi:
    ssh pi@raspberrypi
    cd BUNDLE
    ./bin/bdp-run . input.npy out/

`input.npy` must be float32, C order, with the shape in `manifest.json` ("input": "shape"),
e.g. `numpy.save("input.npy", x.astype("float32"))`. Every output listed in
`manifest.json` "outputs" is written as `out/<name>.npy`, in that order. Exit code 2 and one
line on stderr means the input was wrong (dtype, shape, file); 1 is a runtime failure.

Timing on the device (one JSON line on stdout, milliseconds):

    ./bin/bdp-run --warmup 5 --repeat 100 . input.npy out/
    {{"repeat": 100, "warmup": 5, "median_ms": ..., "p90_ms": ..., "p99_ms": ..., ...}}

Threads: set `TVM_NUM_THREADS=4` (all of a Pi 4's cores) or fewer.

## Requirements

- 64-bit OS (`uname -m` prints `aarch64`): Raspberry Pi OS 64-bit, Ubuntu, Debian arm64.
- glibc >= {glibc} (check with `ldd --version`){libstdcxx}.
  Raspberry Pi OS Bookworm (Debian 12, glibc 2.36, GCC 12) and Ubuntu 22.04+ qualify;
  Raspberry Pi OS Bullseye (glibc 2.31) does not.

## Without a device

On an x86-64 Linux host with `apt-get install qemu-user g++-aarch64-linux-gnu`:

    QEMU_LD_PREFIX=/usr/aarch64-linux-gnu LD_LIBRARY_PATH=lib qemu-aarch64 ./bin/bdp-run . input.npy out/
"""


def add_device_files(bundle_dir: str | os.PathLike, cc: str | None = None) -> list[Path]:
    """Add ``lib/libtvm_runtime.so``, ``lib/libtvm_ffi.so``, ``bin/bdp-run`` and ``README.device.md``.

    ``bundle_dir`` is the bundle folder being written (``model.so`` may or may not be there yet;
    the runner reads ``manifest.json`` only when it runs). Returns the paths written.
    """
    bundle = Path(bundle_dir)
    libdir = runtime_dir()
    (bundle / "lib").mkdir(parents=True, exist_ok=True)
    written = []
    for name in RUNTIME_LIBS:
        dst = bundle / "lib" / name
        shutil.copyfile(libdir / name, dst)
        os.chmod(dst, 0o755)
        written.append(dst)
    runner = build_runner(bundle / "bin" / "bdp-run", cc=cc)
    written.append(runner)

    elf_files = list(written)
    if (bundle / "model.so").is_file():
        elf_files.append(bundle / "model.so")
    req = device_requirements(elf_files)
    libstdcxx = ""
    if req["glibcxx"]:
        gcc = f" (GCC >= {req['gcc']})" if req["gcc"] else ""
        libstdcxx = f" and libstdc++ with GLIBCXX_{req['glibcxx']}{gcc}"
    readme = bundle / "README.device.md"
    readme.write_text(_README.format(tvm=TVM_VERSION, ffi=FFI_VERSION, glibc=req["glibc"] or "2.17",
                                     libstdcxx=libstdcxx))
    written.append(readme)
    return written


# ----------------------------------------------------------------------------- qemu

def tools_available(cc: str | None = None) -> tuple[bool, str]:
    """(True, "") when this host can build and run AArch64 bundles, else (False, one-line reason)."""
    cc = cc or default_cc()
    missing = []
    if shutil.which(cc) is None:
        missing.append(cc)
    if not _host_is_aarch64():
        if shutil.which(QEMU) is None:
            missing.append(QEMU)
        if not Path(QEMU_LD_PREFIX, "lib").is_dir():
            missing.append(f"{QEMU_LD_PREFIX} (AArch64 glibc)")
    if missing:
        return False, f"missing {', '.join(missing)}; {APT_HINT}"
    return True, ""


def run_under_qemu(bundle_dir: str | os.PathLike, input_npy: str | os.PathLike, out_dir: str | os.PathLike,
                   extra_args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                   timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``bin/bdp-run [extra_args] BUNDLE INPUT OUTDIR`` under qemu-aarch64 (natively on AArch64).

    Returns the CompletedProcess (text stdout/stderr captured; returncode not checked).
    ``env`` adds variables (e.g. TVM_NUM_THREADS). RuntimeError when qemu or the cross
    toolchain's AArch64 glibc are missing.
    """
    if not _host_is_aarch64():
        missing = [QEMU] if shutil.which(QEMU) is None else []
        if not Path(QEMU_LD_PREFIX, "lib").is_dir():
            missing.append(f"{QEMU_LD_PREFIX} (AArch64 glibc)")
        if missing:
            raise ToolMissingError(f"cannot run AArch64 code here: missing {', '.join(missing)}; {APT_HINT}")
    bundle = Path(bundle_dir)
    runner = bundle / "bin" / "bdp-run"
    if not runner.is_file():
        raise RuntimeError(f"{runner} is missing: call add_device_files({str(bundle)!r}) first")
    cmd = [] if _host_is_aarch64() else [QEMU]
    cmd += [str(runner), *map(str, extra_args), str(bundle), str(input_npy), str(out_dir)]
    run_env = dict(os.environ)
    run_env["QEMU_LD_PREFIX"] = QEMU_LD_PREFIX
    run_env["LD_LIBRARY_PATH"] = str((bundle / "lib").resolve())  # host paths mean nothing to AArch64
    if env:
        run_env.update(env)
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout)


def run_bundle(bundle_dir: str | os.PathLike, x, output_names: Sequence[str]) -> dict:
    """Run the bundle's own ``bin/bdp-run`` on X (natively on an AArch64 host, under qemu-aarch64
    elsewhere); returns {output name: array}. InputError when the runner fails."""
    import numpy as np

    from bdp.errors import InputError

    with tempfile.TemporaryDirectory() as td:
        inp = os.path.join(td, "input.npy")
        np.save(inp, np.asarray(x, np.float32))
        outdir = os.path.join(td, "out")
        os.makedirs(outdir)
        proc = run_under_qemu(bundle_dir, inp, outdir)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise InputError(f"{bundle_dir}: bin/bdp-run failed (exit {proc.returncode}): {msg[-1] if msg else ''}")
        return {n: np.load(os.path.join(outdir, n + ".npy"), allow_pickle=False) for n in output_names}

