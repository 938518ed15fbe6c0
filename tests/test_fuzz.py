"""Seeded fuzzing of bdp's own files (issue 15, "done when"): bdp's exported ONNX, a checkpoint and
a bundle manifest, mutated 200+ times in all.

Each mutant goes through the command line's own entry point (``bdp.toolchain.cli.main``, in
this process for speed; a sample through the real ``bdp`` subprocess). The only outcomes
accepted:

* exit 0, and the outputs equal onnxruntime's on the mutant (export: the exported graph against
  the mutant; checkpoint: the exported graph against the PyTorch module bdp loads; run: the
  bundle's outputs against the source model);
* exit 2 with one line on stderr;

never a traceback, a signal, exit 1, or a file left behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import like_trained
from hostile_common import SHAPE, copy_bundle, onnxruntime_outputs, shared_bundle

pytestmark = pytest.mark.slow

SEED = 15
IN_SHAPE = (1, 3, 32, 40)
N_ONNX, N_CKPT, N_MANIFEST = 80, 40, 90  # 210 cases
RTOL = 1e-4


# ------------------------------------------------------------------------------------ harness

def cli(*args):
    """(exit code, stderr) of ``bdp ARGS`` run in this process through the CLI's entry point."""
    from bdp.toolchain.cli import main

    err, out = io.StringIO(), io.StringIO()
    old = signal.getsignal(signal.SIGTERM)
    env = os.environ.pop("BDP_DEBUG", None)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main.main([str(a) for a in args], prog_name="bdp")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, old)
        if env is not None:
            os.environ["BDP_DEBUG"] = env
    return code, err.getvalue()


def subprocess_cli(*args):
    env = dict(os.environ)
    env.pop("BDP_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "bdp.toolchain.cli", *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=900)
    return p.returncode, p.stderr


def check_outcome(case, code, err, allowed_files, folder):
    assert code in (0, 2), f"{case}: exit {code}: {err[-800:]}"
    assert "Traceback" not in err, f"{case}: {err[-800:]}"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("bdp: error: "), f"{case}: {err[-800:]}"
    left = sorted(set(os.listdir(folder)) - set(allowed_files))
    if code == 2:
        assert not left, f"{case}: exit 2 left {left}"
    else:
        assert all(not n.startswith(".") for n in left), f"{case}: left {left}"


def assert_same(case, got, want):
    assert len(got) == len(want), f"{case}: {len(got)} outputs, expected {len(want)}"
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{case}: shape {a.shape} vs {b.shape}"
        scale = max(1.0, float(np.nanmax(np.abs(b))) if b.size and np.isfinite(b).any() else 1.0)
        both_nan = np.isnan(a) & np.isnan(b)
        d = np.where(both_nan, 0.0, np.abs(a.astype(np.float64) - b))
        assert float(np.nanmax(d) if d.size else 0.0) / scale <= RTOL, f"{case}: differs by {np.nanmax(d) / scale:.3g}"


def ort_run(model_bytes_or_path, x):
    """onnxruntime's outputs (graph order) or None when it cannot run the model."""
    import onnxruntime as ort

    from bdp.passes.ops import register_schemas

    register_schemas()
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        src = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
        sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception:  # onnxruntime raises its own kinds for models it rejects
        return None


# ------------------------------------------------------------------------------------ sources

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from bdp.models import zoo
    from bdp.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("fuzz-src")
    torch.manual_seed(SEED)
    net = like_trained(zoo.build("bireal-tiny", width=8, blocks=1), seed=SEED, shape=IN_SHAPE)
    save_checkpoint(net, d / "ck.pt")
    code, err = cli("export", d / "ck.pt", "-o", d / "model.onnx", "--input-shape", ",".join(map(str, IN_SHAPE)))
    assert code == 0, err
    return d


# ------------------------------------------------------------------------------------ ONNX

def _mutate_onnx(data: bytes, rng) -> tuple[str, bytes]:
    kind = rng.integers(0, 10)
    if kind <= 2:  # flip bytes anywhere
        b = bytearray(data)
        n = int(rng.integers(1, 9))
        for i in rng.integers(0, len(b), n):
            b[i] ^= int(rng.integers(1, 256))
        return f"flip{n}", bytes(b)
    if kind == 3:
        return "truncate", data[: int(rng.integers(0, len(data)))]
    m = onnx.load_model_from_string(data)
    g = m.graph
    if kind == 4 and g.node:  # an attribute of a node
        node = g.node[int(rng.integers(0, len(g.node)))]
        if node.attribute:
            a = node.attribute[int(rng.integers(0, len(node.attribute)))]
            v = int(rng.choice([-1, 0, 1, 2, 3, 7, 1 << 20]))
            if a.ints:
                a.ints[int(rng.integers(0, len(a.ints)))] = v
            else:
                a.i = v
            return f"attr {node.op_type}.{a.name}={v}", m.SerializeToString()
    if kind == 5 and g.node:  # rewire an input
        node = g.node[int(rng.integers(0, len(g.node)))]
        if node.input:
            names = [t.name for t in g.initializer] + [o for n in g.node for o in n.output] + ["nope"]
            node.input[int(rng.integers(0, len(node.input)))] = names[int(rng.integers(0, len(names)))]
            return f"rewire {node.op_type}", m.SerializeToString()
    if kind == 6 and g.initializer:  # weights: NaN, inf, huge, wrong dims
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        a = onnx.numpy_helper.to_array(t).copy()
        how = int(rng.integers(0, 3))
        if how == 0 and a.dtype.kind == "f" and a.size:
            a.flat[int(rng.integers(0, a.size))] = rng.choice([np.nan, np.inf, -np.inf, 1e30])
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
            return f"weight value {t.name}", m.SerializeToString()
        if t.dims:
            t.dims[0] = int(rng.choice([0, t.dims[0] + 1, 1 << 30]))
            return f"weight dims {t.name}", m.SerializeToString()
    if kind == 7:  # the input's shape or type
        dims = g.input[0].type.tensor_type.shape.dim
        if dims and rng.integers(0, 2):
            dims[int(rng.integers(0, len(dims)))].dim_value = int(rng.choice([0, 1, 5, 64]))
            return "input dims", m.SerializeToString()
        g.input[0].type.tensor_type.elem_type = int(rng.choice([onnx.TensorProto.INT64, onnx.TensorProto.STRING,
                                                                onnx.TensorProto.DOUBLE]))
        return "input type", m.SerializeToString()
    if kind == 8 and g.node:  # op type or domain
        node = g.node[int(rng.integers(0, len(g.node)))]
        node.op_type = str(rng.choice(["Relu", "Frobnicate", "Sign", "Identity", "Conv"]))
        return f"op {node.op_type}", m.SerializeToString()
    # opset / output names
    if rng.integers(0, 2):
        m.opset_import[0].version = int(rng.choice([1, 7, 12, 99]))
        return f"opset {m.opset_import[0].version}", m.SerializeToString()
    new = str(rng.choice(["../../x", "a/b", "", "x" * 300, "semseg"]))
    g.output[0].name = new
    return f"output name {new[:12]!r}", m.SerializeToString()


def _input_for(model_bytes):
    """A random input of the shape the (mutated) model declares."""
    g = onnx.load_model_from_string(model_bytes).graph
    inits = {t.name for t in g.initializer}
    inp = next(i for i in g.input if i.name not in inits)
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def test_fuzz_onnx(sources, tmp_path):
    rng = np.random.default_rng(SEED)
    data = (sources / "model.onnx").read_bytes()
    accepted, counts = [], {0: 0, 2: 0}
    for i in range(N_ONNX):
        name, mut = _mutate_onnx(data, rng)
        d = tmp_path / f"o{i}"
        d.mkdir()
        (d / "m.onnx").write_bytes(mut)
        code, err = cli("export", d / "m.onnx", "-o", d / "out.onnx")
        case = f"onnx #{i} ({name})"
        check_outcome(case, code, err, {"m.onnx", "out.onnx"}, d)
        counts[code] += 1
        if code == 0:
            x = _input_for(mut)
            want = ort_run(mut, x)
            if want is None:
                # export rewrites without running the model; the compile runs it and must refuse
                code, err = cli("compile", d / "m.onnx", "-o", d / "b")
                check_outcome(case + " compile", code, err, {"m.onnx", "out.onnx"}, d)
                assert code == 2, f"{case}: compiled a model onnxruntime cannot run"
                continue
            got = ort_run(d / "out.onnx", x)
            assert got is not None, f"{case}: onnxruntime cannot run bdp's export"
            assert_same(case, got, want)
            accepted.append((case, d / "m.onnx", x, want))
    assert counts[0] and counts[2], counts  # the mutations exercise both outcomes

    # a sample through the real command line: compile and run, against onnxruntime
    for case, path, x, want in accepted[:3]:
        out = path.parent / "b"
        code, err = subprocess_cli("compile", path, "-o", out)
        check_outcome(case + " compile", code, err, {"m.onnx", "out.onnx", "b"}, path.parent)
        if code == 0:
            np.save(path.parent / "x.npy", x)
            code, err = subprocess_cli("run", out, "--input", path.parent / "x.npy", "-o", path.parent / "y.npz")
            assert code == 0, err
            with np.load(path.parent / "y.npz") as z:
                got = [z[k] for k in z.files]
            assert_same(case + " run", got, want)


# ------------------------------------------------------------------------------------ checkpoint

def _mutate_checkpoint(ck: dict, rng) -> tuple[str, dict]:
    ck = copy.deepcopy(ck)
    kind = int(rng.integers(0, 9))
    cfg, state = ck["config"], ck["state_dict"]
    keys = sorted(state)
    if kind == 0:  # a config value of another type or range
        k = str(rng.choice(sorted(cfg)))
        cfg[k] = [10**9, -1, "abc", 2.5, None, [1] * 100, {"a": 1}, True, 0][int(rng.integers(0, 9))]
        return f"config {k}={cfg[k]!r:.20}", ck
    if kind == 1:
        cfg[str(rng.choice(["evil", "width2", "__class__"]))] = 1
        return "config extra key", ck
    if kind == 2:
        k = keys[int(rng.integers(0, len(keys)))]
        del state[k]
        return f"state missing {k}", ck
    if kind == 3:
        k = keys[int(rng.integers(0, len(keys)))]
        state[k] = torch.zeros(tuple(int(s) + 1 for s in state[k].shape) or (2,))
        return f"state shape {k}", ck
    if kind == 4:
        k = next(k for k in keys if state[k].is_floating_point() and state[k].numel())
        state[k] = state[k].clone()
        state[k].view(-1)[0] = float(rng.choice([np.nan, np.inf]))
        return f"state nan/inf {k}", ck
    if kind == 5:
        ck[str(rng.choice(["format", "arch", "version"]))] = rng.choice(["x", 99, None])
        return "header", ck
    if kind == 6:
        k = keys[int(rng.integers(0, len(keys)))]
        state[k] = state[k].to(torch.float64) if state[k].is_floating_point() else state[k]
        return f"state float64 {k} (accepted: cast on load)", ck
    if kind == 7:
        ck["meta"] = {"note": "x" * int(rng.integers(0, 100)), "epoch": int(rng.integers(0, 10))}
        return "meta (accepted)", ck
    ck["state_dict"] = {"unexpected.weight": torch.zeros(1)} if rng.integers(0, 2) else []
    return "state replaced", ck


def test_fuzz_checkpoint(sources, tmp_path):
    import bdp

    rng = np.random.default_rng(SEED + 1)
    base = torch.load(sources / "ck.pt", weights_only=True)
    x = np.random.default_rng(2).standard_normal(IN_SHAPE).astype(np.float32)
    counts = {0: 0, 2: 0}
    for i in range(N_CKPT):
        if i % 5 == 4:  # raw byte damage of the file
            b = bytearray((sources / "ck.pt").read_bytes())
            for j in rng.integers(0, len(b), int(rng.integers(1, 5))):
                b[j] ^= int(rng.integers(1, 256))
            name, blob = "flip", bytes(b)
        else:
            name, ck = _mutate_checkpoint(base, rng)
            buf = io.BytesIO()
            torch.save(ck, buf)
            blob = buf.getvalue()
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "ck.pt").write_bytes(blob)
        case = f"checkpoint #{i} ({name})"
        code, err = cli("export", d / "ck.pt", "-o", d / "out.onnx", "--plain", "--input-shape",
                        ",".join(map(str, IN_SHAPE)))
        check_outcome(case, code, err, {"ck.pt", "out.onnx"}, d)
        counts[code] += 1
        if code == 0:
            with torch.no_grad():
                ref = bdp.load_model(d / "ck.pt")(torch.from_numpy(x))
            got = ort_run(d / "out.onnx", x)
            assert got is not None, f"{case}: onnxruntime cannot run bdp's export"
            assert_same(case, got, [v.numpy() for v in ref.values()])
    assert counts[0] and counts[2], counts


# ------------------------------------------------------------------------------------ manifest

_VALUES = [None, True, False, 0, -7, 1.5, float("inf"), "", "x" * 300, "../../etc", [], [1, -1], {}, {"a": {"b": {}}},
           10**30, "float32", "int64", [1, 3, 8, 8], [1, 3, 16, 16]]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate_manifest(man: dict, rng) -> tuple[str, dict]:
    man = copy.deepcopy(man)
    paths = [p for p in _paths(man) if p]
    p = paths[int(rng.integers(0, len(paths)))]
    parent = man
    for k in p[:-1]:
        parent = parent[k]
    how = int(rng.integers(0, 4))
    if how == 0 and isinstance(parent, dict):
        del parent[p[-1]]
        return f"delete {'.'.join(map(str, p))}", man
    if how == 1:  # deep nesting
        v = 1
        for _ in range(int(rng.integers(5, 60))):
            v = [v]
        parent[p[-1]] = v
        return f"nest {'.'.join(map(str, p))}", man
    v = _VALUES[int(rng.integers(0, len(_VALUES)))]
    parent[p[-1]] = v
    return f"set {'.'.join(map(str, p))}={v!r:.20}", man


def test_fuzz_manifest(tmp_path_factory, tmp_path):
    bundle = shared_bundle(tmp_path_factory)
    model = bundle.parent / "tiny.onnx"
    man = json.loads((bundle / "manifest.json").read_text())
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    want = onnxruntime_outputs(model, x)
    want = [want[o.name] for o in onnx.load(str(model)).graph.output]
    rng = np.random.default_rng(SEED + 2)
    counts = {0: 0, 2: 0}
    for i in range(N_MANIFEST):
        name, mut = _mutate_manifest(man, rng)
        d = tmp_path / f"m{i}"
        d.mkdir()
        b = copy_bundle(bundle, d / "b")
        (b / "manifest.json").write_text(json.dumps(mut))
        np.save(d / "x.npy", x)
        run = subprocess_cli if i % 15 == 0 else cli  # a sample (6) through the real command line
        code, err = run("run", b, "--input", d / "x.npy", "-o", d / "y.npz")
        case = f"manifest #{i} ({name})"
        check_outcome(case, code, err, {"b", "x.npy", "y.npz"}, d)
        counts[code] += 1
        if code == 0:
            with np.load(d / "y.npz") as z:
                got = [z[k] for k in z.files]
            assert_same(case, got, want)
    assert counts[0] and counts[2], counts
