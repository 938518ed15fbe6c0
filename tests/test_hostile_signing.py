"""Signed bundles (issue 15, "bundles a robot can trust").

sha256 in the manifest proves integrity, not origin: a model.so replaced together with its hash
runs its constructor on load. With a trust key (``--trust`` / ``trust=`` / ``$BDP_TRUST``) the
bundle is refused unless manifest.sig verifies, before any library is loaded. The attack is
built for real: a shared library whose constructor creates a marker file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from bdp.errors import InputError
from bdp.toolchain.bundle.format import finalize_manifest, sha256_file
from bdp.toolchain.bundle.manifest import Manifest
from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, copy_bundle, shared_bundle, tiny_onnx


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("alice", "mallory"):
        p = run_cli("keys", "new", d / name)
        assert p.returncode == 0, p.stderr
    assert oct(os.stat(d / "alice.key").st_mode & 0o777) == "0o600"
    return d


def _sign(b, key):
    finalize_manifest(str(b), Manifest.read(b), sign=str(key))
    return b


def _evil_library(path, marker, cc="gcc"):
    """A shared library whose constructor creates MARKER (what a replaced model.so can do)."""
    src = path.with_suffix(".c")
    src.write_text('#include <fcntl.h>\n#include <unistd.h>\n'
                   f'__attribute__((constructor)) static void pwn(void) {{ close(creat("{marker}", 0644)); }}\n'
                   'int bdp_nothing(void) { return 0; }\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(path), str(src)], check=True, capture_output=True)
    return path


def _swap_library(b, evil):
    """Replace model.so and 'fix' its hash in the manifest, keeping the old signature file."""
    shutil.copyfile(evil, b / "model.so")
    d = json.loads((b / "manifest.json").read_text())
    d["files"]["model.so"] = {"sha256": sha256_file(b / "model.so"), "bytes": os.path.getsize(b / "model.so")}
    (b / "manifest.json").write_text(json.dumps(d, indent=2))


def test_keys_are_never_overwritten(keys):
    before = (keys / "alice.key").read_bytes()
    assert_input_error(run_cli("keys", "new", keys / "alice"), "exists", "--force")
    assert (keys / "alice.key").read_bytes() == before


def test_signed_bundle_runs_with_its_key(bundle, keys, tmp_path):
    import bdp

    b = _sign(copy_bundle(bundle, tmp_path / "b"), keys / "alice.key")
    assert (b / "manifest.sig").is_file()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    got = bdp.load(b, trust=keys / "alice.pub")(x)
    want = bdp.load(bundle)(x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    np.save(tmp_path / "x.npy", x)
    p = run_cli("run", b, "--input", tmp_path / "x.npy", "--trust", keys / "alice.pub")
    assert p.returncode == 0, p.stderr
    # another key, no signature, a trust key from the environment
    with pytest.raises(InputError, match="does not verify"):
        bdp.load(b, trust=keys / "mallory.pub")
    with pytest.raises(InputError, match="not signed"):
        bdp.load(bundle, trust=keys / "alice.pub")
    env = dict(os.environ, BDP_TRUST=str(keys / "alice.pub"))
    p = subprocess.run([__import__("sys").executable, "-m", "bdp.toolchain.cli", "run", str(bundle), "--input",
                        str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=600)
    assert_input_error(p, "not signed")
    # unsigned bundles keep working without a trust key
    assert run_cli("run", bundle, "--input", tmp_path / "x.npy").returncode == 0


def test_replaced_library_never_loads_with_a_trust_key(bundle, keys, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_library(tmp_path / "evil.so", marker)
    b = _sign(copy_bundle(bundle, tmp_path / "b"), keys / "alice.key")
    _swap_library(b, evil)
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    p = run_cli("run", b, "--input", tmp_path / "x.npy", "--trust", keys / "alice.pub")
    assert_input_error(p, "signature does not verify")
    assert not marker.exists()
    # the attack is real: without a trust key the hashes match and the constructor runs
    p = run_cli("run", b, "--input", tmp_path / "x.npy")
    assert p.returncode == 2, p.stderr
    assert marker.exists()


def test_bad_keys_and_signatures(bundle, keys, tmp_path):
    b = _sign(copy_bundle(bundle, tmp_path / "b"), keys / "alice.key")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(SHAPE, np.float32))
    (tmp_path / "junk.pub").write_text("hello")
    assert_input_error(run_cli("run", b, "--input", x, "--trust", tmp_path / "junk.pub"), "junk.pub")
    assert_input_error(run_cli("run", b, "--input", x, "--trust", keys / "alice.key"), "alice.key")
    (b / "manifest.sig").write_text("!!!")
    assert_input_error(run_cli("run", b, "--input", x, "--trust", keys / "alice.pub"), "manifest.sig")
    assert_input_error(run_cli("compile", tmp_path / "none.onnx", "--sign", keys / "alice.pub", "-o", tmp_path / "o"),
                       "alice.pub")


@pytest.mark.slow
def test_bdp_run_on_the_board_checks_the_signature(keys, tmp_path):
    """bin/bdp-run --trust (libcrypto through dlopen) under qemu-aarch64: a signed rpi4 bundle
    runs and matches the unsigned run; a swapped model.so, another key, no signature: exit 2
    before model.so is loaded."""
    from bdp.targets.devices import aarch64

    ok, why = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI installs them): {why}")
    model = tiny_onnx(tmp_path / "tiny.onnx")
    b = tmp_path / "rpi"
    p = run_cli("compile", model, "--target", "rpi4", "-o", b, "--sign", keys / "alice.key")
    assert p.returncode == 0, p.stderr
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    def run(bundle, *extra, env=None):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        return aarch64.run_under_qemu(bundle, tmp_path / "x.npy", out, extra, env=env, timeout=600), out

    proc, out = run(b, "--trust", str(keys / "alice.pub"))
    assert proc.returncode == 0, proc.stderr
    plain, out2 = run(b)
    assert plain.returncode == 0, plain.stderr
    for name in ("depth", "semseg"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(out2 / f"{name}.npy"))

    proc, _ = run(b, "--trust", str(keys / "mallory.pub"))
    assert proc.returncode == 2 and "does not verify" in proc.stderr, proc.stderr
    proc, _ = run(b, env={"BDP_TRUST": str(keys / "mallory.pub")})
    assert proc.returncode == 2 and "does not verify" in proc.stderr, proc.stderr

    marker = tmp_path / "PWNED"
    evil = _evil_library(tmp_path / "evil.so", marker, cc="aarch64-linux-gnu-gcc")
    b2 = copy_bundle(b, tmp_path / "rpi-swapped")
    _swap_library(b2, evil)
    proc, _ = run(b2, "--trust", str(keys / "alice.pub"))
    assert proc.returncode == 2 and "does not verify" in proc.stderr, proc.stderr
    assert not marker.exists()
    # a file changed but the manifest left alone: the signature verifies, the hash does not
    b3 = copy_bundle(b, tmp_path / "rpi-hash")
    (b3 / "report.json").write_text("{}")
    proc, _ = run(b3, "--trust", str(keys / "alice.pub"))
    assert proc.returncode == 2 and "report.json" in proc.stderr, proc.stderr
    # unsigned: refused with a key, runs without one
    (b3 / "manifest.sig").unlink()
    proc, _ = run(b3, "--trust", str(keys / "alice.pub"))
    assert proc.returncode == 2 and "not signed" in proc.stderr, proc.stderr
    proc, _ = run(b2)  # the attack without a trust key: the runner loads it (its constructor runs)
    assert marker.exists()
