"""Every zoo architecture exports once to ONNX and compiles from it for x86 and for rpi4.

* the x86 bundle equals PyTorch in eval mode for every task head, with every binary conv (and
  binary kernel == stride transposed conv) the architecture has running packed;
* the rpi4 bundle runs through its own ``bin/bdp-run`` under qemu-aarch64 (the same path as
  ``bdp run`` on an arm64 bundle) and equals both the x86 bundle and PyTorch.
"""

import json

import numpy as np
import onnx
import pytest
import torch

import bdp
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint
from bdp.targets.devices import aarch64
from bdp.toolchain.frontend.loading import to_onnx
from bdp.toolchain.runtime.run import run_bundle

from conftest import assert_close_outputs, like_trained

SHAPE = (1, 3, 32, 48)

# per-input-channel activation scales (BiDense DAB) do not factor out of a binary dot product;
# those convs stay float (the compile report says why). Every other binary conv must be packed.
FLOAT_BY_DESIGN = {"bidense"}


def _binary_layers(model):
    return sum(1 for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
               and type(m).__name__.startswith(("Binary", "BiDense")))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_zoo_arch_compiles_and_matches_pytorch_on_x86_and_rpi4(arch, tmp_path):
    ok, reason = aarch64.tools_available()
    if not ok:
        pytest.fail(f"AArch64 tools missing (CI must install them): {reason}")
    torch.manual_seed(0)
    model = like_trained(zoo.build(arch), shape=SHAPE)
    ck = save_checkpoint(model, str(tmp_path / "m.pt"))
    onx = tmp_path / "m.onnx"
    onnx.save(to_onnx(ck, SHAPE)[0], str(onx))  # exported once, compiled twice

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    net = bdp.load_model(ck)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in net(torch.from_numpy(x)).items()}

    out = bdp.compile(str(onx), target="x86", out=str(tmp_path / "x86"), input_shape=SHAPE)
    man = json.loads((tmp_path / "x86" / "manifest.json").read_text())
    if arch not in FLOAT_BY_DESIGN:
        assert man["stats"]["binary_convs"] == _binary_layers(model), man["stats"]
    tasks = [o["name"] for o in man["outputs"]]
    assert tasks == list(getattr(net, "tasks", tasks))
    got_x86 = bdp.load(out)(x)
    assert_close_outputs(got_x86, want, rtol=1e-4)

    arm = bdp.compile(str(onx), target="rpi4", out=str(tmp_path / "rpi4"), input_shape=SHAPE)
    arm_man = json.loads((tmp_path / "rpi4" / "manifest.json").read_text())
    assert arm_man["stats"]["binary_convs"] == man["stats"]["binary_convs"]
    np.save(tmp_path / "x.npy", x)
    got_arm = run_bundle(arm, str(tmp_path / "x.npy"))  # bin/bdp-run under qemu-aarch64
    assert sorted(got_arm) == sorted(got_x86)
    assert_close_outputs(got_arm, got_x86, rtol=1e-4)
    assert_close_outputs(got_arm, want, rtol=1e-4)
