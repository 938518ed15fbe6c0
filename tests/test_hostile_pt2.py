"""Hostile ``.pt2`` files (issue 15, item 1): no code from a model file ever runs.

Each payload is built for real from a program ``torch.export.save`` wrote, with a command that
would create a marker file; bdp must refuse the file with exit 2 and one line, and the marker
must never appear. ``torch.export.load`` itself runs the first two (checked here, so the test
would catch bdp calling it unguarded).
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
import torch

from bdp.errors import InputError
from conftest import assert_input_error, run_cli

SHAPE = (1, 3, 32, 40)


class _Evil:
    """Pickles to os.system(COMMAND)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _rewrite(src, dst, edit=None, add=None, drop=()):
    """Copy the zip SRC to DST with EDIT(name, bytes) -> bytes applied, ADD {name: bytes} added."""
    zin = zipfile.ZipFile(src)
    root = zin.namelist()[0].split("/")[0]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename[len(root) + 1:]
            if rel in drop:
                continue
            data = zin.read(info.filename)
            zout.writestr(info.filename, edit(rel, data) if edit else data)
        for rel, data in (add or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _edit_json(member, fn):
    def edit(rel, data):
        if rel != member:
            return data
        obj = json.loads(data)
        fn(obj)
        return json.dumps(obj).encode()

    return edit


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    from bdp.models import zoo

    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    m = zoo.build("bireal-tiny", width=8, blocks=1).eval()
    x = torch.zeros(SHAPE)
    torch.export.save(torch.export.export(m, (x,)), d / "static.pt2")
    dims = {"x": {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=dims), d / "dyn.pt2")
    return d


def _sample_pickle(command):
    buf = io.BytesIO()
    torch.save(_Evil(command), buf)
    return buf.getvalue()


def _set_first_expr(expr):
    def fn(prog):
        vals = prog["graph_module"]["graph"]["sym_int_values"]
        vals[next(iter(vals))]["as_expr"]["expr_str"] = expr

    return fn


def test_pickle_in_sample_inputs_never_runs(programs, tmp_path):
    marker = tmp_path / "PWNED-sample"
    evil = _rewrite(programs / "static.pt2", tmp_path / "evil.pt2",
                    edit=lambda rel, d: _sample_pickle(f"touch {marker}") if rel == "data/sample_inputs/model.pt" else d)
    p = run_cli("compile", evil, "-o", tmp_path / "b")
    line = assert_input_error(p, "evil.pt2", "sample inputs", "--trust-model")
    assert "posix.system" in line
    assert not marker.exists()
    assert not (tmp_path / "b").exists()
    _assert_torch_runs_it(evil, marker)  # torch's own loader runs it: the payload is real


def test_code_in_symbolic_size_never_runs(programs, tmp_path):
    marker = tmp_path / "PWNED-sympy"
    expr = f"__import__('os').system('touch {marker}') or Symbol('s0', positive=True, integer=True)"
    evil = _rewrite(programs / "dyn.pt2", tmp_path / "evil.pt2", edit=_edit_json("models/model.json", _set_first_expr(expr)))
    p = run_cli("compile", evil, "-o", tmp_path / "b", "--input-shape", "1,3,32,40")
    assert_input_error(p, "evil.pt2", "symbolic size", "not plain arithmetic")
    assert not marker.exists()
    _assert_torch_runs_it(evil, marker)


def _assert_torch_runs_it(path, marker):
    """torch.export.load on the file runs the payload (in a subprocess, so this one stays clean)."""
    import subprocess
    import sys

    code = ("import torch, logging; logging.disable(logging.CRITICAL)\n"
            f"try:\n    torch.export.load({str(path)!r})\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert marker.exists(), "the payload did not run under torch.export.load: the test no longer tests anything"
    marker.unlink()


def _refused(path, *needles):
    from bdp.toolchain.frontend.loading import load_exported_program

    with pytest.raises(InputError) as e:
        load_exported_program(path)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_plain_programs_load(programs):
    from bdp.toolchain.frontend.loading import load_exported_program

    for name in ("static.pt2", "dyn.pt2"):
        prog = load_exported_program(programs / name)
        assert isinstance(prog, torch.export.ExportedProgram)


def test_other_code_paths_in_a_pt2_are_refused(programs, tmp_path):
    marker = tmp_path / "PWNED"
    src = programs / "dyn.pt2"

    # a guard (exec'd by torch when the program becomes a module)
    def guard(prog):
        prog["guards_code"].append(f"__import__('os').system('touch {marker}') == 0")

    _refused(_rewrite(src, tmp_path / "g.pt2", edit=_edit_json("models/model.json", guard)), "guard")

    # a node calling a Python function by name (called when the graph is traced)
    def target(prog):
        node = prog["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"

    _refused(_rewrite(src, tmp_path / "t.pt2", edit=_edit_json("models/model.json", target)),
             "torch.os.system", "not an ATen operator")

    def from_file(prog):
        prog["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.from_file.default"

    _refused(_rewrite(src, tmp_path / "f.pt2", edit=_edit_json("models/model.json", from_file)), "from_file")

    # a weight stored as a pickle (torch loads those with weights_only=False)
    def pickled(cfg):
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True

    _refused(_rewrite(src, tmp_path / "w.pt2", edit=_edit_json("data/weights/model_weights_config.json", pickled)),
             "is a pickle")

    # a custom object constant / an AOTInductor library / a legacy member
    _refused(_rewrite(src, tmp_path / "c.pt2", add={"data/constants/custom_obj_0": _sample_pickle("true")}),
             "custom_obj_0")
    _refused(_rewrite(src, tmp_path / "a.pt2", add={"data/aotinductor/model/x.so": b"\x7fELF"}), "aotinductor")
    _refused(_rewrite(src, tmp_path / "l.pt2", add={"serialized_state_dict.pt": _sample_pickle("true")}),
             "serialized_state_dict")

    # symbolic sizes: attribute access, lambdas, dunder names, unknown functions
    for i, expr in enumerate(["Symbol('s0').__class__", "(lambda: 1)()", "eval('1')", "Symbol('os', integer=True)",
                              "Integer(10**10**10)", "Add(Symbol('s0', integer=True), x.y)"]):
        p = _rewrite(src, tmp_path / f"e{i}.pt2", edit=_edit_json("models/model.json", _set_first_expr(expr)))
        _refused(p, "symbolic size")
    assert not marker.exists()


def test_archive_tricks_are_refused(programs, tmp_path):
    src = programs / "static.pt2"
    # the same member twice: Python and torch's zip readers could each pick a different one
    dup = _rewrite(src, tmp_path / "dup.pt2", add={"models/model.json": b"{}"})
    _refused(dup, "twice")
    # truncated / not a zip / empty
    data = src.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.pt2", "cut.pt2")
    (tmp_path / "empty.pt2").write_bytes(b"")
    _refused(tmp_path / "empty.pt2", "empty.pt2")
    # a missing program
    _refused(_rewrite(src, tmp_path / "nomodel.pt2", drop={"models/model.json"}), "models/model.json")


def test_truncated_pt2_is_one_line(programs, tmp_path):
    data = (programs / "static.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: int(len(data) * 0.9)])
    assert_input_error(run_cli("compile", tmp_path / "cut.pt2", "-o", tmp_path / "b"), "cut.pt2")


def test_trust_model_loads_with_torch(programs, tmp_path):
    """--trust-model bypasses the inspection (torch.export.load): a plain program still compiles."""
    from bdp.toolchain.frontend.loading import load_exported_program

    prog = load_exported_program(programs / "static.pt2", trust=True)
    assert isinstance(prog, torch.export.ExportedProgram)
    p = run_cli("export", programs / "static.pt2", "-o", tmp_path / "m.onnx", "--trust-model", "--plain")
    assert p.returncode == 0, p.stderr
