"""The whole x86 path: PyTorch BNN -> ONNX -> passes -> TVM packed-bit kernel -> bundle -> run.

Every comparison is against PyTorch or onnxruntime computed in the test, never stored numbers.
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdp
from bdp.passes import run_pipeline
from bdp.passes.core import run_onnxruntime
from bdp.passes.ops import DOMAIN, attach_functions, binary_conv_reference, make_binary_conv_node, pack_signs

from conftest import assert_close_outputs, assert_input_error, run_cli


class PlainBNN(nn.Module):
    """A BNN as third-party code writes it: torch.sign + conv with alpha*sign(W) weights, BN after."""

    def __init__(self, cin, cout, k, stride, dilation, padding, groups=1, bias=False):
        super().__init__()
        self.pre = nn.Conv2d(3, cin, 3, padding=1)
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        with torch.no_grad():  # non-trivial BN statistics, some negative scales
            self.bn.running_mean.uniform_(-2, 2)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(-1.5, 1.5)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        h = self.pre(x)
        w = self.conv.weight
        a = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        y = F.conv2d(torch.sign(h), a * torch.sign(w), self.conv.bias, self.conv.stride, self.conv.padding,
                     self.conv.dilation, self.conv.groups)
        return self.bn(y)


def export_plain(model, shape, path):
    model.eval()
    torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return path


GRID = [
    # cin, cout, k, stride, dilation, padding, groups, H, W
    (13, 7, 3, 1, 1, 1, 1, 9, 11),
    (70, 33, 3, 2, 1, 1, 1, 13, 10),
    (40, 24, 3, 1, 2, 2, 1, 12, 12),
    (65, 130, 1, 1, 1, 0, 1, 7, 9),
    (96, 64, 3, 2, 2, 2, 1, 15, 17),
    (24, 24, 3, 1, 1, 1, 3, 8, 8),
    (33, 5, 3, 1, 1, 0, 1, 6, 7),
]


@pytest.mark.parametrize("cin,cout,k,stride,dilation,padding,groups,h,w", GRID)
def test_plain_bnn_grid_matches_pytorch(tmp_path, cin, cout, k, stride, dilation, padding, groups, h, w):
    torch.manual_seed(cin * 1000 + cout)
    model = PlainBNN(cin, cout, k, stride, dilation, padding, groups).eval()
    shape = (2, 3, h, w)
    path = export_plain(model, shape, tmp_path / "plain.onnx")
    out = bdp.compile(str(path), target="x86", out=str(tmp_path / "bundle"))
    man = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert man["stats"]["binary_convs"] == 1
    assert man["stats"]["fp_convs"] == 1  # the float `pre` conv
    net = bdp.load(out)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert_close_outputs(net(x), {"y": want})


def test_zero_padding_differs_from_one_padding_and_both_are_exact(tmp_path):
    """Zero padding of a signed tensor and one padding are different functions; both compile exactly."""
    from bdp.models.layers import BinaryConv2d

    outs = {}
    for pv in (0.0, 1.0, -1.0):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), BinaryConv2d(20, 17, 3, stride=2, padding=2, dilation=2,
                                                                      pad_value=pv)).eval()
        shape = (1, 3, 11, 13)
        path = tmp_path / f"pv{pv}.onnx"
        torch.onnx.export(m, (torch.randn(shape),), str(path), dynamo=True, input_names=["x"], output_names=["y"])
        out = bdp.compile(str(path), target="x86", out=str(tmp_path / f"b{pv}"))
        man = json.loads((tmp_path / f"b{pv}" / "manifest.json").read_text())
        assert man["stats"]["binary_convs"] == 1
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            want = m(torch.from_numpy(x)).numpy()
        got = bdp.load(out)(x)["y"]
        assert_close_outputs({"y": got}, {"y": want})
        outs[pv] = got
    # the border rows differ between paddings, the interior does not
    assert not np.allclose(outs[0.0], outs[1.0])
    assert np.allclose(outs[0.0][..., 1:-1, 1:-1], outs[1.0][..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_bdp_checkpoint_matches_pytorch_cli(tmp_path):
    """bdp init -> bdp compile (CLI) -> bdp run (CLI, .npy in, .npz out) equals the PyTorch model."""
    ck = tmp_path / "m.pt"
    p = run_cli("init", "bireal-tiny", "-o", ck, "--width", "16")
    assert p.returncode == 0, p.stderr
    p = run_cli("compile", ck, "-o", tmp_path / "b", "--input-shape", "1,3,40,56")
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    net = bdp.load_model(str(ck))
    n_binary = sum(1 for m in net.modules() if type(m).__name__ == "BinaryConv2d")
    assert man["stats"]["binary_convs"] == n_binary == 6
    assert [o["name"] for o in man["outputs"]] == ["semseg", "depth"]
    x = np.random.default_rng(3).standard_normal((1, 3, 40, 56)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    p = run_cli("run", tmp_path / "b", "--input", tmp_path / "x.npy", "-o", tmp_path / "out.npz")
    assert p.returncode == 0, p.stderr
    got = dict(np.load(tmp_path / "out.npz"))
    with torch.no_grad():
        want = {k: v.numpy() for k, v in net(torch.from_numpy(x)).items()}
    assert_close_outputs(got, want)


def test_pass_report_and_verify_mode():
    torch.manual_seed(0)
    model = PlainBNN(16, 8, 3, 1, 1, 1).eval()
    buf = export_plain(model, (1, 3, 8, 8), "/tmp/bdp_test_plain.onnx")
    src = onnx.load(buf)
    final, report = run_pipeline(src, "default", verify=True)
    ops = [n.op_type for n in final.graph.node]
    assert ops.count("BinaryConv") == 1 and "Sign" not in ops and "BatchNormalization" not in ops
    assert all(d <= 1e-4 for _, d in report.verified)
    assert any("Sign read as sgn(0)=+1" in n for n in report.notes)
    left = {n: r for n, (_, r) in report.left_float.items()}
    assert len(left) == 1 and "not binarized" in next(iter(left.values()))
    # the bdp graph is self-describing: onnx.checker accepts it and onnxruntime runs it
    m = attach_functions(final)
    onnx.checker.check_model(m)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = run_onnxruntime(m, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bdp_op_function_body_equals_reference():
    rng = np.random.default_rng(0)
    for c, m, k, s, d, pads, g, pv, thr in [(5, 7, 3, 1, 1, (1, 1, 1, 1), 1, 0.0, 0.0),
                                            (70, 9, 3, 2, 2, (2, 0, 1, 2), 1, 1.0, 0.3),
                                            (12, 12, 3, 1, 1, (1, 1, 1, 1), 12, -1.0, -0.2)]:
        x = rng.standard_normal((2, c, 9, 8)).astype(np.float32)
        ws = np.where(rng.standard_normal((m, c // g, k, k)) >= 0, 1.0, -1.0)
        wb = pack_signs(ws)
        sc = (rng.random(m) + 0.1).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        attrs = dict(kernel_shape=[k, k], strides=[s, s], dilations=[d, d], pads=list(pads), group=g,
                     pad_value=pv, act_threshold=thr)
        node = make_binary_conv_node("bc", ["x", "wb", "sc", "b"], "y", **attrs)
        graph = onnx.helper.make_graph(
            [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None] * 4)],
            [onnx.numpy_helper.from_array(wb, "wb"), onnx.numpy_helper.from_array(sc, "sc"),
             onnx.numpy_helper.from_array(b, "b")])
        model = attach_functions(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                                        ir_version=10))
        onnx.checker.check_model(model, full_check=True)
        got = run_onnxruntime(model, {"x": x})[0]
        want = binary_conv_reference(x, wb, sc, b, **attrs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert model.graph.node[0].domain == DOMAIN


def test_profile_local_json(tmp_path):
    torch.manual_seed(0)
    path = export_plain(PlainBNN(32, 32, 3, 1, 1, 1).eval(), (1, 3, 16, 16), tmp_path / "p.onnx")
    bdp.compile(str(path), out=str(tmp_path / "b"))
    p = run_cli("profile", tmp_path / "b", "--runs", "10", "--json", tmp_path / "prof.json", "--chart",
                tmp_path / "prof.png")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "prof.json").read_text())
    lat = res["latency"]
    assert lat["runs"] == 10 and 0 < lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert res["fp32_onnxruntime"]["median_ms"] > 0
    assert any("bdp_binary_conv" in r["op"] for r in res["per_op"])
    assert (tmp_path / "prof.png").stat().st_size > 1000
    assert "p99" in p.stdout and "FP32 ORT" in p.stdout
    assert "timed on its own" in res["per_op_note"] and "per op:" in p.stdout


def test_profile_per_op_counts_every_kernel_call(tmp_path):
    """The per-op rows cover exactly the kernel calls of one run (counted here with the VM's
    own instrumentation hook), each timed on its own on the arguments of that run."""
    from bdp.toolchain.bundle.format import load_bundle
    from bdp.toolchain.runtime.profile import per_op_breakdown

    torch.manual_seed(0)
    path = export_plain(PlainBNN(16, 13, 3, 2, 1, 1), (1, 3, 20, 24), tmp_path / "p.onnx")
    bdp.compile(str(path), out=str(tmp_path / "b"))
    b = load_bundle(tmp_path / "b")
    x = b.to_device(np.random.default_rng(0).standard_normal((1, 3, 20, 24)).astype(np.float32))
    seen = {}

    def count(func, sym, before, ret, *args):
        if before and not sym.startswith("vm.builtin."):
            seen[sym] = seen.get(sym, 0) + 1
        return 0

    b._vm.set_instrument(count)
    b.run_raw(x)
    b._vm.set_instrument(None)
    rows, note = per_op_breakdown(b, x, repeat=3)
    assert {r["op"]: r["calls"] for r in rows} == seen
    assert sum(1 for s in seen if "bdp_binary_conv" in s) == 1 and len(seen) >= 2  # + the float conv
    assert all(r["total_ms"] > 0 and len(r["shape"]) == 4 for r in rows)
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9
    assert f"{sum(r['total_ms'] for r in rows):.3f} ms" in note and "not timed" not in note


def test_help_imports_neither_torch_nor_tvm():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom bdp.toolchain.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules and 'tvm' not in sys.modules, 'heavy import'\nprint('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


# --- bad input: one line, exit code 2, nothing left behind --------------------------------------


def _no_leftovers(tmp_path, name="b"):
    left = [f for f in os.listdir(tmp_path) if f == name or f.startswith(f".{name}.") or f == name + ".passes"]
    assert left == [], left


def test_missing_file(tmp_path):
    p = run_cli("compile", tmp_path / "nope.onnx", "-o", tmp_path / "b")
    assert_input_error(p, "nope.onnx", "no such file")
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_corrupt_onnx(tmp_path, kind):
    torch.manual_seed(0)
    good = export_plain(PlainBNN(8, 8, 3, 1, 1, 1).eval(), (1, 3, 8, 8), tmp_path / "good.onnx").read_bytes()
    data = good[: len(good) // 2] if kind == "truncated" else np.random.default_rng(0).bytes(4000)
    (tmp_path / "bad.onnx").write_bytes(data)
    p = run_cli("compile", tmp_path / "bad.onnx", "-o", tmp_path / "b")
    assert_input_error(p, "bad.onnx")
    _no_leftovers(tmp_path)


def test_random_and_hostile_checkpoints(tmp_path):
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(1).bytes(3000))
    p = run_cli("compile", tmp_path / "rand.pt", "-o", tmp_path / "b")
    assert_input_error(p, "rand.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"format": "bdp-checkpoint", "evil": Evil()}, tmp_path / "evil.pt")
    p = run_cli("compile", tmp_path / "evil.pt", "-o", tmp_path / "b")
    assert_input_error(p, "evil.pt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"just": torch.zeros(3)}, tmp_path / "other.pt")
    p = run_cli("compile", tmp_path / "other.pt", "-o", tmp_path / "b")
    assert_input_error(p, "other.pt", "not a bdp checkpoint")
    _no_leftovers(tmp_path)


def test_unsupported_op_names_the_node(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    node = onnx.helper.make_node("FrobnicateOp", ["x"], ["y"], name="my_weird_node", domain="acme")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("acme", 1)],
                                   ir_version=9)
    onnx.save(model, tmp_path / "weird.onnx")
    p = run_cli("compile", tmp_path / "weird.onnx", "-o", tmp_path / "b")
    assert_input_error(p, "my_weird_node", "FrobnicateOp")
    _no_leftovers(tmp_path)


def test_open_input_shape_needs_input_shape(tmp_path):
    torch.manual_seed(0)
    m = PlainBNN(8, 8, 3, 1, 1, 1).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), str(tmp_path / "dyn.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "h", 3: "w"}})
    p = run_cli("compile", tmp_path / "dyn.onnx", "-o", tmp_path / "b")
    assert_input_error(p, "--input-shape")
    _no_leftovers(tmp_path)
    p = run_cli("compile", tmp_path / "dyn.onnx", "-o", tmp_path / "b", "--input-shape", "1,3,10,12")
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    path = export_plain(PlainBNN(16, 16, 3, 1, 1, 1).eval(), (1, 3, 8, 8), d / "p.onnx")
    bdp.compile(str(path), out=str(d / "b"))
    return d / "b"


def test_run_wrong_shape_and_bad_npy(small_bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 9, 8), np.float32))
    p = run_cli("run", small_bundle, "--input", tmp_path / "x.npy", "-o", tmp_path / "o.npz")
    assert_input_error(p, "(1, 3, 9, 8)", "(1, 3, 8, 8)")
    assert not (tmp_path / "o.npz").exists()
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    p = run_cli("run", small_bundle, "--input", tmp_path / "bad.npy", "-o", tmp_path / "o.npz")
    assert_input_error(p, "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    p = run_cli("run", small_bundle, "--input", tmp_path / "obj.npy", "-o", tmp_path / "o.npz")
    assert_input_error(p, "obj.npy")
    assert not (tmp_path / "o.npz").exists()


def test_tampered_and_foreign_bundles(small_bundle, tmp_path):
    import shutil

    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 8, 8), np.float32))
    # one byte changed in the library
    b1 = tmp_path / "tampered"
    shutil.copytree(small_bundle, b1)
    lib = bytearray((b1 / "model.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (b1 / "model.so").write_bytes(bytes(lib))
    assert_input_error(run_cli("run", b1, "--input", x), "model.so", "sha256")
    # truncated: a file missing
    b2 = tmp_path / "truncated"
    shutil.copytree(small_bundle, b2)
    os.remove(b2 / "model.so")
    assert_input_error(run_cli("run", b2, "--input", x), "model.so")
    # newer format
    b3 = tmp_path / "newer"
    shutil.copytree(small_bundle, b3)
    man = json.loads((b3 / "manifest.json").read_text())
    man["format_version"] = 99
    (b3 / "manifest.json").write_text(json.dumps(man))
    assert_input_error(run_cli("run", b3, "--input", x), "newer")
    # a manifest naming a path outside the bundle
    b4 = tmp_path / "escape"
    shutil.copytree(small_bundle, b4)
    man = json.loads((b4 / "manifest.json").read_text())
    man["files"]["../../etc/passwd"] = {"sha256": "0" * 64}
    (b4 / "manifest.json").write_text(json.dumps(man))
    assert_input_error(run_cli("run", b4, "--input", x), "outside the bundle")
    # a bundle for another target (an arm64 manifest on this x86 host is refused by load())
    b5 = tmp_path / "cuda"
    shutil.copytree(small_bundle, b5)
    man = json.loads((b5 / "manifest.json").read_text())
    man["target"]["arch"] = "cuda"
    man["target"]["name"] = "cuda"
    (b5 / "manifest.json").write_text(json.dumps(man))
    assert_input_error(run_cli("run", b5, "--input", x), "cannot run on this host")
    # corrupt manifest
    b6 = tmp_path / "corrupt"
    shutil.copytree(small_bundle, b6)
    (b6 / "manifest.json").write_text("{not json")
    assert_input_error(run_cli("run", b6, "--input", x), "manifest")


def test_failed_compile_leaves_no_bundle_and_keeps_old_one(tmp_path, small_bundle):
    import shutil

    shutil.copytree(small_bundle, tmp_path / "b")
    before = (tmp_path / "b" / "manifest.json").read_text()
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    assert_input_error(run_cli("compile", tmp_path / "bad.onnx", "-o", tmp_path / "b"), "bad.onnx")
    assert (tmp_path / "b" / "manifest.json").read_text() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".b")] == []
