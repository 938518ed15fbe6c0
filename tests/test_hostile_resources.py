"""Resources a file may make bdp take (issue 15, item 3; NaN weights of item 8).

A checkpoint's config is validated (types, ranges) and its model built on torch's meta device
before anything is allocated; an input shape is refused with the size it would need; a file
whose declared sizes are too large is refused before torch reads it. Each case must be a quick
exit 2 with one line, not minutes of allocation.
"""

from __future__ import annotations

import struct
import time
import zipfile

import onnx
import pytest
import torch
from onnx import numpy_helper

from bdp.models import zoo
from conftest import assert_input_error, run_cli
from hostile_common import tiny_onnx


def _checkpoint(path, arch="bireal-tiny", config=None, state=None):
    torch.save({"format": "bdp-checkpoint", "version": 1, "arch": arch, "config": config or {},
                "state_dict": state if state is not None else {}, "meta": {}}, path)
    return path


def _timed_refusal(tmp_path, *args, needles=(), limit_s=120):
    t = time.monotonic()
    p = run_cli(*args)
    took = time.monotonic() - t
    line = assert_input_error(p, *needles)
    assert took < limit_s, f"took {took:.0f} s to refuse"
    return line


@pytest.mark.parametrize("config,needles", [
    ({"blocks": 10**9}, ("blocks", "1 to 16")),
    ({"width": 100000}, ("width", "1 to 512")),
    ({"width": "abc"}, ("width", "'abc'")),
    ({"width": -3}, ("width",)),
    ({"width": 2.5}, ("width",)),
    ({"tasks": ["semseg"] * 1000}, ("tasks",)),
    ({"num_classes": True}, ("num_classes",)),
    ({"evil": "__import__('os')"}, ("'evil' is not one of its settings",)),
    ({"width": 512, "blocks": 16}, ("GiB of weights",)),
])
def test_hostile_configs_are_refused_before_building(tmp_path, config, needles):
    ck = _checkpoint(tmp_path / "ck.pt", config=config)
    _timed_refusal(tmp_path, "compile", ck, "-o", tmp_path / "b", needles=("ck.pt",) + needles)
    assert not (tmp_path / "b").exists()


def test_huge_input_shape_says_what_it_would_need(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx", shape=(1, 3, 8, 8))
    line = _timed_refusal(tmp_path, "compile", model, "-o", tmp_path / "b", "--input-shape", "1,3,100000,100000",
                          needles=("--input-shape", "GiB"))
    assert "111.8 GiB" in line, line



def test_activations_beyond_the_memory_limit_are_refused(tmp_path):
    """Under the input cap but over what the process may use (here ulimit -v 6 GiB, a real
    limit): the activations are estimated before the export, so it is a quick exit 2, not an
    out-of-memory fault of onnxruntime two minutes later."""
    import resource
    import subprocess
    import sys

    from bdp.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ck = tmp_path / "ck.pt"
    save_checkpoint(zoo.build("bireal-tiny", width=8, blocks=1), ck)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", "compile", str(ck), "-o", str(tmp_path / "b"),
                        "--input-shape", "1,3,6000,6000"], preexec_fn=limit, capture_output=True, text=True,
                       timeout=600)
    assert_input_error(p, "ck.pt", "GiB of memory", "ulimit")
    assert time.monotonic() - t < 120
    assert not (tmp_path / "b").exists()


def test_lying_archive_sizes_are_refused(tmp_path):
    """A checkpoint whose zip directory claims members of terabytes (a zip bomb, a storage size
    that lies) is refused before torch unpacks anything."""
    ck = _checkpoint(tmp_path / "ck.pt")
    zf = zipfile.ZipFile(ck)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as out:
        for info in zf.infolist():
            out.writestr(info.filename, zf.read(info.filename))
    raw = bytearray(big.read_bytes())
    pos = raw.rfind(b"PK\x01\x02")  # the last central directory entry claims 4 GiB unpacked
    struct.pack_into("<I", raw, pos + 24, 0xFFFFFFF0)
    big.write_bytes(bytes(raw))
    _timed_refusal(tmp_path, "compile", big, "-o", tmp_path / "b", needles=("big.pt",))


def test_nan_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    net = zoo.build("bireal-tiny", width=8, blocks=1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[name][0, 0, 0, 0] = float("nan")
    ck = _checkpoint(tmp_path / "nan.pt", config=dict(net.bdp_config), state=state)
    _timed_refusal(tmp_path, "compile", ck, "-o", tmp_path / "b", needles=("nan.pt", name, "NaN"))

    model = onnx.load(tiny_onnx(tmp_path / "m.onnx"))
    init = model.graph.initializer[0]
    a = numpy_helper.to_array(init).copy()
    a.flat[3] = float("nan")
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(model, tmp_path / "nan.onnx")
    _timed_refusal(tmp_path, "compile", tmp_path / "nan.onnx", "-o", tmp_path / "b",
                   needles=("nan.onnx", init.name, "NaN"))
    assert not (tmp_path / "b").exists()


def test_config_validation_accepts_every_default():
    for name, arch in zoo.ARCHITECTURES.items():
        assert zoo.validate_config(name, dict(arch.defaults)) == dict(arch.defaults)
        m = zoo.build_checked(name, {}, device="meta")
        assert next(m.parameters()).is_meta
