"""Every zoo architecture exports, compiles for x86 and runs; the bundle equals PyTorch in eval
mode for every task head, with the binary convs the architecture has running packed."""

import json

import numpy as np
import pytest
import torch

import bdp
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint

from conftest import assert_close_outputs, like_trained

SHAPE = (1, 3, 32, 48)

# per-input-channel activation scales (BiDense DAB) do not factor out of a binary dot product;
# those convs stay float (the compile report says why). Every other binary conv must be packed.
FLOAT_BY_DESIGN = {"bidense"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_zoo_arch_compiles_and_matches_pytorch(arch, tmp_path):
    torch.manual_seed(0)
    model = like_trained(zoo.build(arch), shape=SHAPE)
    ck = save_checkpoint(model, str(tmp_path / "m.pt"))
    out = bdp.compile(ck, target="x86", out=str(tmp_path / "b"), input_shape=SHAPE)
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    n_binary = sum(1 for m in model.modules()
                   if isinstance(m, (torch.nn.Conv2d,)) and type(m).__name__.startswith(("Binary", "BiDense")))
    if arch not in FLOAT_BY_DESIGN:
        assert man["stats"]["binary_convs"] == n_binary, (man["stats"], n_binary)
    tasks = [o["name"] for o in man["outputs"]]
    net = bdp.load_model(ck)
    assert tasks == list(getattr(net, "tasks", tasks))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    got = bdp.load(out)(x)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in net(torch.from_numpy(x)).items()}
    assert_close_outputs(got, want, rtol=1e-4)
