"""`bdp profile` over TVM RPC, against real servers started here on 127.0.0.1.

A plain RPC server (``tvm.rpc.Server``) and a tracker (``tvm.rpc.tracker.Tracker``) with a
second server registered under a key are started once for this module (each start costs several
seconds) and shut down when the module ends. Needs cloudpickle, psutil (the server) and tornado
(the tracker). No address other than 127.0.0.1 is ever used.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from conftest import assert_input_error, run_cli

pytest.importorskip("cloudpickle")
pytest.importorskip("psutil")

HOST = "127.0.0.1"
KEY = "bdp-test-board"
IN_SHAPE = (1, 3, 16, 20)


# ----------------------------------------------------------------------------- fixtures

def _port_range():
    base = random.randint(20000, 50000)
    return base, base + 200


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Never read or write the user's real device config; bound every wait."""
    monkeypatch.setenv("BDP_DEVICES", str(tmp_path / "devices.json"))
    monkeypatch.setenv("BDP_RPC_TIMEOUT", "20")


@pytest.fixture(scope="module")
def x86_bundle(tmp_path_factory):
    """A real bdp bundle (packed-bit binary convs) for this host."""
    import torch

    import bdp
    from bdp.models import zoo
    from bdp.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("remote")
    torch.manual_seed(0)
    save_checkpoint(zoo.build("bireal-tiny", width=8), str(d / "m.pt"), meta={"epoch": 0, "trained": False})
    bdp.compile(str(d / "m.pt"), target="x86", out=str(d / "b"), input_shape=IN_SHAPE)
    return d / "b"


@pytest.fixture(scope="module")
def aarch64_bundle(tmp_path_factory):
    """A real AArch64 model.so (a tiny Relax model, cross-linked) in a bundle folder."""
    from bdp.targets.devices import aarch64

    cc = aarch64.default_cc()
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed ({aarch64.APT_HINT})")
    import tvm
    from tvm import relax

    from bdp.toolchain.bundle.format import finalize_manifest

    d = tmp_path_factory.mktemp("arm") / "b"
    d.mkdir()
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Tiny:
        @R.function
        def main(x: R.Tensor((1, 3, 16, 20), "float32")):
            y = R.nn.relu(R.add(x, x))
            return y

    mod = relax.transform.LegalizeOps()(Tiny)
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}))
    ex.export_library(str(d / "model.so"), cc=cc)
    finalize_manifest(str(d), {
        "target": {"name": "rpi4", "arch": "aarch64"},
        "input": {"name": "x", "shape": list(IN_SHAPE), "dtype": "float32"},
        "outputs": [{"name": "y", "shape": list(IN_SHAPE), "dtype": "float32"}],
    })
    return d


@pytest.fixture(scope="module")
def rpc_server():
    from tvm import rpc

    port, port_end = _port_range()
    srv = rpc.Server(host=HOST, port=port, port_end=port_end)
    try:
        yield srv.port
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def tracker():
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    pytest.importorskip("tornado")
    port, port_end = _port_range()
    tr = Tracker(host=HOST, port=port, port_end=port_end, silent=True)
    srv = None
    try:
        port, port_end = _port_range()
        srv = rpc.Server(host=HOST, port=port, port_end=port_end, tracker_addr=(HOST, tr.port), key=KEY)
        deadline = time.time() + 60
        while True:  # bounded: wait until the server has registered its key
            summary = rpc.connect_tracker(HOST, tr.port).summary()
            if any(s.get("key") == f"server:{KEY}" for s in summary.get("server_info", [])) and \
                    summary.get("queue_info", {}).get(KEY, {}).get("free", 0) > 0:
                break
            assert time.time() < deadline, f"server never registered with the tracker: {summary}"
            time.sleep(0.5)
        yield tr.port
    finally:
        if srv is not None:
            srv.terminate()
        tr.terminate()


def _free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens here now
    return port


class _SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never says a word (a hung or foreign service)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def _check_result(res, runs):
    lat = res["latency"]
    assert lat["runs"] == runs
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"], lat
    assert lat["mean_ms"] > 0
    assert res["input_shape"] == list(IN_SHAPE)
    assert res["target"] == "x86"
    assert res["host"]["machine"] == "x86_64"
    assert res["fp32_onnxruntime"] is None and res["fp32_note"]
    # a real per-op breakdown: every kernel of the bundle, the packed-bit convs among them
    ops = {r["op"]: r for r in res["per_op"]}
    assert ops, res.get("per_op_note")
    assert any("bdp_binary_conv" in name for name in ops), sorted(ops)
    assert all(r["calls"] >= 1 and r["total_ms"] > 0 for r in res["per_op"])
    assert abs(sum(r["share"] for r in res["per_op"]) - 1.0) < 1e-6
    assert "isolation" in res["per_op_note"]


# ----------------------------------------------------------------------------- over RPC

def test_profile_over_rpc_cli_json_and_chart(x86_bundle, rpc_server, tmp_path):
    out, chart = tmp_path / "p.json", tmp_path / "p.png"
    p = run_cli("profile", x86_bundle, "--rpc", f"{HOST}:{rpc_server}", "--runs", 7, "--warmup", 1,
                "--json", out, "--chart", chart, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "median" in p.stdout and "per op" in p.stdout
    res = json.loads(out.read_text())
    _check_result(res, 7)
    assert res["device"] == f"rpc:{HOST}:{rpc_server}"
    assert res["remote"]["rpc"] == f"{HOST}:{rpc_server}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_via_tracker_and_key(x86_bundle, tracker, tmp_path):
    out = tmp_path / "t.json"
    p = run_cli("profile", x86_bundle, "--tracker", f"{HOST}:{tracker}", "--key", KEY, "--runs", 5,
                "--warmup", 1, "--json", out, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    _check_result(res, 5)
    assert res["remote"]["tracker"] == f"{HOST}:{tracker}" and res["remote"]["key"] == KEY
    # a key nobody registered: one line naming the key and the keys there, at once
    t = time.time()
    assert_input_error(run_cli("profile", x86_bundle, "--tracker", f"{HOST}:{tracker}", "--key", "nosuch"),
                       "nosuch", KEY, f"{HOST}:{tracker}")
    assert time.time() - t < 30


def test_device_from_config_file(x86_bundle, rpc_server, tmp_path, monkeypatch):
    from bdp.toolchain.runtime import boards as devices

    cfg = tmp_path / "boards" / "devices.json"
    monkeypatch.setenv("BDP_DEVICES", str(cfg))
    devices.add_device("board", rpc=f"{HOST}:{rpc_server}")
    assert json.loads(cfg.read_text()) == {"board": {"rpc": f"{HOST}:{rpc_server}"}}
    out = tmp_path / "d.json"
    p = run_cli("profile", x86_bundle, "--device", "board", "--runs", 4, "--warmup", 0, "--json", out, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    _check_result(res, 4)
    assert res["device"] == "board"


def test_aarch64_bundle_refused_by_x86_board(aarch64_bundle, rpc_server):
    line = assert_input_error(run_cli("profile", aarch64_bundle, "--rpc", f"{HOST}:{rpc_server}", "--runs", 2),
                              "aarch64", "x86_64", f"{HOST}:{rpc_server}")
    assert "rpi4" in line


def test_load_failure_names_both_sides(aarch64_bundle, rpc_server, monkeypatch):
    """A server that cannot say what it is (runtime-only tvm_rpc): the bundle is tried, and the
    load failure becomes one InputError naming the bundle's arch and the board."""
    from bdp.errors import InputError
    from bdp.toolchain.runtime import remote

    monkeypatch.setattr(remote, "remote_info",
                        lambda sess: {"triple": None, "cpu": None, "arch": None, "threads": None})
    with pytest.raises(InputError) as ei:
        remote.profile_remote(str(aarch64_bundle), rpc=f"{HOST}:{rpc_server}", runs=2, warmup=0)
    msg = str(ei.value)
    assert "could not load" in msg and "aarch64" in msg and f"{HOST}:{rpc_server}" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------- faults, no server needed

def test_unknown_device_missing_and_corrupt_config(x86_bundle, tmp_path, monkeypatch):
    cfg = tmp_path / "devices.json"
    monkeypatch.setenv("BDP_DEVICES", str(cfg))
    # no config file at all
    assert_input_error(run_cli("profile", x86_bundle, "--device", "rpi4"), "rpi4", str(cfg), "bdp devices add")
    # a config without that board
    cfg.write_text(json.dumps({"other": {"rpc": f"{HOST}:9"}}))
    assert_input_error(run_cli("profile", x86_bundle, "--device", "rpi4"), "unknown device 'rpi4'", "other",
                       "bdp devices add rpi4")
    # corrupt config
    cfg.write_text("{not json")
    assert_input_error(run_cli("profile", x86_bundle, "--device", "rpi4"), "corrupt device config", str(cfg))
    cfg.write_text(json.dumps({"rpi4": {"rpc": "no-port-here"}}))
    assert_input_error(run_cli("profile", x86_bundle, "--device", "rpi4"), "rpi4", "HOST:PORT")
    # contradictory command lines
    assert_input_error(run_cli("profile", x86_bundle, "--rpc", f"{HOST}:1", "--tracker", f"{HOST}:2"), "not both")
    assert_input_error(run_cli("profile", x86_bundle, "--tracker", f"{HOST}:2"), "--key")
    assert_input_error(run_cli("profile", x86_bundle, "--rpc", "nonsense"), "nonsense", "HOST:PORT")


def test_nobody_listening_fails_fast(x86_bundle):
    port = _free_port()
    for flag, extra in (("--rpc", ()), ("--tracker", ("--key", KEY))):
        t = time.time()
        p = run_cli("profile", x86_bundle, flag, f"{HOST}:{port}", *extra, timeout=60)
        line = assert_input_error(p, f"{HOST}:{port}")
        assert "refused" in line
        assert time.time() - t < 15, "a refused connection must not wait for retries"


def test_silent_service_times_out(x86_bundle, monkeypatch):
    monkeypatch.setenv("BDP_RPC_TIMEOUT", "2")
    lis = _SilentListener()
    try:
        t = time.time()
        p = run_cli("profile", x86_bundle, "--tracker", f"{HOST}:{lis.port}", "--key", KEY, timeout=60)
        assert_input_error(p, f"{HOST}:{lis.port}", "2 s")
        assert time.time() - t < 20
        p = run_cli("profile", x86_bundle, "--rpc", f"{HOST}:{lis.port}", timeout=120)
        assert_input_error(p, f"{HOST}:{lis.port}", "handshake")
    finally:
        lis.close()


# ----------------------------------------------------------------------------- pieces

def test_devices_commands(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bdp.toolchain.runtime import boards as config
    from bdp.toolchain.cli_devices import devices

    cfg = tmp_path / "cfg" / "devices.json"
    monkeypatch.setenv("BDP_DEVICES", str(cfg))
    r = CliRunner()
    assert r.invoke(devices, ["list"]).exit_code == 0
    assert r.invoke(devices, ["add", "pi", "--rpc", f"{HOST}:9090"]).exit_code == 0
    res = r.invoke(devices, ["add", "farm", "--tracker", f"{HOST}:9190", "--timeout", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads(cfg.read_text()) == {"pi": {"rpc": f"{HOST}:9090"},
                                           "farm": {"tracker": f"{HOST}:9190", "key": "farm", "timeout": 5.0}}
    out = r.invoke(devices, ["list"]).output
    assert "pi" in out and "farm" in out and f"{HOST}:9190" in out
    ep = config.resolve_device("farm")
    assert ep.tracker == (HOST, 9190) and ep.key == "farm" and ep.timeout == 20.0  # BDP_RPC_TIMEOUT wins
    ep = config.resolve_device("farm", tracker=f"{HOST}:9191", key="k2")  # the command line wins
    assert ep.tracker == (HOST, 9191) and ep.key == "k2"
    for bad in (["add", "x", "--rpc", "nohost"], ["add", "local", "--rpc", f"{HOST}:1"],
                ["add", "y", "--rpc", f"{HOST}:1", "--tracker", f"{HOST}:2"], ["remove", "nosuch"]):
        res = r.invoke(devices, bad)
        assert res.exit_code == 2, (bad, res.output)
    assert r.invoke(devices, ["remove", "pi"]).exit_code == 0
    assert set(json.loads(cfg.read_text())) == {"farm"}


def test_kernel_calls_from_bytecode(x86_bundle, aarch64_bundle):
    """The kernel calls and shapes are read from the VM bytecode, for either architecture."""
    from bdp.toolchain.runtime import remote
    from bdp.toolchain.bundle.format import read_manifest

    calls = remote.kernel_calls(str(x86_bundle / "model.so"), read_manifest(str(x86_bundle)))
    names = {c.name for c in calls}
    assert any("bdp_binary_conv" in n for n in names), names
    first = calls[0]
    assert first.args[0][:3] == ("tensor", IN_SHAPE, "float32")
    packed = [a for c in calls if "bdp_binary_conv" in c.name for a in c.args if a[0] == "tensor"
              and a[2].startswith("uint")]  # the word width (8..64 bits) follows the group's channels
    assert packed and all(isinstance(a[3], np.ndarray) for a in packed)  # packed weights keep their bits
    arm = remote.kernel_calls(str(aarch64_bundle / "model.so"), read_manifest(str(aarch64_bundle)))
    assert arm and all(a[1] == IN_SHAPE for c in arm for a in c.args if a[0] == "tensor")
