"""Tests of bdp.models: binarizers, layers, the zoo, export, checkpoints, data, losses, training
and metrics. Long cases (full-size MTI-Net exports) are marked slow."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bdp.errors import InputError
from bdp.models import binarize as B
from bdp.models import data as D
from bdp.models import layers as L
from bdp.models import losses as LS
from bdp.models import zoo
from bdp.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from bdp.models.train import Metrics, evaluate, train

torch.set_num_threads(1)

ALL_ARCHS = ["bireal-tiny", "mtinet", "bi-mtdp", "bi-mtdp-c", "bi-mtdp-f", "bidense", "bq-dense", "bnn-baseline",
             "reactnet-baseline"]
MTI = ["mtinet", "bi-mtdp", "bi-mtdp-c", "bi-mtdp-f"]
SMALL_MTI = dict(width=8, tasks=["semseg", "depth"])


def randomize(model, seed=0):
    """Give BatchNorm statistics/affines and the binarizers' shifts random values, as after
    training: with the zero/one initial values many binary-conv outputs land exactly on a sign
    threshold, where float round-off between PyTorch and onnxruntime decides the sign."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for n, p in model.named_parameters():
            leaf = n.rsplit(".", 1)[-1]
            if p.dim() == 4 and leaf in ("beta", "gamma", "zeta", "k", "b", "a", "bias") and p.shape[-1] == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif ".gates." in n or (leaf == "gamma" and p.dim() == 1):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def build(name, **kw):
    torch.manual_seed(0)
    return zoo.build(name, **kw)


# ---------------------------------------------------------------------------------------------
# Binarizers: forward, eval form, gradients against closed forms

POINTS = torch.cat([torch.linspace(-1.5, 1.5, 61, dtype=torch.float64),
                    torch.tensor([-1.0, 1.0, 0.0, -1e-9, 1e-9, -0.999, 0.999, -1.001, 1.001], dtype=torch.float64)])


def _grad(mod, x, g=None):
    x = x.clone().requires_grad_(True)
    y = mod(x)
    g = torch.ones_like(y) if g is None else g
    y.backward(g)
    return y.detach(), x.grad


def test_hard_sign_zero_is_plus_one_and_dtype():
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0], dtype=torch.float64)
    y = B.hard_sign(x)
    assert y.dtype == torch.float64
    assert y.tolist() == [-1.0, 1.0, 1.0, 1.0]


def test_ste_gradient():
    m = B.make_binarizer("ste").train()
    y, g = _grad(m, POINTS)
    assert torch.equal(y, B.hard_sign(POINTS))
    expect = (POINTS.abs() <= 1).double()
    assert torch.equal(g, expect)
    assert g[POINTS == 1.0].eq(1).all() and g[POINTS == -1.0].eq(1).all() and g[POINTS == 1.001].eq(0).all()


def test_approxsign_gradient():
    m = B.make_binarizer("approxsign").train()
    y, g = _grad(m, POINTS)
    assert torch.equal(y, B.hard_sign(POINTS))
    x = POINTS
    expect = torch.where((x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x <= 1), 2 - 2 * x, 0 * x))
    assert torch.allclose(g, expect, atol=1e-12)
    assert g[x == 0].item() == 2.0 and g[x == 1.0].eq(0).all() and g[x == -1.0].eq(0).all()
    # it is the derivative of F(x) = 2x +- x^2 on [-1, 1]: finite differences agree away from 0
    h = 1e-6
    for x0 in (-0.7, -0.2, 0.3, 0.8):
        F_ = lambda v: 2 * v + v * v if v < 0 else 2 * v - v * v  # noqa: E731
        fd = (F_(x0 + h) - F_(x0 - h)) / (2 * h)
        assert abs(B.approxsign_grad(torch.tensor(x0, dtype=torch.float64)).item() - fd) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_ede_gradient_and_schedule(p):
    m = B.make_binarizer("ede").train()
    B.set_training_progress(nn.Sequential(m), p)
    t = 1e-3 * (10 / 1e-3) ** p
    k = max(1 / t, 1.0)
    assert m.t == pytest.approx(t) and m.k == pytest.approx(k)
    x = POINTS * 3
    y, g = _grad(m, x)
    assert torch.equal(y, B.hard_sign(x))
    assert torch.allclose(g, k * t * (1 - torch.tanh(t * x) ** 2), atol=1e-12)


def test_ede_endpoints():
    m = B.EDESign()
    m.set_progress(0.0)
    assert (m.t, m.k) == (pytest.approx(1e-3), pytest.approx(1000.0))
    m.set_progress(1.0)
    assert (m.t, m.k) == (pytest.approx(10.0), pytest.approx(1.0))
    m.set_progress(2.0)  # clamped
    assert m.t == pytest.approx(10.0)


def test_rsign_gradients():
    m = B.make_binarizer("rsign", channels=3).double().train()
    with torch.no_grad():
        m.beta.copy_(torch.tensor([0.2, -0.3, 0.0], dtype=torch.float64).view(1, 3, 1, 1))
    x = POINTS[:60].reshape(1, 3, 4, 5).clone().requires_grad_(True)
    gout = torch.randn(1, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = m(x)
    y.backward(gout)
    s = x.detach() - m.beta.detach()
    assert torch.equal(y.detach(), B.hard_sign(s))
    d = gout * B.approxsign_grad(s)
    assert torch.allclose(x.grad, d, atol=1e-12)
    assert torch.allclose(m.beta.grad, -d.sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)


def test_dab_forward_and_gradients():
    gen = torch.Generator().manual_seed(0)
    m = B.make_binarizer("dab", channels=3).double().train()
    with torch.no_grad():
        m.k.copy_(torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64).view(1, 3, 1, 1))
        m.b.copy_(torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64).view(1, 3, 1, 1))
        m.a.copy_(torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64).view(1, 3, 1, 1))
    x = (torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen) * 0.8 + 0.3).requires_grad_(True)
    gout = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen)
    y = m(x)
    y.backward(gout)
    xd = x.detach()
    mean = xd.mean(dim=(2, 3), keepdim=True)
    s = xd - (m.k.detach() * mean + m.b.detach())
    mabs = s.abs().mean(dim=(2, 3), keepdim=True)
    alpha = torch.exp(m.a.detach() * (mabs - 1))
    assert torch.allclose(y.detach(), alpha * B.hard_sign(s), atol=1e-12)
    da = gout * alpha * B.approxsign_grad(s)
    assert torch.allclose(x.grad, da, atol=1e-12)
    assert torch.allclose(m.b.grad, -da.sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)
    assert torch.allclose(m.k.grad, -(da * mean).sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)
    ga = (gout * B.hard_sign(s) * alpha * (mabs - 1)).sum(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(m.a.grad, ga, atol=1e-12)
    # eval gives the same values (the plain form)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(xd), y.detach(), atol=1e-12)


def test_dab_alpha_modes():
    x = torch.randn(2, 3, 4, 5)
    for mode, shape in (("channel", (2, 3, 1, 1)), ("sample", (2, 1, 1, 1))):
        m = B.DAB(3, alpha=mode).eval()
        with torch.no_grad():
            m.a.fill_(0.5)
            y = m(x)
        mag = y.abs()
        per = mag.amax(dim=tuple(i for i in range(4) if shape[i] == 1), keepdim=True)
        assert per.shape == shape and torch.allclose(mag, per.expand_as(mag))
    m = B.DAB(3, alpha="none").eval()
    assert set(m(x).unique().tolist()) == {-1.0, 1.0}
    assert not hasattr(m, "a")
    net = build("bidense", dab_alpha="sample")
    assert net(torch.randn(2, 3, 32, 40))["depth"].shape == (2, 1, 32, 40)
    with pytest.raises(ValueError):
        B.DAB(3, alpha="bogus")


@pytest.mark.parametrize("name", sorted(B.BINARIZERS))
def test_binarizer_train_equals_eval(name):
    m = B.make_binarizer(name, channels=4)
    x = torch.randn(2, 4, 3, 5)
    m.train()
    yt = m(x.clone().requires_grad_(True)).detach()
    m.eval()
    ye = m(x)
    assert torch.allclose(yt, ye)
    unit = ye / ye.abs()
    assert set(unit.unique().tolist()) <= {-1.0, 1.0}


def test_weight_binarization_modes():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    wb = B.binarize_weight(w)
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(wb, alpha * B.hard_sign(w.detach()))
    wb.sum().backward()
    assert torch.allclose(w.grad, alpha.expand_as(w))  # identity STE through sgn, alpha detached
    w.grad = None
    wi = B.binarize_weight(w, standardize=True, pow2=True)
    mags = wi.detach().abs().reshape(6, -1)
    assert torch.allclose(mags, mags[:, :1].expand_as(mags))  # one magnitude per channel
    l2 = torch.log2(mags[:, 0])
    assert torch.allclose(l2, l2.round())  # powers of two
    ws = w.detach() - w.detach().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(B.hard_sign(wi.detach()), B.hard_sign(ws))
    # ConvTranspose weights: output channel on axis 1
    wt = torch.randn(4, 5, 2, 2)
    wtb = B.binarize_weight(wt, channel_dim=1)
    assert torch.allclose(wtb.abs().mean(dim=(0, 2, 3)), wt.abs().mean(dim=(0, 2, 3)))


def test_irnet_conv_uses_ede_for_weights():
    conv = L.BinaryConv2d(3, 4, 3, padding=1, binarizer="ede", weight_mode="irnet").double().train()
    B.set_training_progress(conv, 1.0)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_rprelu():
    m = B.RPReLU(2).double()
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.5, -0.5], dtype=torch.float64).view(1, 2, 1, 1))
        m.zeta.copy_(torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1))
    x = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]], dtype=torch.float64)
    y = m(x)
    # channel 0: x - 0.5 = [-0.5, 0.5] -> [-0.125, 0.5] + 1; channel 1: x + 0.5 = [0.5, -0.5] -> [0.5, -0.125] + 2
    assert torch.allclose(y, torch.tensor([[[[0.875, 1.5]], [[2.5, 1.875]]]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Layers


def test_cfb_fusion_up_and_down():
    x = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    y = L.channel_adaptive_bypass(x, 10)  # tile twice + 2 means of interleaved pairs
    assert y.shape == (1, 10, 2, 2)
    assert y[0, :, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 1, 2]
    y = L.channel_adaptive_bypass(x, 2)  # fusion-down: means of {0, 2} and {1, 3}
    assert y[0, :, 0, 0].tolist() == [1, 2]
    y = L.channel_adaptive_bypass(torch.arange(8.0).view(1, 8, 1, 1), 3)
    # (8 // 3) * 2 = 4 regular channels in 2 interleaved groups {0, 2}, {1, 3}; the rest {4..7}
    assert y[0, :, 0, 0].tolist() == [1.0, 2.0, 5.5]
    assert L.channel_adaptive_bypass(torch.arange(5.0).view(1, 5, 1, 1), 1)[0, 0, 0, 0].item() == 2.0
    assert torch.equal(L.channel_adaptive_bypass(x, 4), x)


@pytest.mark.parametrize("hw", [(8, 10), (7, 9)])
def test_bidense_layers_shapes(hw):
    x = torch.randn(2, 6, *hw)
    assert L.BiDenseConv(6, 16, 3)(x).shape == (2, 16, *hw)
    assert L.BiDenseConv(6, 4, 1)(x).shape == (2, 4, *hw)
    y = L.BiDenseConv(6, 12, 3, stride=2)(x)
    assert y.shape == (2, 12, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    y = L.BinaryDownBlock(6, 12)(x)
    assert y.shape == (2, 12, hw[0] // 2, hw[1] // 2)
    up = L.BinaryUpBlock(6, 3)
    assert up(x).shape == (2, 3, 2 * hw[0], 2 * hw[1])
    assert up(x, size=(2 * hw[0] - 1, 2 * hw[1] - 1)).shape == (2, 3, 2 * hw[0] - 1, 2 * hw[1] - 1)


def test_bidense_conv_is_bn_conv_plus_bypass():
    m = L.BiDenseConv(4, 8, 3).eval()
    randomize(m)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = m.bn(m.conv(x)) + L.channel_adaptive_bypass(x, 8)
        assert torch.allclose(m(x), ref)
    assert isinstance(m.conv, L.BinaryConv2d) and m.conv.act.binarizer_name == "dab"


def test_binary_conv_transpose():
    m = L.BinaryConvTranspose2d(3, 5, 2, stride=2).eval()
    x = torch.randn(1, 3, 4, 4)
    w = m.weight.detach()
    wb = w.abs().mean(dim=(0, 2, 3), keepdim=True) * B.hard_sign(w)
    ref = torch.nn.functional.conv_transpose2d(B.hard_sign(x), wb, stride=2)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-6)
    macs = zoo.count_macs(nn.Sequential(m), (1, 3, 4, 4))
    assert macs == {"binary": 3 * 4 * 4 * 5 * 4, "float": 0}


# ---------------------------------------------------------------------------------------------
# The zoo


def test_registry_has_every_architecture():
    assert set(ALL_ARCHS) <= set(zoo.ARCHITECTURES)


def _plain(v):
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return isinstance(v, (int, float, str, bool)) or v is None


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_defaults_are_plain(name):
    assert _plain(zoo.ARCHITECTURES[name].defaults)


@pytest.mark.parametrize("name", ALL_ARCHS)
@pytest.mark.parametrize("hw", [(64, 80), (63, 81)])
def test_forward_shapes(name, hw):
    m = build(name)
    x = torch.randn(2, 3, *hw)
    m.train()
    out = m(x)
    assert list(out) == list(m.tasks)
    from bdp.models.tasks import task_channels

    for t, y in out.items():
        assert y.shape == (2, task_channels(t), *hw), (t, y.shape)
        assert torch.isfinite(y).all()
    sum(y.float().mean() for y in out.values()).backward()
    m.eval()
    with torch.no_grad():
        out = m(x[:1])
    assert all(y.shape[-2:] == hw for y in out.values())


def test_mti_aux_outputs():
    m = build("bi-mtdp-f", **SMALL_MTI).train()
    out, aux = m(torch.randn(2, 3, 64, 80), return_aux=True)
    assert set(aux["deep_supervision"]) == {"scale_0", "scale_1", "scale_2", "scale_3"}
    assert aux["deep_supervision"]["scale_3"]["semseg"].shape == (2, 8, 2, 3)
    assert len(aux["vib"]) == 4 and aux["vib"][0][0].shape == (2, 8, 16, 20)
    assert "backbone.0" in aux["features"] and "mmd.3.depth" in aux["features"]
    m.eval()
    with torch.no_grad():  # eval: z = mu, deterministic, plain dict
        x = torch.randn(1, 3, 64, 80)
        a, b = m(x), m(x)
        assert isinstance(a, dict) and all(torch.equal(a[t], b[t]) for t in a)


def test_bi_mtdp_binary_attention_gate_is_zero_one():
    m = build("bi-mtdp-c", **SMALL_MTI).eval()
    gate = m.mmd[0].gate["semseg"]
    with torch.no_grad():
        g = gate(torch.randn(1, 8, 4, 4))
    assert set(g.unique().tolist()) <= {0.0, 1.0}


def test_describe_and_macs():
    d = zoo.describe("bidense")
    assert d["name"] == "bidense" and d["tasks"] == ["semseg", "depth"] and d["params"] > 0
    assert 0.95 < d["binary_mac_share"] <= 1.0 and d["description"]
    assert zoo.describe("mtinet")["binary_mac_share"] == 0.0
    bq = zoo.describe("bq-dense")
    assert bq["tasks"] == ["semseg", "edges"] and bq["binary_mac_share"] > 0.9
    macs = zoo.count_macs(build("bq-dense"), (1, 3, 64, 80))
    assert macs["binary"] > 0 and macs["float"] > 0


# ---------------------------------------------------------------------------------------------
# Export: dynamo -> ONNX -> onnxruntime equals PyTorch eval

def _export_check(model, hw=(64, 80), atol=1e-4, seeds=(3, 4, 5)):
    """torch.onnx (dynamo) export run by onnxruntime equals PyTorch eval, on the first of SEEDS'
    inputs where they agree. A binary network is chaotic at its binarizers' thresholds: a value
    within float round-off of one (about 1 in 10^7) is rounded one way by PyTorch and the other
    by onnxruntime, and the flipped sign changes the next layers; such inputs are skipped (a wrong
    export disagrees on every input)."""
    import onnx
    import onnxruntime as ort

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(seeds[0])),),
                                 dynamo=True, verbose=False)
    proto = prog.model_proto
    ops = {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = []
    for seed in seeds:
        x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(seed))
        outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref = model(x)
        assert len(outs) == len(ref)
        try:
            for o, (t, r) in zip(outs, ref.items()):
                assert o.shape == tuple(r.shape), t
                np.testing.assert_allclose(o, r.numpy(), atol=atol, rtol=0, err_msg=t)
            return ops
        except AssertionError as e:
            errors.append(f"seed {seed}: {str(e).strip().splitlines()[0]} {str(e).strip().splitlines()[-1][:120]}")
    raise AssertionError("onnxruntime differs from PyTorch on every input: " + " | ".join(errors))


FAST_EXPORT = [("bireal-tiny", {}), ("bidense", {}), ("bnn-baseline", {}), ("reactnet-baseline", {}),
               ("bq-dense", {}), ("bi-mtdp-c", SMALL_MTI), ("bi-mtdp-f", SMALL_MTI)]


@pytest.mark.parametrize("name,kw", FAST_EXPORT, ids=[n for n, _ in FAST_EXPORT])
def test_export_onnxruntime_matches(name, kw):
    m = randomize(build(name, **kw))
    ops = _export_check(m)
    binary = name != "mtinet"
    if binary:
        assert {"GreaterOrEqual", "Where", "Conv"} <= ops
    assert "Sign" not in ops and "DepthToSpace" not in ops


def test_export_odd_size_bq_dense():
    """Odd sizes: ceil-mode pools, cropped upsampling branches, size-based resizes."""
    _export_check(randomize(build("bq-dense")), hw=(63, 81))


@pytest.mark.slow
@pytest.mark.parametrize("name", MTI)
def test_export_mti_family_full(name):
    _export_check(randomize(build(name)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mtinet", "bi-mtdp"])
def test_export_mti_small(name):
    _export_check(randomize(build(name, **SMALL_MTI)), hw=(63, 81))


def test_binarizer_eval_graph_form():
    """A BinaryConv2d with RSign exports as Sub -> GreaterOrEqual -> Where -> Conv."""
    m = L.BinaryConv2d(4, 4, 3, padding=1, binarizer="rsign").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(m, (torch.randn(1, 4, 5, 5),), dynamo=True, verbose=False).model_proto
    nodes = proto.graph.node
    by_out = {o: n for n in nodes for o in n.output}
    conv = [n for n in nodes if n.op_type == "Conv"][0]
    where = by_out[conv.input[0]]
    ge = by_out[where.input[0]]
    sub = by_out[ge.input[0]]
    assert (where.op_type, ge.op_type, sub.op_type) == ("Where", "GreaterOrEqual", "Sub")
    # the +-1 branches are scalars, not activation-sized constants
    inits = {i.name: i for i in proto.graph.initializer}
    for name in where.input[1:]:
        if name in inits:
            assert int(np.prod(inits[name].dims)) == 1


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_weights_only(tmp_path):
    m = randomize(build("bq-dense"))
    p = save_checkpoint(m, str(tmp_path / "m.pt"), meta={"epoch": 3, "metrics": {"x": 1.0}})
    raw = torch.load(p, weights_only=True)
    assert raw["arch"] == "bq-dense" and raw["meta"]["epoch"] == 3
    m2 = load_checkpoint(p)
    assert not m2.training
    x = torch.randn(1, 3, 32, 40)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_checkpoint_round_trip_every_arch(tmp_path):
    for name in ALL_ARCHS:
        kw = SMALL_MTI if name in MTI else {}
        p = save_checkpoint(build(name, **kw), str(tmp_path / f"{name}.pt"))
        m = load_checkpoint(p, arch=name)
        assert m.bdp_arch == name


def _save_raw(path, **over):
    m = build("bidense")
    ck = {"format": "bdp-checkpoint", "version": 1, "arch": "bidense", "config": dict(m.bdp_config),
          "state_dict": {k: v.clone() for k, v in m.state_dict().items()}, "meta": {}}
    ck.update(over)
    torch.save(ck, path)
    return ck


def test_checkpoint_errors_name_the_problem(tmp_path):
    good = str(tmp_path / "good.pt")
    ck = _save_raw(good)
    with pytest.raises(InputError, match="'bidense'.*expected 'bnn-baseline'"):
        load_checkpoint(good, arch="bnn-baseline")
    # another architecture's weights under this name
    other = str(tmp_path / "other.pt")
    _save_raw(other, arch="bq-dense", config=dict(zoo.ARCHITECTURES["bq-dense"].defaults))
    with pytest.raises(InputError, match="(missing|unexpected) key '"):
        load_checkpoint(other)
    # wrong shape
    sd = dict(ck["state_dict"])
    key = "heads.semseg.cls.weight"
    sd[key] = torch.zeros(3, *sd[key].shape[1:])
    wrong = str(tmp_path / "wrong.pt")
    _save_raw(wrong, state_dict=sd)
    with pytest.raises(InputError, match=rf"'{key}' has shape \(3, "):
        load_checkpoint(wrong)
    # missing key
    sd = dict(ck["state_dict"])
    del sd["backbone.stem.0.weight"]
    miss = str(tmp_path / "missing.pt")
    _save_raw(miss, state_dict=sd)
    with pytest.raises(InputError, match="missing key 'backbone.stem.0.weight'"):
        load_checkpoint(miss)
    # config that does not fit
    bad = str(tmp_path / "badcfg.pt")
    _save_raw(bad, config={**ck["config"], "no_such_option": 1})
    with pytest.raises(InputError, match="config does not fit"):
        load_checkpoint(bad)
    # not a checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        read_checkpoint(str(junk))


# ---------------------------------------------------------------------------------------------
# Data


def test_synthetic_determinism_and_types():
    a = D.SyntheticScenes(3, (48, 64), seed=7)
    b = D.SyntheticScenes(3, (48, 64), seed=7)
    c = D.SyntheticScenes(3, (48, 64), seed=8)
    for i in range(3):
        xa, ta = a[i]
        xb, tb = b[i]
        assert torch.equal(xa, xb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(a[0][0], c[0][0])
    x, t = a[2]
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32
    assert t["semseg"].shape == (48, 64) and t["semseg"].dtype == torch.int64
    assert t["depth"].shape == (1, 48, 64) and t["normals"].shape == (3, 48, 64) and t["edges"].shape == (1, 48, 64)
    # order independence: sample 2 alone equals sample 2 of the set
    s = D.render_scene(7, 2, (48, 64))
    assert np.array_equal(s["semseg"], t["semseg"].numpy())
    # normalisation constants
    rgb = D.denormalize_image(x)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


@pytest.mark.parametrize("index", range(6))
def test_synthetic_label_consistency(index):
    s = D.render_scene(1, index, (60, 84))
    depth, sem, nor, edg, surf = s["depth"], s["semseg"], s["normals"], s["edges"], s["surface"]
    assert (depth > 0).all() and (depth < D.MAX_DEPTH).all()
    assert sem.min() >= 0 and sem.max() < D.NUM_CLASSES
    assert np.allclose(np.linalg.norm(nor, axis=-1), 1, atol=1e-5)
    # normals face the camera: n . ray < 0 (rays through the pixel centres, camera frame)
    H, W = depth.shape
    jj, ii = np.meshgrid(np.arange(W) + 0.5 - W / 2, np.arange(H) + 0.5 - H / 2)
    ray = np.stack([jj / s["fx"], ii / s["fx"], np.ones_like(jj)], -1)
    assert ((nor * ray).sum(-1) < 1e-6).all()
    # depth is z-depth: the 3D point depth * ray lies on the surface, so neighbouring points of a
    # plane (the floor) share one offset along its normal
    fl = sem == D.FLOOR
    if fl.sum() > 10:
        pts = depth[..., None] * ray
        off = (pts[fl] * nor[fl]).sum(-1)
        assert np.ptp(off) < 1e-3
    # edges wherever labels change between neighbours, on both sides
    dv = sem[1:] != sem[:-1]
    assert edg[1:][dv].all() and edg[:-1][dv].all()
    dh = sem[:, 1:] != sem[:, :-1]
    assert edg[:, 1:][dh].all() and edg[:, :-1][dh].all()
    # edges where depth jumps by more than 15% between neighbours
    jv = np.abs(depth[1:] - depth[:-1]) > 0.15 * np.minimum(depth[1:], depth[:-1])
    assert edg[1:][jv].all() and edg[:-1][jv].all()
    # and nowhere inside one surface
    same = np.ones_like(edg, dtype=bool)
    same[1:] &= surf[1:] == surf[:-1]
    same[:-1] &= surf[1:] == surf[:-1]
    same[:, 1:] &= surf[:, 1:] == surf[:, :-1]
    same[:, :-1] &= surf[:, 1:] == surf[:, :-1]
    assert not edg[same].any()
    # planar floor: its normals all point the same way
    fl = sem == D.FLOOR
    if fl.sum() > 10:
        assert np.allclose(nor[fl], nor[fl][0], atol=1e-5)
    assert 0 < edg.mean() < 0.5


def test_synthetic_any_resolution_same_scene():
    lo = D.render_scene(0, 4, (32, 40))
    hi = D.render_scene(0, 4, (64, 80))
    # the same scene: the coarse labels agree with the fine ones at the matching pixel centres
    # (pixel (i, j) of the coarse image is centred between fine pixels 2i, 2i+1)
    agree = (lo["semseg"] == hi["semseg"][::2, ::2]) | (lo["semseg"] == hi["semseg"][1::2, 1::2])
    assert agree.mean() > 0.9


def test_synthetic_render_speed():
    import time

    D.render_scene(0, 0, (64, 80))
    t = time.perf_counter()
    for i in range(10):
        D.render_scene(0, i, (64, 80))
    assert (time.perf_counter() - t) / 10 < 0.1


def test_folder_dataset_round_trip(tmp_path):
    syn = D.SyntheticScenes(3, (24, 32), seed=5)
    D.write_folder(syn, str(tmp_path / "d"))
    fd = D.FolderDataset(str(tmp_path / "d"))
    assert len(fd) == 3 and fd.tasks == ["semseg", "depth", "normals", "edges"]
    for i in range(3):
        (x0, t0), (x1, t1) = syn[i], fd[i]
        assert torch.equal(t0["semseg"], t1["semseg"]) and torch.equal(t0["edges"], t1["edges"])
        assert (t0["depth"] - t1["depth"]).abs().max() <= 0.0006
        assert (t0["normals"] - t1["normals"]).abs().max() < 0.02
        assert (D.denormalize_image(x0) - D.denormalize_image(x1)).abs().max() < 0.003
    # resize and split lists
    (tmp_path / "d" / "val.txt").write_text("00001\n")
    fv = D.FolderDataset(str(tmp_path / "d"), size=(12, 16), split="val")
    x, t = fv[0]
    assert len(fv) == 1 and x.shape == (3, 12, 16) and t["semseg"].shape == (12, 16)
    with pytest.raises(InputError, match="rgb/"):
        D.FolderDataset(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Losses and metrics


def test_losses_closed_forms():
    logit = torch.tensor([[[[2.0, -1.0]]]])
    y = torch.tensor([[[[1.0, 0.0]]]])
    sig = torch.sigmoid(logit)
    expect = -(0.95 * torch.log(sig[0, 0, 0, 0]) + 0.05 * torch.log(1 - sig[0, 0, 0, 1])) / 2
    assert LS.balanced_bce(logit, y).item() == pytest.approx(expect.item(), rel=1e-5)
    mu = torch.zeros(2, 3, 4, 4)
    assert LS.vib_kl([(mu, torch.zeros_like(mu))]).item() == pytest.approx(0.0)
    assert LS.vib_kl([(torch.ones_like(mu), torch.zeros_like(mu))]).item() == pytest.approx(0.5)
    d = torch.full((1, 1, 2, 2), 2.0)
    g = torch.tensor([[[[1.0, 3.0], [0.0, 2.0]]]])  # one invalid pixel
    assert LS.depth_l1(d, g).item() == pytest.approx(2 / 3)
    assert LS.silog_loss(g.clamp_min(0.5) * 2, g.clamp_min(0.5)).item() == pytest.approx(
        10 * math.sqrt(0.15) * math.log(2), rel=1e-4)
    n = torch.zeros(1, 3, 2, 2)
    n[:, 2] = -1
    assert LS.normals_l1(n * 5, n).item() == pytest.approx(0.0, abs=1e-6)
    f = {"backbone.0": torch.ones(1, 2, 2, 2), "mmd.0.semseg": torch.zeros(1, 2, 2, 2), "other": torch.ones(1)}
    t = {"backbone.0": torch.zeros(1, 2, 2, 2), "mmd.0.semseg": torch.zeros(1, 2, 2, 2)}
    assert LS.feature_distillation(f, t).item() == pytest.approx(1.0)


def _perfect(targets, num_classes=8):
    out = {}
    if "semseg" in targets:
        out["semseg"] = torch.nn.functional.one_hot(targets["semseg"], num_classes).permute(0, 3, 1, 2).float() * 10
    if "depth" in targets:
        out["depth"] = targets["depth"].clone()
    if "normals" in targets:
        out["normals"] = targets["normals"] * 3
    if "edges" in targets:
        out["edges"] = (targets["edges"] * 2 - 1) * 20
    return out


def test_metrics_perfect_prediction():
    ds = D.SyntheticScenes(4, (32, 40), seed=3)
    batches = [(torch.stack([ds[i][0] for i in range(4)]),
                {k: torch.stack([ds[i][1][k] for i in range(4)]) for k in ds[0][1]})]
    tg = batches[0][1]
    m = evaluate(lambda x: _perfect(tg), batches)
    assert m["semseg.mIoU"] == pytest.approx(1.0) and m["semseg.pixel_acc"] == pytest.approx(1.0)
    assert m["depth.rmse"] == pytest.approx(0.0, abs=1e-6) and m["depth.abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert m["depth.delta1"] == 1.0
    assert m["normals.mean_deg"] < 0.05 and m["normals.within_11.25"] == 1.0
    assert m["edges.odsF"] == pytest.approx(1.0)


def test_evaluate_on_named_data():
    net = build("bq-dense")
    r = evaluate(net, "synth", n=2, size=(32, 40))
    assert set(r) >= {"semseg.mIoU", "edges.odsF"} and net.training  # train mode restored
    with pytest.raises(InputError):
        evaluate(net, "/no/such/folder")


def test_metrics_known_answers():
    mt = Metrics(num_classes=3, edge_tolerance=0)
    # semseg: classes 0 and 1, half of class 1 predicted as 0
    g = torch.tensor([[[0, 0, 1, 1]]])
    p = torch.nn.functional.one_hot(torch.tensor([[[0, 0, 0, 1]]]), 3).permute(0, 3, 1, 2).float()
    # depth: off by 0.5 m everywhere on valid pixels
    gd = torch.tensor([[[[1.0, 2.0, 0.0, 4.0]]]])
    pd = gd + 0.5
    # normals: 90 degrees off
    gn = torch.zeros(1, 3, 1, 4)
    gn[:, 2] = 1
    pn = torch.zeros(1, 3, 1, 4)
    pn[:, 0] = 1
    # edges: one of two true edges found, one false positive
    ge = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    pe = torch.tensor([[[[10.0, -10.0, 10.0, -10.0]]]])
    mt.update({"semseg": p, "depth": pd, "normals": pn, "edges": pe},
              {"semseg": g, "depth": gd, "normals": gn, "edges": ge})
    r = mt.compute()
    # IoU class 0: tp 2 / (3 predicted + 2 true - 2) = 2/3; class 1: 1 / (1 + 2 - 1) = 1/2
    assert r["semseg.mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["semseg.pixel_acc"] == pytest.approx(0.75)
    assert r["depth.rmse"] == pytest.approx(0.5)
    assert r["depth.abs_rel"] == pytest.approx((0.5 + 0.25 + 0.125) / 3)
    assert r["depth.delta1"] == pytest.approx(1 / 3)  # 1.5 fails, 1.25 is not < 1.25, 1.125 passes
    assert r["normals.mean_deg"] == pytest.approx(90.0, abs=1e-3)
    assert r["edges.precision"] == pytest.approx(0.5) and r["edges.recall"] == pytest.approx(0.5)
    assert r["edges.odsF"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("name", ["bidense", "bq-dense", "bi-mtdp"])
def test_short_training_lowers_loss(name):
    torch.manual_seed(0)
    kw = SMALL_MTI if name in MTI else {}
    m = zoo.build(name, **kw).train()
    ds = D.SyntheticScenes(4, (32, 40), seed=11, tasks=m.tasks)
    x = torch.stack([ds[i][0] for i in range(4)])
    tg = {k: torch.stack([ds[i][1][k] for i in range(4)]) for k in ds[0][1]}
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    depth_loss = "silog" if name == "bidense" else "l1"
    losses = []
    for step in range(25):
        B.set_training_progress(m, step / 25)
        loss = LS.multitask_loss(m(x), tg, depth_loss=depth_loss)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_train_checkpoints_resume_and_teacher(tmp_path):
    teacher = train("mtinet", str(tmp_path / "t.pt"), epochs=1, n_train=4, batch_size=2, size=(32, 40),
                    progress=False, n_val=2, steps_per_epoch=1, **SMALL_MTI)
    out = str(tmp_path / "f.pt")
    train("bi-mtdp-f", out, epochs=1, n_train=4, batch_size=2, size=(32, 40), teacher=teacher, progress=False,
          n_val=2, steps_per_epoch=2, **SMALL_MTI)
    ck = read_checkpoint(out)
    assert ck["meta"]["epoch"] == 0 and ck["meta"]["step"] == 2 and "optimizer" in ck["meta"]
    assert "semseg.mIoU" in ck["meta"]["metrics"] and "depth.rmse" in ck["meta"]["metrics"]
    train("bi-mtdp-f", out, epochs=2, n_train=4, batch_size=2, size=(32, 40), teacher=teacher, progress=False,
          n_val=2, steps_per_epoch=2, resume=True, **SMALL_MTI)
    ck = read_checkpoint(out)
    assert ck["meta"]["epoch"] == 1 and ck["meta"]["step"] == 4
    assert [h["epoch"] for h in ck["meta"]["history"]] == [0, 1]
    m = load_checkpoint(out)
    assert m.bdp_config["width"] == 8
    with pytest.raises(InputError, match="teacher"):
        train("bi-mtdp-f", str(tmp_path / "g.pt"), epochs=1, n_train=2, batch_size=2, size=(32, 40),
              teacher=out, progress=False, n_val=2, **SMALL_MTI)
    with pytest.raises(InputError, match="cannot resume"):
        train("bidense", out, epochs=1, n_train=2, batch_size=2, size=(32, 40), resume=True, progress=False)
    with pytest.raises(InputError, match="unknown option"):
        train("bidense", str(tmp_path / "h.pt"), epochs=1, bogus=1, progress=False)


def test_train_on_folder(tmp_path):
    D.write_folder(D.SyntheticScenes(6, (32, 40), seed=2), str(tmp_path / "d"), depth_format="npy")
    out = train("bq-dense", str(tmp_path / "q.pt"), epochs=1, data=str(tmp_path / "d"), size=(32, 40),
                batch_size=2, n_train=4, progress=False)
    assert "edges.odsF" in read_checkpoint(out)["meta"]["metrics"]
