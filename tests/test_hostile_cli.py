"""The command line under careless input (issue 15, items 5, 6, 7, 8).

Every input fault is exit 2 with one line (click's usage errors included), the user's missing
tools are exit 2 with the apt command, a killed command leaves nothing for long, and reloading a
bundle does not grow the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, copy_bundle, shared_bundle, tiny_onnx


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.mark.parametrize("args,needle", [
    (["compile"], "Missing argument"),
    (["compile", "m.onnx", "--bogus"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    (["compile", "m.onnx", "--target", "z80"], "z80"),
    (["init", "bireal-tiny", "-o", "x.pt", "--width", "abc"], "abc"),
    (["eval", "m.pt", "--size", "a,b"], "--size"),
    (["init", "bireal-tiny", "-o", "x.pt", "--width", "-3"], "width"),
    (["profile", "b", "--warmup", "-1"], "--warmup"),
    (["run", "b", "--input", "x.npy", "--trust", "nope.pub"], "b"),
])
def test_usage_and_value_errors_are_one_line(tmp_path, args, needle):
    p = run_cli(*args, cwd=tmp_path)
    assert_input_error(p, needle)
    assert sorted(os.listdir(tmp_path)) == []


def _env_without(tools, bindir):
    """An environment whose PATH is BINDIR, holding every program of this PATH except TOOLS (a
    user's machine without them)."""
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for n in os.listdir(d):
            src = os.path.join(d, n)
            if n in tools or (bindir / n).exists() or not os.access(src, os.X_OK) or os.path.isdir(src):
                continue
            os.symlink(src, bindir / n)
    env = dict(os.environ, PATH=str(bindir))
    env.pop("BDP_DEBUG", None)
    return env


def test_missing_cross_compiler_and_qemu_are_exit_2(bundle, tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    env = _env_without({"aarch64-linux-gnu-g++", "qemu-aarch64"}, tmp_path / "bin")
    p = subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", "compile", str(model), "--target", "rpi4", "-o",
                        str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=600)
    assert_input_error(p, "aarch64-linux-gnu-g++", "apt-get install")
    assert not (tmp_path / "b").exists()
    # an arm64 bundle run on this x86 host without qemu
    b = copy_bundle(bundle, tmp_path / "arm")
    d = json.loads((b / "manifest.json").read_text())
    d["target"]["arch"], d["target"]["name"] = "aarch64", "rpi4"
    (b / "manifest.json").write_text(json.dumps(d))
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    p = subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", "run", str(b), "--input", str(tmp_path / "x.npy")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert_input_error(p, "qemu-aarch64", "apt-get install")


def _wait_for(pred, proc, timeout=600):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        found = pred()
        if found:
            return found
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def _start_compile(model, out):
    env = dict(os.environ)
    env.pop("BDP_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "bdp.toolchain.cli", "compile", str(model), "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_compiles_leave_nothing_for_long(tmp_path):
    """SIGTERM in the final bundle stage: the temporary folder goes at once. SIGKILL: it stays,
    and the next compile to that output removes it (its process is gone)."""
    model = tiny_onnx(tmp_path / "m.onnx")
    work = tmp_path / "w"
    work.mkdir()

    def temp_dirs():
        return [n for n in os.listdir(work) if n.startswith(".b.tmp-")]

    proc = _start_compile(model, work / "b")
    assert _wait_for(temp_dirs, proc), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, (proc.returncode, err)
    assert [ln for ln in err.splitlines() if ln.strip()] == ["bdp: error: terminated"], err
    assert os.listdir(work) == []

    proc = _start_compile(model, work / "b")
    assert _wait_for(temp_dirs, proc), proc.communicate()
    proc.kill()
    proc.wait()
    left = temp_dirs()
    assert left and str(proc.pid) in left[0]
    p = run_cli("compile", model, "-o", work / "b")
    assert p.returncode == 0, p.stderr
    assert os.listdir(work) == ["b"]


@pytest.mark.slow
def test_reloading_a_bundle_does_not_grow_the_process(tmp_path):
    """A robot that reloads its model on every mission: 200 load + run cycles, resident memory
    must grow by less than 5 MB after the first few. (tvm's load_module kept every loaded module
    alive for the process, its constants included: this bundle's 512 KB of float weights made
    it grow by about that much per load.)"""
    import bdp

    bundle = tmp_path / "b"
    bdp.compile(str(tiny_onnx(tmp_path / "m.onnx", head=8192)), out=str(bundle))
    code = (
        "import gc, sys, numpy as np, bdp\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "x = np.zeros(%r, np.float32)\n"
        "for i in range(200):\n"
        "    b = bdp.load(sys.argv[1])\n"
        "    b(x)\n"
        "    del b\n"
        "    gc.collect()\n"
        "    if i == 19:\n"
        "        start = rss()\n"
        "print(rss() - start)\n" % (SHAPE,))
    p = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    grown = int(p.stdout.strip().splitlines()[-1])
    assert grown < 5 * 2**20, f"grew {grown / 2**20:.1f} MB over 180 loads"
