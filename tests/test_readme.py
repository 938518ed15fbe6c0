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
    for heading in ("## Using it", "### Boards (remote profiling)"):
        for lang, code in re.findall(r"```(sh|python)\n(.*?)```", _section(text, heading), re.S):
            out.append((heading, lang, code))
    return out


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
