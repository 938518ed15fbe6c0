"""The README's quick start, as a new user types it: ``bdp demo`` in a fresh folder, twice.

The README's first block is ``bash .ci/setup && .venv/bin/bdp demo``; CI has just run
``.ci/setup`` (it is the first half of ``.ci/run``), so this test runs the second half as
written, with the default options (training, the x86 bundle, the photograph, the profile and the
Raspberry Pi 4 bundle under qemu-aarch64), in a temporary folder, then once more in the same
folder: a rerun replaces what the demo wrote. A folder holding a user's file is refused (exit 2,
one line) and left as it was, unless ``--force``.
"""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import assert_input_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BDP = os.path.join(os.path.dirname(sys.executable), "bdp")

# every file the README's quick start promises, and what the demo's docstring lists
PICTURES = ("photo/overview.png", "synthetic/overview.png", "profile.png")
FILES = ("model.pt", "bundle-x86/manifest.json", "bundle-rpi4/manifest.json", "bundle-rpi4/bin/bdp-run",
         "photo/outputs.npz", "synthetic/outputs.npz", "profile.json") + PICTURES


def _quick_start_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Quick start")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def test_quick_start_is_what_ci_and_this_test_run():
    """The README's two commands are the ones this test (demo) and .ci/run (tests) run."""
    blocks = [b.strip() for b in _quick_start_blocks()]
    assert blocks[0] == "bash .ci/setup && .venv/bin/bdp demo", blocks
    test_cmd = blocks[1]
    assert test_cmd == "bash .ci/setup && .venv/bin/python -m pytest -q", blocks
    ci = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run")) if ln.strip() and not ln.startswith("#")]
    assert test_cmd in ci, ci


def _demo(cwd, *args):
    env = dict(os.environ)
    env.pop("BDP_DEBUG", None)
    assert os.path.exists(BDP), f"{BDP}: the console script `pip install -e .` makes"
    return subprocess.run([BDP, "demo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)


def _check_outputs(folder):
    for f in FILES:
        assert (folder / f).is_file(), f
    for p in PICTURES:
        with Image.open(folder / p) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= 200 and im.size[1] >= 100, (p, im.format, im.size)


@pytest.mark.slow
def test_demo_runs_twice_as_the_readme_says(tmp_path):
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "demo-out"
    _check_outputs(out)
    assert "ran under qemu-aarch64" in proc.stdout, proc.stdout[-2000:]
    first = {f: (out / f).stat().st_mtime_ns for f in FILES}

    proc = _demo(tmp_path)  # the second run, over the first one's folder
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_outputs(out)
    assert all((out / f).stat().st_mtime_ns > first[f] for f in FILES), "the rerun did not rewrite everything"
    assert sorted(os.listdir(out)) == sorted(["model.pt", "bundle-x86", "bundle-rpi4", "photo", "synthetic",
                                              "synthetic-scene.png", "profile.json", "profile.png"])

    # a user's file in one of the demo's folders: refused before any work, nothing touched
    (out / "photo" / "notes.txt").write_text("mine")
    before = {f: (out / f).stat().st_mtime_ns for f in FILES}
    proc = _demo(tmp_path)
    line = assert_input_error(proc, "notes.txt")
    assert "--force" in line
    assert (out / "photo" / "notes.txt").read_text() == "mine"
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == before


def test_demo_refuses_a_folder_of_the_users(tmp_path):
    """A folder holding a file the demo does not write is refused before any training."""
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("x")
    proc = _demo(tmp_path, "-o", "mine")
    line = assert_input_error(proc, "thesis.tex", "--force")
    assert "demo folder" in line
    assert sorted(os.listdir(own)) == ["thesis.tex"]
    (tmp_path / "afile").write_text("x")
    assert_input_error(_demo(tmp_path, "-o", "afile"), "afile")
