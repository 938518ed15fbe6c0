"""Trust that holds (issue 30): a signed bundle is exactly its signed bytes, a trust setting the
user gave never fails open, outputs never destroy what is not bdp's, and faults of the user's
machine or input are one line with exit code 2.

Each test here failed before the change it names and passes after it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from bdp.errors import InputError
from bdp.toolchain.bundle.format import finalize_manifest, read_manifest
from bdp.toolchain.bundle.manifest import Manifest
from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, copy_bundle, shared_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    p = run_cli("keys", "new", d / "alice")
    assert p.returncode == 0, p.stderr
    return d


@pytest.fixture
def signed(bundle, keys, tmp_path):
    b = copy_bundle(bundle, tmp_path / "b")
    finalize_manifest(str(b), Manifest.read(b), sign=str(keys / "alice.key"))
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    return b


# ---- 1. trust: a signed bundle is exactly its signed files; a given trust setting never fails open

def test_signed_bundle_as_built_loads(signed, keys):
    read_manifest(signed, trust=keys / "alice.pub")


@pytest.mark.parametrize("extra", ["lib/libgcc_s.so.1", "libcrypto.so.3", "bin/x/evil", "emptydir/"])
def test_unlisted_file_in_a_signed_bundle_is_refused(signed, keys, tmp_path, extra):
    target = signed / extra
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x7fELF not really")
    with pytest.raises(InputError, match="does not list"):
        read_manifest(signed, trust=keys / "alice.pub")
    p = run_cli("run", signed, "--input", tmp_path / "x.npy", "--trust", keys / "alice.pub")
    assert_input_error(p, "does not list", extra.split("/")[0])
    # without a trust key an extra file is no concern of the loader (nothing vouches for the folder)
    read_manifest(signed)


def test_links_and_special_files_in_a_signed_bundle_are_refused(signed, keys, tmp_path):
    b2 = copy_bundle(signed, tmp_path / "b2")
    b3 = copy_bundle(signed, tmp_path / "b3")
    os.symlink("/etc/passwd", signed / "passwd")
    with pytest.raises(InputError, match="does not list"):
        read_manifest(signed, trust=keys / "alice.pub")
    os.mkfifo(b2 / "fifo")
    with pytest.raises(InputError, match="fifo"):
        read_manifest(b2, trust=keys / "alice.pub")
    # a listed file replaced by a link to identical bytes: the bytes match, the link is refused
    shutil.copyfile(b3 / "report.json", tmp_path / "report.json")
    (b3 / "report.json").unlink()
    os.symlink(tmp_path / "report.json", b3 / "report.json")
    with pytest.raises(InputError, match="report.json"):
        read_manifest(b3, trust=keys / "alice.pub")


def test_empty_trust_setting_is_an_error_not_no_key(bundle, tmp_path, monkeypatch):
    import bdp

    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    monkeypatch.setenv("BDP_TRUST", "")
    p = run_cli("run", bundle, "--input", tmp_path / "x.npy", "-o", tmp_path / "o.npz")
    assert_input_error(p, "BDP_TRUST", "empty")
    assert not (tmp_path / "o.npz").exists()
    with pytest.raises(InputError, match="BDP_TRUST is set but empty"):
        bdp.load(bundle)
    monkeypatch.setenv("BDP_TRUST", "  ")
    with pytest.raises(InputError, match="empty"):
        bdp.load(bundle)
    monkeypatch.delenv("BDP_TRUST")
    with pytest.raises(InputError, match="empty"):
        bdp.load(bundle, trust="")
    assert_input_error(run_cli("run", bundle, "--input", tmp_path / "x.npy", "--trust", ""), "empty")
    bdp.load(bundle)  # unset: no key, an unsigned bundle loads


def test_public_key_with_trailing_garbage_is_refused(signed, keys, tmp_path):
    pub = (keys / "alice.pub").read_bytes()
    for name, data in [("tail.pub", pub + b"#!/bin/sh\nrm -rf /\n"),
                       ("twice.pub", pub + pub),
                       ("head.pub", b"hello\n" + pub)]:
        (tmp_path / name).write_bytes(data)
        assert_input_error(run_cli("run", signed, "--input", tmp_path / "x.npy", "--trust", tmp_path / name),
                           name, "exactly one PEM public key")
    (tmp_path / "crlf.pub").write_bytes(pub.replace(b"\n", b"\r\n") + b"\n\n")  # white space is fine
    read_manifest(signed, trust=tmp_path / "crlf.pub")


def test_duplicate_keys_in_a_manifest_are_refused(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path / "b")
    text = (b / "manifest.json").read_text()
    d = json.loads(text)
    # the last "library" would win: a second entry pointing elsewhere
    dup = text.replace('"library": "model.so"', '"library": "model.so", "library": "report.json"', 1)
    assert dup != text
    (b / "manifest.json").write_text(dup)
    with pytest.raises(InputError, match="'library'.* twice|\"library\".* twice"):
        read_manifest(b)
    inner = text.replace('"name": "' + d["outputs"][0]["name"] + '"',
                         '"name": "' + d["outputs"][0]["name"] + '", "name": "x"', 1)
    assert inner != text
    (b / "manifest.json").write_text(inner)
    assert_input_error(run_cli("run", b, "--input", tmp_path / "none.npy"), "twice")


@pytest.mark.slow
def test_board_runner_refuses_an_empty_bdp_trust(tmp_path):
    """bin/bdp-run (targets/devices/runtime/bdp_run.cc) under qemu: BDP_TRUST='' is exit 2."""
    from bdp.targets.devices import aarch64

    ok, why = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI installs them): {why}")
    b = tmp_path / "b"
    aarch64.build_runner(b / "bin" / "bdp-run")
    shutil.copytree(aarch64.runtime_dir(), b / "lib")
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    proc = aarch64.run_under_qemu(b, tmp_path / "x.npy", tmp_path / "out", env={"BDP_TRUST": ""}, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "BDP_TRUST is set but empty" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
