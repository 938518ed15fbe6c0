"""Deployment: Raspberry Pi 4 bundles under qemu through their own runner, CUDA bundles that
build here, images in and pictures out."""

import json
import os

import numpy as np
import pytest
import torch

import bdp
from bdp.errors import InputError
from bdp.models import zoo
from bdp.models.checkpoint import save_checkpoint

from conftest import assert_close_outputs, assert_input_error, like_trained, run_cli

SHAPE = (1, 3, 32, 40)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = like_trained(zoo.build("bireal-tiny", width=16), shape=SHAPE)
    return save_checkpoint(model, str(d / "m.pt"))


@pytest.fixture(scope="module")
def x86_bundle(checkpoint):
    out = os.path.join(os.path.dirname(checkpoint), "bx86")
    return bdp.compile(checkpoint, target="x86", out=out, input_shape=SHAPE)


@pytest.mark.slow
def test_rpi4_bundle_runs_under_qemu_and_matches(checkpoint, x86_bundle, tmp_path):
    out = bdp.compile(checkpoint, target="rpi4", out=str(tmp_path / "brpi"), input_shape=SHAPE)
    man = json.loads((tmp_path / "brpi" / "manifest.json").read_text())
    assert man["target"]["arch"] == "aarch64" and man["target"]["name"] == "rpi4"
    for f in ("bin/bdp-run", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "model.so"):
        assert f in man["files"], f
    assert man["stats"]["binary_convs"] == 6
    # the library really is AArch64 code
    assert (tmp_path / "brpi" / "model.so").read_bytes()[18:20] == (183).to_bytes(2, "little")  # EM_AARCH64
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    p = run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "arm.npz")
    assert p.returncode == 0, p.stderr
    arm = dict(np.load(tmp_path / "arm.npz"))
    x86 = bdp.load(x86_bundle)(x)
    net = bdp.load_model(checkpoint)
    with torch.no_grad():
        want = {k: v.numpy() for k, v in net(torch.from_numpy(x)).items()}
    assert_close_outputs(arm, x86, rtol=1e-5)
    assert_close_outputs(arm, want)
    # wrong shape through the native runner: exit 2, one line
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    assert_input_error(run_cli("run", out, "--input", tmp_path / "bad.npy"), "(1, 3, 8, 8)")
    # an arm64 bundle cannot be loaded in-process on this x86 host
    with pytest.raises(InputError, match="cannot run on this host"):
        bdp.load(out)


def test_cuda_bundle_builds_and_says_it_was_not_run(checkpoint, tmp_path):
    p = run_cli("compile", checkpoint, "--target", "cuda", "-o", tmp_path / "bcuda", "--input-shape",
                ",".join(map(str, SHAPE)))
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "bcuda" / "manifest.json").read_text())
    assert man["target"]["arch"] == "cuda" and man["target"]["run_on_hardware"] is False
    assert "not been run on a GPU" in man["target"]["note"]
    assert "not been run on a GPU" in p.stdout
    assert man["stats"]["binary_convs"] == 6
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(SHAPE, np.float32))
    assert_input_error(run_cli("run", tmp_path / "bcuda", "--input", x), "cannot run on this host")


def test_image_in_pictures_out(x86_bundle, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    p = run_cli("run", x86_bundle, "--input", tmp_path / "photo.jpg", "-o", tmp_path / "o.npz", "--viz",
                tmp_path / "viz")
    assert p.returncode == 0, p.stderr
    out = dict(np.load(tmp_path / "o.npz"))
    assert set(out) == {"semseg", "depth"}
    for name in ("semseg.png", "depth.png", "overview.png"):  # the panels: tests/test_charts.py
        im = Image.open(tmp_path / "viz" / name)
        assert im.size[0] >= 2 * 320 and im.size[1] > 320 * SHAPE[2] // SHAPE[3]
    assert Image.open(tmp_path / "viz" / "overview.png").size[0] >= 3 * 320
    # the image path preprocesses as the manifest says: same result as the .npy of the same tensor
    from bdp.toolchain.runtime.run import load_image

    man = json.loads(open(os.path.join(x86_bundle, "manifest.json")).read())
    xi, _ = load_image(tmp_path / "photo.jpg", man["input"]["preprocess"], man["input"]["shape"])
    assert_close_outputs(bdp.load(x86_bundle)(xi), out, rtol=1e-6)
    # a non-image with an image extension
    (tmp_path / "fake.png").write_bytes(b"not a png")
    assert_input_error(run_cli("run", x86_bundle, "--input", tmp_path / "fake.png"), "fake.png")


def test_bundle_runs_on_every_physical_core_by_default(x86_bundle):
    """TVM's own default on x86 halves the logical CPUs and pins its workers; a bdp bundle uses
    the physical cores of its affinity mask, unpinned, unless the environment says otherwise.
    Loading and running it leaves the environment as it was (TVM's runtime API says it)."""
    import subprocess
    import sys

    probe = ("import os, sys, tvm_ffi\n"
             "from bdp.toolchain.bundle.format import load_bundle\n"
             "env = dict(os.environ)\n"
             "b = load_bundle(sys.argv[1])\n"
             "b(__import__('numpy').zeros(b.input['shape'], 'float32'))\n"
             "masks = {open(f'/proc/self/task/{t}/status').read().split('Cpus_allowed_list:')[1].split()[0]\n"
             "         for t in os.listdir('/proc/self/task')}\n"
             "print(tvm_ffi.get_global_func('runtime.NumThreads')(), int(dict(os.environ) == env), len(masks))\n")
    affinity = sorted(os.sched_getaffinity(0))
    siblings = set()
    for c in affinity:
        with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
            siblings.add(f.read().strip())
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "TVM_BIND_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe, x86_bundle], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # as many threads as physical cores, the environment unchanged, every thread on the whole mask
    assert out.stdout.split() == [str(len(siblings)), "1", "1"]
    # an explicit setting wins, also over the affinity mask
    env["TVM_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", probe, x86_bundle], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "1"
    # a narrower affinity mask: as many threads as physical cores in it
    if len(affinity) > 1:
        out = subprocess.run(["taskset", "-c", str(affinity[0]), sys.executable, "-c", probe, x86_bundle],
                             env={k: v for k, v in env.items() if k != "TVM_NUM_THREADS"}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "1"
