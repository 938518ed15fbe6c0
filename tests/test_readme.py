"""The README's examples run: every shell and Python block under "Using it" and "Boards" is executed
as written, in order, in one fresh folder (the onnx-graphsurgeon habit), so the README cannot
drift from the program. The only change made to a block: the board address of the Boards block
becomes a TVM RPC server started here on loopback (an x86 "board")."""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOARD_ADDRESS = "192.168.1.20:9090"


def _section(text, heading):
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    nxt = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)
    return text[start: start + len(heading) + (nxt.start() if nxt else len(text))]


def readme_blocks():
    """[(section, language, code)] of the sections the README promises to keep runnable."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for heading in RUN_HERE:
        for lang, code in re.findall(r"```(sh|python)\n(.*?)```", _section(text, heading), re.S):
            out.append((heading, lang, code))
    return out


# Every shell block of the README is run by a test, or listed here with the reason it is not.
RUN_HERE = ("## Using it", "### Boards (remote profiling)")
RUN_ELSEWHERE = {
    "## Quick start": "tests/test_demo.py runs `bdp demo` exactly as written (twice, in a fresh folder) and checks "
                      "that the test command is the one .ci/run runs; `.ci/setup` is what CI itself runs first",
}
NOT_RUN = {
    "## Performance": "measurement commands: each runs for minutes to an hour, times the machine and rewrites docs/; "
                      "they are how the recorded figures were made, run by hand on a quiet machine",
}


def _sections_of_blocks(text):
    """[(enclosing headings, language, code)] of every fenced sh/python block."""
    out, heads = [], []
    for m in re.finditer(r"^(#{1,6}) (.*)$|^```(sh|python)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            level = len(m.group(1))
            heads = [h for h in heads if len(h.split(" ")[0]) < level] + [f"{m.group(1)} {m.group(2)}"]
        else:
            out.append((list(heads), m.group(3), m.group(4)))
    return out


def test_every_shell_block_is_run_or_listed():
    """The README cannot grow a command nobody runs: each block is under a section this test runs,
    one another test runs, or one of the short NOT_RUN list."""
    text = open(os.path.join(ROOT, "README.md")).read()
    known = set(RUN_HERE) | set(RUN_ELSEWHERE) | set(NOT_RUN)
    orphans = []
    for heads, lang, code in _sections_of_blocks(text):
        if not any(any(h == k or h.startswith(k + " ") for k in known) for h in heads):
            orphans.append((heads[-1] if heads else "(top)", code.strip().splitlines()[0]))
    assert not orphans, f"README blocks no test runs and no list names: {orphans}"
    assert len(NOT_RUN) <= 3
    for k in known:
        assert any(h == k or h.startswith(k + " ") for h in re.findall(r"^#{1,6} .*$", text, re.M)), k


def test_readme_has_the_blocks():
    blocks = readme_blocks()
    langs = [(h, lang) for h, lang, _ in blocks]
    assert ("## Using it", "sh") in langs and ("## Using it", "python") in langs
    assert ("### Boards (remote profiling)", "sh") in langs
    commands = [ln for _, lang, code in blocks if lang == "sh" for ln in code.splitlines() if ln.strip()]
    assert any(c.startswith("bdp compile") for c in commands) and any(c.startswith("bdp run") for c in commands)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["BDP_DEVICES"] = str(tmp_path / "devices.json")
    env.pop("BDP_DEBUG", None)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        for heading, lang, code in readme_blocks():
            if lang == "python":
                proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=1800)
                assert proc.returncode == 0, f"{heading} python block:\n{code}\n{proc.stderr[-3000:]}"
                continue
            for line in code.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                cmd = line.replace(BOARD_ADDRESS, f"127.0.0.1:{port}")
                proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=1800)
                assert proc.returncode == 0, f"{heading}: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    # what the blocks promise to leave behind
    for made in ("model.pt", "bundle/manifest.json", "out.npz", "pictures/overview.png", "pi/bin/bdp-run",
                 "prof.json", "prof.png"):
        assert (tmp_path / made).exists(), made
