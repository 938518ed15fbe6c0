import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")


def run_cli(*args, cwd=None, timeout=600):
    """Run `bdp ARGS...` in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ)
    env.pop("BDP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_input_error(proc, *needles):
    """Exit code 2, one line on stderr, no traceback, naming what is wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_close_outputs(got: dict, want: dict, rtol=1e-4):
    assert set(got) == set(want), (set(got), set(want))
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape, (k, a.shape, b.shape)
        scale = max(1.0, float(np.abs(b).max()))
        d = float(np.abs(a - b).max()) / scale
        assert d <= rtol, f"{k}: max relative difference {d:.3g}"


@pytest.fixture
def cli():
    return run_cli
