"""Output paths (issue 15, items 2 and 6): no user file is lost, a failed command leaves nothing.

A folder is replaced only when it is a bdp bundle by its manifest (``"format": "bdp-bundle"``)
holding nothing but what that manifest lists, or a picture folder holding only this bundle's
pictures; anything else is exit 2 unless ``--force``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

from conftest import assert_input_error, run_cli
from hostile_common import SHAPE, shared_bundle, tiny_onnx, tree


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_onnx(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


def _web_app(folder):
    """A user's folder that happens to hold a manifest.json (a web app)."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (folder / "index.html").write_text("<html>my work</html>")
    (folder / "notes.txt").write_text("three weeks of notes")
    return folder


def test_compile_never_replaces_a_users_folder(model, tmp_path):
    app = _web_app(tmp_path / "app")
    before = {p: (app / p).read_bytes() for p in tree(app)}
    p = run_cli("compile", model, "-o", app)
    assert_input_error(p, "app", "not a bdp bundle", "--force")
    assert {p: (app / p).read_bytes() for p in tree(app)} == before
    assert sorted(os.listdir(tmp_path)) == ["app"]  # no temporary folder left beside it

    # a plain folder of files and a file named as the bundle
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    assert_input_error(run_cli("compile", model, "-o", tmp_path / "docs"), "docs", "--force")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "x"
    (tmp_path / "file").write_text("keep")
    assert_input_error(run_cli("compile", model, "-o", tmp_path / "file"), "file")
    assert (tmp_path / "file").read_text() == "keep"
    # a parent that is a file
    assert_input_error(run_cli("compile", model, "-o", tmp_path / "file" / "b"), "is a file")


def test_recompile_keeps_files_a_user_put_in_a_bundle(bundle, model, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (b / "my-calibration.yaml").write_text("camera: 3")
    p = run_cli("compile", model, "-o", b)
    assert_input_error(p, "my-calibration.yaml", "--force")
    assert (b / "my-calibration.yaml").read_text() == "camera: 3"
    (b / "my-calibration.yaml").unlink()
    (b / "lib").mkdir()  # an empty folder the manifest does not account for
    assert_input_error(run_cli("compile", model, "-o", b), "lib")


def test_recompile_over_a_bundle_and_force(bundle, model, tmp_path):
    """A clean bundle is replaced; --force replaces any folder (and says nothing was kept)."""
    import bdp
    from bdp.toolchain.bundle.format import read_manifest

    app = _web_app(tmp_path / "app")
    p = run_cli("compile", model, "-o", app, "--force")
    assert p.returncode == 0, p.stderr
    assert not (app / "index.html").exists()
    read_manifest(app)  # a valid bundle now
    bdp.compile(str(model), out=str(app))  # a bdp bundle holding only its files: replaced
    assert read_manifest(app)["format"] == "bdp-bundle"
    assert sorted(n for n in os.listdir(tmp_path)) == ["app"]


def test_run_outputs(bundle, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
    # -o is a folder / its parent is a file / unwritable
    (tmp_path / "d").mkdir()
    assert_input_error(run_cli("run", bundle, "--input", x, "-o", tmp_path / "d"), "is a folder")
    (tmp_path / "f").write_text("")
    assert_input_error(run_cli("run", bundle, "--input", x, "-o", tmp_path / "f" / "o.npz"), "is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if not os.access(ro, os.W_OK):  # root may write anyway
            assert_input_error(run_cli("run", bundle, "--input", x, "-o", ro / "o.npz"), "not writable")
    finally:
        os.chmod(ro, 0o755)
    # --viz BAD with -o: exit 2 and no out.npz
    p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "out.npz", "--viz", tmp_path / "f" / "pics")
    assert_input_error(p, "is a file")
    assert not (tmp_path / "out.npz").exists()
    # --viz onto a user's folder: refused, untouched; the same folder twice: fine
    pics = tmp_path / "holiday"
    pics.mkdir()
    (pics / "beach.png").write_bytes(b"\x89PNG...")
    assert_input_error(run_cli("run", bundle, "--input", x, "--viz", pics), "beach.png", "--force")
    assert (pics / "beach.png").read_bytes() == b"\x89PNG..."
    for _ in range(2):
        p = run_cli("run", bundle, "--input", x, "-o", tmp_path / "out.npz", "--viz", tmp_path / "viz")
        assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "viz")) == ["depth.png", "overview.png", "semseg.png"]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert not leftovers, leftovers


def test_profile_and_bench_output_paths(bundle, tmp_path):
    (tmp_path / "d").mkdir()
    assert_input_error(run_cli("profile", bundle, "--runs", "1", "--json", tmp_path / "d"), "is a folder")
    assert_input_error(run_cli("bench", "--json", tmp_path / "d"), "is a folder")
    (tmp_path / "f").write_text("")
    assert_input_error(run_cli("bench", "--chart", tmp_path / "f" / "c.png", "--json", tmp_path / "b.json"), "is a file")
    assert not (tmp_path / "b.json").exists()


def test_failed_dump_after_leaves_nothing(tmp_path):
    """--dump-after all on a model that passes run on but does not compile: no OUT.passes/."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    node = onnx.helper.make_node("FrobnicateOp", ["x"], ["y"], name="weird", domain="acme")
    m = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                               opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("acme", 1)],
                               ir_version=9)
    onnx.save(m, tmp_path / "weird.onnx")
    p = run_cli("compile", tmp_path / "weird.onnx", "-o", tmp_path / "b", "--dump-after", "all")
    assert_input_error(p, "weird", "FrobnicateOp")
    assert sorted(os.listdir(tmp_path)) == ["weird.onnx"]


def test_pipeline_name_is_checked(model, tmp_path):
    p = run_cli("compile", model, "-o", tmp_path / "b", "--pipeline", "nope")
    assert_input_error(p, "nope", "default")
    assert sorted(os.listdir(tmp_path)) == []
