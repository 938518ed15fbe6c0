"""BiDense DAB in the compiler: a per-sample alpha factors out of the conv (factor-sample-scale),
so the binary conv packs; BiDense's own per-input-channel alpha stays float with its reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bdp
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint
from bdp.models.layers import BiDenseConv
from bdp.passes import run_pipeline
from bdp.passes.core import random_inputs, run_onnxruntime
from bdp.toolchain.frontend.loading import export_torch

from conftest import assert_close_outputs, like_trained


class _Two(torch.nn.Module):
    def __init__(self, alpha):
        super().__init__()
        kw = {"binarizer_kwargs": {"alpha": alpha}}
        self.a = BiDenseConv(3, 16, **kw)
        self.b = BiDenseConv(16, 16, stride=2, **kw)

    def forward(self, x):
        return self.b(self.a(x))


def _export(alpha):
    torch.manual_seed(0)
    m = like_trained(_Two(alpha), shape=(1, 3, 12, 14))
    return export_torch(m, (1, 3, 12, 14))


def test_sample_alpha_factors_out_and_packs():
    src = _export("sample")
    final, rep = run_pipeline(src, "default", verify=True)
    ops = [n.op_type for n in final.graph.node]
    assert ops.count("BinaryConv") == 2 and "Conv" not in ops
    assert sum(1 for p, _, _ in rep.fused if p == "factor-sample-scale") == 2
    feeds = random_inputs(src, seed=3)
    a, b = run_onnxruntime(src, feeds)[0], run_onnxruntime(final, feeds)[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_channel_alpha_stays_float_with_reason():
    final, rep = run_pipeline(_export("channel"), "default")
    assert [n.op_type for n in final.graph.node].count("BinaryConv") == 0
    reasons = [r for _, (o, r) in rep.left_float.items() if o == "Conv" and "per-channel or per-element activation scale" in r]
    assert len(reasons) == 2, rep.left_float


@pytest.mark.slow
def test_bidense_with_sample_alpha_compiles_all_packed(tmp_path):
    shape = (1, 3, 32, 48)
    torch.manual_seed(0)
    model = like_trained(zoo.build("bidense", dab_alpha="sample"), shape=shape)
    ck = save_checkpoint(model, str(tmp_path / "m.pt"))
    out = bdp.compile(ck, target="x86", out=str(tmp_path / "b"), input_shape=shape)
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    n_binary = sum(1 for m in model.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                   and type(m).__name__.startswith(("Binary", "BiDense")))
    assert man["stats"]["binary_convs"] == n_binary, man["stats"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in bdp.load_model(ck)(torch.from_numpy(x)).items()}
    assert_close_outputs(bdp.load(out)(x), want, rtol=1e-4)
