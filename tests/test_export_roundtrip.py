"""`bdp export` writes ONNX that onnx.checker accepts in full, stock onnxruntime runs, and bdp
compiles again to the same bundle outputs as compiling the checkpoint directly."""

import numpy as np
import onnx
import torch

import bdp
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint
from bdp.passes.core import run_onnxruntime

from conftest import assert_close_outputs, like_trained, run_cli

SHAPE = (1, 3, 32, 48)


def test_export_checks_runs_and_recompiles(tmp_path):
    torch.manual_seed(0)
    model = like_trained(zoo.build("bireal-tiny", width=8), shape=SHAPE)
    ck = save_checkpoint(model, str(tmp_path / "m.pt"))
    onx = tmp_path / "m.onnx"
    proc = run_cli("export", ck, "-o", onx, "--input-shape", ",".join(map(str, SHAPE)))
    assert proc.returncode == 0, proc.stderr
    m = onnx.load(str(onx))
    onnx.checker.check_model(m, full_check=True)
    assert any(n.domain == "bdp" for n in m.graph.node)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in bdp.load_model(ck)(torch.from_numpy(x)).items()}
    got_ort = dict(zip([o.name for o in m.graph.output], run_onnxruntime(m, {m.graph.input[0].name: x})))
    assert_close_outputs(got_ort, want, rtol=1e-4)
    direct = bdp.load(bdp.compile(ck, target="x86", out=str(tmp_path / "direct"), input_shape=SHAPE))(x)
    again = bdp.load(bdp.compile(str(onx), target="x86", out=str(tmp_path / "again")))(x)
    assert_close_outputs(again, direct, rtol=1e-6)
    assert_close_outputs(again, want, rtol=1e-4)
