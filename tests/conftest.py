import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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


def like_trained(model, seed=0, shape=(1, 3, 32, 40)):
    """Give an untrained model trained-like statistics: BN running stats from a few batches and
    non-zero biases/thresholds. (An untrained binary net puts exact integer ties right on the next
    sign's threshold, where any float implementation's summation order decides the bit.)"""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, *shape[2:], generator=g))
        for n, p in model.named_parameters():
            if p.dim() <= 1 or n.endswith("bias") or "beta" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()
