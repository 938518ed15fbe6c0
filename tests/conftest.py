import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")

# The fast tier (`pytest -m "not slow"`, under 5 minutes on 2 cores) is every test that is not
# marked slow by hand and took at most FAST_BUDGET_S seconds when last measured on a 2-core
# machine: tests/durations.json, written by `pytest --record-durations tests/durations.json`.
# A new test counts as fast until measured; CI runs every tier.
FAST_BUDGET_S = 2.5
DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_addoption(parser):
    parser.addoption("--record-durations", default=None, metavar="PATH",
                     help="write each test's call duration (seconds, setup included) to PATH as JSON")


def pytest_collection_modifyitems(config, items):
    import json

    try:
        with open(DURATIONS) as f:
            measured = json.load(f)
    except (OSError, ValueError):
        return
    for item in items:
        if measured.get(item.nodeid, 0.0) > FAST_BUDGET_S and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


_DURATIONS: dict = {}


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--record-durations")
    if path:
        import json

        old = {}
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            pass
        old.update({k: round(v, 2) for k, v in _DURATIONS.items()})
        with open(path, "w") as f:
            json.dump(dict(sorted(old.items())), f, indent=0)


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
