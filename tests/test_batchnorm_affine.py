"""A BatchNorm that cannot fold into a conv (after a ReLU, as in QuickNet, or after a shortcut
add) runs as a per-channel multiply-add: no divide or square root per element in the kernels."""

import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import bdp
from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
                        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net


def test_batchnorm_becomes_a_multiply_add(tmp_path):
    net = _net()
    x = torch.randn(1, 3, 12, 12)
    torch.onnx.export(net, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    import onnx

    model = onnx.load(str(tmp_path / "m.onnx"))
    final, report = run_pipeline(model, "default", shapes={"x": (1, 3, 12, 12)})
    ops = [n.op_type for n in final.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Mul") >= 2, ops
    with torch.no_grad():
        want = net(x).numpy()
    got = run_onnxruntime(final, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.slow
def test_no_divide_or_sqrt_in_an_rpi4_bundle(tmp_path):
    """The disassembly of a Raspberry Pi 4 bundle with BatchNorms after ReLUs holds no fdiv and
    no fsqrt (before: 8 fdiv and 2 fsqrt for this network)."""
    import shutil

    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.fail("aarch64-linux-gnu-objdump missing (binutils-aarch64-linux-gnu, with the cross compiler)")
    net = _net()
    x = torch.randn(1, 3, 16, 16)
    out = bdp.compile(net, x, target="rpi4", out=str(tmp_path / "b"))
    dis = subprocess.run([objdump, "-d", f"{out}/model.so"], capture_output=True, text=True, check=True).stdout
    assert "\tfdiv" not in dis and "\tfsqrt" not in dis, [ln for ln in dis.splitlines() if "fdiv" in ln or "fsqrt" in ln][:5]
