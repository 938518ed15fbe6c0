"""The bundle manifest (issue 15, item 5; house issue item 3): one schema, every fault exit 2.

``manifest.json`` is the one file its own sha256 list cannot cover, so a hand-edited one must be
refused by the schema with one line, never reach Python as a KeyError or TVM as a match_cast
error (exit 1).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bdp.errors import InputError
from bdp.toolchain.bundle.manifest import Manifest
from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, copy_bundle, shared_bundle

RUNNER_SOURCE = Path(__file__).resolve().parents[1] / "targets" / "devices" / "runtime" / "bdp_run.cc"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def good(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _nest(depth):
    v = 1
    for _ in range(depth):
        v = {"a": v}
    return v


def _edits():
    """(name, edit function on the manifest dict, text the error must name)."""
    def setp(path, value):
        def f(d):
            *head, last = path
            for k in head:
                d = d[k]
            d[last] = value
        return f

    def delete(key):
        return lambda d: d.pop(key)

    return [
        ("format_version true", setp(["format_version"], True), "format_version"),
        ("format_version -7", setp(["format_version"], -7), "format_version"),
        ("format_version newer", setp(["format_version"], 99), "newer"),
        ("format other", setp(["format"], "other-tool"), "not a bdp bundle"),
        ("input null", setp(["input"], None), "'input'"),
        ("outputs 5", setp(["outputs"], 5), "'outputs'"),
        ("outputs empty", setp(["outputs"], []), "'outputs'"),
        ("bogus dtype", setp(["input", "dtype"], "complex1024"), "dtype"),
        ("shape of strings", setp(["input", "shape"], ["1", 3, 8, 8]), "input.shape"),
        ("negative dim", setp(["input", "shape"], [1, 3, -8, 8]), "input.shape"),
        ("bool dim", setp(["input", "shape"], [True, 3, 8, 8]), "input.shape"),
        ("huge shape", setp(["input", "shape"], [100000, 100000, 100000]), "elements"),
        ("output name path", setp(["outputs", 0, "name"], "../../etc/passwd"), "file name"),
        ("output name twice", lambda d: d["outputs"].append(dict(d["outputs"][0])), "twice"),
        ("file outside", lambda d: d["files"].update({"../evil.so": d["files"]["model.so"]}), "outside the bundle"),
        ("absolute file", lambda d: d["files"].update({"/etc/passwd": d["files"]["model.so"]}), "outside the bundle"),
        ("sha not hex", setp(["files", "model.so", "sha256"], "zz"), "sha256"),
        ("no files", delete("files"), "'files'"),
        ("no target", delete("target"), "'target'"),
        ("arch bogus", setp(["target", "arch"], "sparc"), "target.arch"),
        ("library elsewhere", setp(["library"], "lib/other.so"), "lists no lib/other.so"),
        ("deep nesting", setp(["stats", "deep"], _nest(50)), "nested"),
        ("preprocess std zero", setp(["input", "preprocess", "std"], [0, 1, 1]), "std"),
        ("preprocess scale nan", setp(["input", "preprocess", "scale"], float("nan")), "scale"),
        ("stats negative", setp(["stats", "binary_convs"], -1), "stats.binary_convs"),
        ("task bogus", setp(["outputs", 0, "task"], "telepathy"), "task"),
    ]


@pytest.mark.parametrize("name,edit,needle", _edits(), ids=[e[0] for e in _edits()])
def test_schema_refuses(good, name, edit, needle):
    d = copy.deepcopy(good)
    edit(d)
    with pytest.raises(InputError) as e:
        Manifest.from_dict(d, where="m.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("m.json"), msg
    assert needle in msg, (needle, msg)


def test_round_trip(bundle, good):
    man = Manifest.read(bundle)
    assert man.to_dict() == good
    assert Manifest.from_dict(man.to_dict()) == man
    assert man.input.shape == list(SHAPE) and man["input"]["shape"] == list(SHAPE)
    assert man.output_names == [o["name"] for o in good["outputs"]]
    assert man.files["model.so"].sha256 == good["files"]["model.so"]["sha256"]


def _edited(bundle, tmp_path, edit, raw=None):
    b = copy_bundle(bundle, tmp_path / "b")
    if raw is not None:
        (b / "manifest.json").write_bytes(raw)
    else:
        d = json.loads((b / "manifest.json").read_text())
        edit(d)
        (b / "manifest.json").write_text(json.dumps(d))
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(d["input"]["shape"] if raw is None and isinstance(d.get("input"), dict)
                        and isinstance(d["input"].get("shape"), list) and all(isinstance(v, int) for v in d["input"]["shape"])
                        else SHAPE, np.float32))
    return b, x


@pytest.mark.parametrize("case", ["format_version true", "input null", "outputs 5", "bogus dtype", "deep nesting"])
def test_cli_exit_2_on_edited_manifest(bundle, tmp_path, case):
    edit = {e[0]: e[1] for e in _edits()}[case]
    b, x = _edited(bundle, tmp_path, edit)
    assert_input_error(run_cli("run", b, "--input", x, "-o", tmp_path / "o.npz"), "manifest")
    assert not (tmp_path / "o.npz").exists()


def test_edited_input_shape_is_exit_2_not_match_cast(bundle, tmp_path):
    """The manifest says 16x16, the library was compiled for 8x8: TVM's match_cast error
    becomes one line naming the manifest."""
    def edit(d):
        d["input"]["shape"] = [1, 3, 16, 16]

    b, x = _edited(bundle, tmp_path, edit)
    line = assert_input_error(run_cli("run", b, "--input", x), "manifest.json was edited")
    assert "match_cast" not in line


def test_raw_manifest_faults(bundle, tmp_path):
    for i, raw in enumerate([b"", b"{", b"[1, 2]", b"\xff\xfe", b"[" * 100000 + b"]" * 100000,
                             b'{"format_version": 1, "pad": "' + b"x" * (2 << 20) + b'"}']):
        b, x = _edited(bundle, tmp_path / str(i), None, raw=raw)
        assert_input_error(run_cli("run", b, "--input", x), "manifest")


def test_a_file_given_as_bundle(tmp_path):
    (tmp_path / "model.so").write_bytes(b"x")
    assert_input_error(run_cli("run", tmp_path / "model.so", "--input", tmp_path / "x.npy"), "is a file",
                       "not a bundle folder")


def test_keys_bdp_run_reads_are_pinned(bundle):
    """bin/bdp-run (targets/devices/runtime/bdp_run.cc) reads these manifest keys with get_key(); the
    manifest bdp writes must keep giving them the types the runner expects. A new key read by
    the runner, or a renamed one in the manifest, fails here."""
    src = RUNNER_SOURCE.read_text()
    keys = set(re.findall(r'get_key\([^;]*?"([A-Za-z0-9_]+)"\)', src))
    assert keys == {"outputs", "name", "input", "inputs", "shape", "files", "sha256"}, keys
    d = Manifest.read(bundle).to_dict()
    assert isinstance(d["outputs"], list) and all(isinstance(o["name"], str) and "/" not in o["name"]
                                                  for o in d["outputs"])
    assert all(isinstance(v, int) and v > 0 for v in d["input"]["shape"])
    assert isinstance(d["files"], dict) and "model.so" in d["files"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", v["sha256"]) for v in d["files"].values())
