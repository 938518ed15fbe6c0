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


# ---- 2. outputs: never replace what is not a regular file; remove only bdp's own temporaries

def _x(tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
    return x


def test_a_device_output_is_written_in_place(bundle, tmp_path):
    x = _x(tmp_path)
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the same device as /dev/null
    except PermissionError:
        dev = "/dev/null"  # not root: /dev/null cannot be replaced anyway, but is written through
    p = run_cli("run", bundle, "--input", x, "-o", dev)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISCHR(os.lstat(dev).st_mode), "the device was replaced by a file"
    # a link to a device: the same, and the link stays
    os.symlink(dev, tmp_path / "to-null.npz")
    p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "to-null.npz")
    assert p.returncode == 0, p.stderr
    assert os.path.islink(tmp_path / "to-null.npz") and stat.S_ISCHR(os.lstat(dev).st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_fifo_output_is_written_in_place(bundle, tmp_path):
    import threading

    x = _x(tmp_path)
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    p = run_cli("run", bundle, "--input", x, "-o", fifo, timeout=120)
    reader.join(60)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a file"
    assert got and got[0][:2] == b"PK", "the outputs did not go through the FIFO"


def _full_device(tmp_path):
    """A device like /dev/full (every write: ENOSPC) of the test's own, so that a bdp that
    replaces devices by files replaces this one, not the system's."""
    dev = tmp_path / "full"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("not root: cannot make a device node (the system's /dev/full is not risked)")
    return dev


def test_a_full_device_is_an_input_fault_not_success(bundle, tmp_path):
    x = _x(tmp_path)
    full = _full_device(tmp_path)
    assert_input_error(run_cli("profile", bundle, "--runs", "1", "--warmup", "0", "--json", full),
                       str(full), "No space left on device")
    assert stat.S_ISCHR(os.lstat(full).st_mode)
    assert_input_error(run_cli("run", bundle, "--input", x, "-o", full), str(full), "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_symlink_output_is_written_through_and_stays_a_link(bundle, tmp_path):
    x = _x(tmp_path)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "result.npz"
    target.write_bytes(b"old")
    os.symlink("real/result.npz", tmp_path / "out.npz")
    p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "out.npz")
    assert p.returncode == 0, p.stderr
    assert os.readlink(tmp_path / "out.npz") == "real/result.npz"
    with np.load(target) as z:
        assert sorted(z.files) == ["depth", "semseg"]
    # a dangling link: the file it names is made
    target.unlink()
    p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "out.npz")
    assert p.returncode == 0, p.stderr
    assert os.path.islink(tmp_path / "out.npz") and target.is_file()
    assert not [n for d in (tmp_path, tmp_path / "real") for n in os.listdir(d) if n.startswith(".")]


def test_json_to_dev_stdout_keeps_the_link_and_the_file_stdout_is(bundle, tmp_path):
    """``--json /dev/stdout`` with stdout redirected to a file: the JSON goes into that file (the
    same inode), and the link stays a link. A link of our own stands in for /dev/stdout (the bug
    replaced /dev/stdout itself)."""
    import subprocess
    import sys

    out = tmp_path / "stdout"
    os.symlink("/proc/self/fd/1", out)
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        ino = os.fstat(f.fileno()).st_ino
        p = subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", "profile", str(bundle), "--runs", "1",
                            "--warmup", "0", "--json", str(out)], stdout=f, stderr=subprocess.PIPE, text=True,
                           timeout=300)
    assert p.returncode == 0, p.stderr
    assert os.path.islink(out) and os.readlink(out) == "/proc/self/fd/1"
    assert os.stat(log).st_ino == ino, "the file behind stdout was replaced"
    text = log.read_text()
    assert "median" in text, text[:200]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_cleanup_removes_only_bdps_own_temporaries(bundle, tmp_path):
    from hostile_common import tiny_onnx

    x = _x(tmp_path)
    notes = tmp_path / ".out.npz.tmp-4000000-notes.txt"
    notes.write_text("my notes")
    keep = tmp_path / ".bundle.old-4000001-keep"
    keep.mkdir()
    (keep / "photo.jpg").write_bytes(b"jpg")
    lookalike = tmp_path / ".out.npz.tmp-4000000-abcdefghij.npz"  # random part of the wrong length
    lookalike.write_text("mine")
    stale = tmp_path / ".out.npz.tmp-4000000-ab_de9gh.npz"  # exactly what a killed bdp leaves
    stale.write_text("half")
    stale_dir = tmp_path / ".bundle.tmp-4000002-k2ll3d_x"
    stale_dir.mkdir()
    p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "out.npz")
    assert p.returncode == 0, p.stderr
    model = tiny_onnx(tmp_path / "tiny.onnx")
    p = run_cli("compile", model, "-o", tmp_path / "bundle", "--no-reference")
    assert p.returncode == 0, p.stderr
    assert notes.read_text() == "my notes" and (keep / "photo.jpg").read_bytes() == b"jpg"
    assert lookalike.read_text() == "mine"
    assert not stale.exists() and not stale_dir.exists()


# ---- 3. a full or read-only disk is the user's machine's fault: exit 2, one line naming the path

@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (a disk that fills up) and a read-only one; needs root (mount)."""
    import subprocess

    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(full)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=128k", "tmpfs", str(ro)], check=True)
    (full / "filler").write_bytes(b"\0" * (120 << 10))  # 8 KiB left: no bundle, no checkpoint fits
    yield full, ro
    for d in (full, ro):
        subprocess.run(["umount", str(d)], check=False)


def _last_line_is_input_fault(p, *needles):
    """Exit 2, no traceback, the last line of stderr names the fault (train's progress bar may
    come before it)."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)


def test_disk_full_during_init_compile_train_is_exit_2(small_disk, tmp_path):
    from hostile_common import tiny_onnx

    full, ro = small_disk
    assert_input_error(run_cli("init", "bnn-baseline", "-o", full / "m.pt"), str(full / "m.pt"), "no space left")
    model = tiny_onnx(tmp_path / "tiny.onnx")
    assert_input_error(run_cli("compile", model, "-o", full / "bundle"), str(full / "bundle"), "no space left")
    p = run_cli("train", "bnn-baseline", "-o", full / "t.pt", "--epochs", "1", "--n-train", "4", "--batch-size", "4",
                "--size", "32,32", "--width", "8", "--device", "cpu")
    _last_line_is_input_fault(p, str(full / "t.pt"), "no space left")
    assert os.listdir(full) == ["filler"]  # nothing half-written left behind
    # read-only: refused up front, one line naming the path
    assert_input_error(run_cli("init", "bnn-baseline", "-o", ro / "m.pt"), str(ro))
    assert_input_error(run_cli("compile", model, "-o", ro / "bundle"), str(ro))


def test_disk_fault_mapping():
    """The mapping itself: OSErrors of the user's machine, and a library's own words for a write that
    failed while the disk is full, are InputErrors naming the path; anything else is left alone."""
    import errno

    from bdp.files import _disk_fault

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        f = _disk_fault("/tmp/x.pt", OSError(code, os.strerror(code)))
        assert isinstance(f, InputError) and str(f).startswith("/tmp/x.pt: cannot write"), f
    assert _disk_fault("/tmp/x.pt", RuntimeError("unexpected pos 43712 vs 43608")) is None  # /tmp has room
    assert _disk_fault("/tmp/x.pt", InputError("already one")) is None


# ---- 4. limits enforced where the file is first opened

def test_onnx_over_1_gib_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import time

    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk, no memory
    t = time.perf_counter()
    p = run_cli("compile", big, "-o", tmp_path / "b")
    assert_input_error(p, str(big), "1 GiB limit")
    assert time.perf_counter() - t < 60
    assert not (tmp_path / "b").exists()
    # in process: nothing is read or parsed
    import onnx

    from bdp.toolchain.frontend.loading import load_onnx

    monkeypatch.setattr(onnx, "load_model_from_string", lambda *a: pytest.fail("parsed"))
    with pytest.raises(InputError, match="1 GiB limit"):
        load_onnx(big)


def _npy_with_header(path, shape, dtype="<f4", data=b""):
    from numpy.lib import format as npf

    with open(path, "wb") as f:
        npf.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
        f.write(data)
    return path


def test_npy_input_is_checked_from_its_header(bundle, tmp_path, monkeypatch):
    # 2 GiB by its header (the data is not there: a bdp that reads first fails otherwise)
    huge = _npy_with_header(tmp_path / "huge.npy", (1, 3, 16384, 10923))
    assert_input_error(run_cli("run", bundle, "--input", huge), str(huge), "GiB", "limit")
    # the wrong shape by its header, before the data is read
    wrong = _npy_with_header(tmp_path / "wrong.npy", (2, 3, 8, 8))
    assert_input_error(run_cli("run", bundle, "--input", wrong), "shape (2, 3, 8, 8)", "expects")
    obj = _npy_with_header(tmp_path / "obj.npy", SHAPE, "|O")
    assert_input_error(run_cli("run", bundle, "--input", obj), "dtype object")
    short = _npy_with_header(tmp_path / "short.npy", SHAPE, data=b"\0" * 16)
    assert_input_error(run_cli("run", bundle, "--input", short), "truncated")
    # in process, a sparse 2 GiB file of exactly the declared size: np.load is never reached
    from bdp.toolchain.runtime import run as run_mod

    sparse = _npy_with_header(tmp_path / "sparse.npy", (1, 3, 16384, 10923))
    with open(sparse, "r+b") as f:
        f.truncate(os.path.getsize(sparse) + 3 * 16384 * 10923 * 4)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(InputError, match="limit"):
        run_mod.load_input(sparse, Manifest.read(bundle))


# ---- 5. a Conv that cannot run is one line naming the node, before onnxruntime runs

def _conv_onnx(path, cin, cout, group, k, hw, pads=1, wc=None, dil=1):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((cout, wc or max(cin // group, 1), k, k), np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv", group=group, pads=[pads] * 4,
                            dilations=[dil, dil])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, "h", "w"])],
                          initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("case,kw,needles", [
    ("group-in", dict(cin=4, cout=6, group=3, k=3, hw=8, wc=2), ("group 3 does not divide", "4 input channels")),
    ("group-out", dict(cin=6, cout=4, group=3, k=3, hw=8), ("group 3 does not divide", "4 output channels")),
    ("weights", dict(cin=6, cout=6, group=3, k=3, hw=8, wc=3), ("3 channels per group", "its input has 6")),
    ("kernel", dict(cin=3, cout=4, group=1, k=9, hw=4), ("kernel [9, 9]", "larger than its padded input")),
    ("dilated", dict(cin=3, cout=4, group=1, k=3, hw=4, pads=0, dil=3), ("dilated: 7", "larger than")),
])
def test_conv_that_cannot_run_is_one_line(tmp_path, case, kw, needles):
    model = _conv_onnx(tmp_path / f"{case}.onnx", **kw)
    p = run_cli("compile", model, "-o", tmp_path / "b")
    line = assert_input_error(p, "the_conv", *needles)
    assert "\x1b[" not in p.stderr and "onnxruntime" not in line.lower(), p.stderr
    assert not (tmp_path / "b").exists()


def test_a_conv_that_fits_still_compiles(tmp_path):
    # a kernel exactly as wide as the padded input, and groups that divide: fine
    model = _conv_onnx(tmp_path / "ok.onnx", cin=6, cout=6, group=3, k=6, hw=4)
    p = run_cli("compile", model, "-o", tmp_path / "b")
    assert p.returncode == 0, p.stderr


# ---- 6. one loaded bundle, several threads

def test_one_bundle_called_from_four_threads(bundle):
    import threading

    import bdp

    m = bdp.load(bundle)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4)]
    want = [m(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(100):
                got = m(xs[i])
                for k in want[i]:
                    np.testing.assert_array_equal(got[k], want[i][k])
        except Exception as e:  # noqa: BLE001 (collected, reported below)
            errors.append(f"thread {i}: {e!r}"[:300])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
