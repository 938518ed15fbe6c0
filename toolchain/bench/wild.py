"""``bdp bench --only wild``: binarized networks from the wild against onnxruntime FP32.

The networks (see tests/wild_models.py and tests/fixtures/wild/README.md):

* **Larq Zoo** (Keras, converted by tf2onnx): ``NAME.onnx`` + ``NAME.io.npz`` from
  ``--wild-dir DIR``, made by ``tests/fixtures/wild/make_larq.py --full --out DIR`` (the zoo's
  own widths at 224x224, 1000 classes: what the zoo ships). Without ``--wild-dir``, the
  committed test fixtures (32-64 px inputs, narrowed widths): too small to say anything about
  speed, and the table marks them ``fixture``.
* **Training code**: ReActNet-A and Bi-Real-18 written as their public training code writes
  binarizers (straight-through identities, tests/ste_models.py), 224x224, exported by torch.onnx
  (TorchScript, opset 17) and the dynamo exporter; PyTorch's outputs are the reference.
* **Brevitas bnn_pynq** TFC/SFC/LFC/CNV at 1W1A, exported with ``export_qonnx``
  (TorchScript), at their own inputs (MNIST 1x28x28, CIFAR-10 3x32x32). They are built by
  tests/wild_models.py, so this part needs a source checkout and the ``test`` extra
  (brevitas); without them the rows say so.

For each network: ``bdp.compile`` for x86; the **binary MAC share** (multiply-accumulates of
the layers that became ``bdp.BinaryConv`` over those of every conv / linear layer, counted on
the compiled graph with ONNX shape inference); bdp and onnxruntime FP32 timed interleaved in
this process (:func:`bdp.toolchain.bench.table.time_interleaved`: each waits for the other's threads
to stop, passes alternate) with the same thread count; the ratio of medians; the per-kernel
shares of bdp's run (:func:`bdp.toolchain.runtime.profile.per_op_breakdown`, as ``bdp profile`` prints
them): where the time goes. onnxruntime runs the bundle's ``reference.onnx``: the model as
exported (QONNX ops, which onnxruntime has no kernels for, as their standard-op definitions).

The issue's target: faster than onnxruntime FP32 everywhere, at least 3x where at least 90% of
the MACs are binary. On a machine shared with other jobs the absolute times move with the load;
ratios of interleaved runs are what counts (the load average is recorded per network).
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
import sys
import tempfile
import time

import numpy as np

from bdp.errors import first_line

LARQ_ORDER = ("QuickNet", "QuickNetSmall", "BiRealNet", "BinaryDenseNet28", "RealToBinaryNet", "BinaryAlexNet",
              "XNORNet")
BREVITAS = ("tfc_1w1a", "sfc_1w1a", "lfc_1w1a", "cnv_1w1a")
TARGET_BINARY_SHARE, TARGET_RATIO = 0.90, 3.0
MATCH_REL = 1e-3  # outputs equal the source framework's (or onnxruntime's) to this, relative to their scale


def _repo_tests():
    """tests/ of the source checkout bdp runs from, or None (an installed wheel has none)."""
    import bdp

    d = os.path.join(os.path.dirname(os.path.abspath(bdp.__file__)), "tests")
    return d if os.path.isfile(os.path.join(d, "wild_models.py")) else None


def _wild_models():
    tests = _repo_tests()
    if tests is None:
        return None
    spec = importlib.util.spec_from_file_location("bdp_wild_models", os.path.join(tests, "wild_models.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def larq_networks(wild_dir=None):
    """[(name, onnx bytes, input x, TensorFlow output or None, kind)]: the networks of WILD_DIR
    (kind 'zoo size'), else the committed fixtures (kind 'fixture')."""
    folder = wild_dir
    kind = "zoo size"
    if folder is None:
        tests = _repo_tests()
        if tests is None:
            return []
        folder, kind = os.path.join(tests, "fixtures", "wild"), "fixture"
    out = []
    for name in LARQ_ORDER:
        npz = os.path.join(folder, name + ".io.npz")
        plain = os.path.join(folder, name + ".onnx")
        if not os.path.isfile(npz) or not (os.path.isfile(plain) or os.path.isfile(plain + ".xz")):
            continue
        if os.path.isfile(plain):
            with open(plain, "rb") as f:
                data = f.read()
        else:
            with lzma.open(plain + ".xz", "rb") as f:
                data = f.read()
        io_ = np.load(npz)
        out.append((f"larq/{name}", data, io_["x"][:1].astype(np.float32), io_["y"][:1], kind))
    return out


def count_macs(final, x) -> dict:
    """{'binary', 'float'}: multiply-accumulates of the compiled graph FINAL on input X:
    ``bdp.BinaryConv`` nodes are binary; Conv, ConvTranspose, MatMul and Gemm are float. The
    layers' input shapes come from one onnxruntime run of FINAL (bdp ops as their function
    bodies), which knows every shape; output sizes from each layer's attributes and weights."""
    import onnx

    from bdp.passes.core import run_onnxruntime

    layers = [n for n in final.graph.node if n.op_type in ("BinaryConv", "Conv", "ConvTranspose", "MatMul", "Gemm")]
    inits = {t.name: list(t.dims) for t in final.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(final)
    names = sorted({n.input[0] for n in layers} - set(inits) - {o.name for o in probe.graph.output})
    for nm in names:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(nm))
    inp = next(i.name for i in final.graph.input if i.name not in inits)
    outs = run_onnxruntime(probe, {inp: x}, optimize=False)
    shapes = {o.name: list(v.shape) for o, v in zip(probe.graph.output, outs)}
    shapes[inp] = list(x.shape)
    macs = {"binary": 0, "float": 0}
    for n in layers:
        xs = shapes.get(n.input[0])
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if not xs or w is None:
            continue
        a = {t.name: onnx.helper.get_attribute_value(t) for t in n.attribute}
        if n.op_type in ("BinaryConv", "Conv"):
            m = inits[n.input[2]][0] if n.op_type == "BinaryConv" else w[0]
            k = list(a.get("kernel_shape") or w[2:])
            sp = xs[2:]
            st = list(a.get("strides") or [1] * len(k))
            dl = list(a.get("dilations") or [1] * len(k))
            pd = list(a.get("pads") or [0] * (2 * len(k)))
            out = [(sp[i] + pd[i] + pd[i + len(k)] - dl[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(len(k))]
            mac = xs[0] * m * int(np.prod(out)) * (xs[1] // int(a.get("group", 1))) * int(np.prod(k))
        elif n.op_type == "ConvTranspose":
            mac = int(np.prod(xs)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            kdim, mdim = (w[1], w[0]) if a.get("transB", 0) else (w[0], w[1])
            mac = (xs[1] if a.get("transA", 0) else xs[0]) * kdim * mdim
        else:
            mac = int(np.prod(xs)) * w[-1]
        macs["binary" if n.op_type == "BinaryConv" else "float"] += int(mac)
    return macs


def _final_graph(onnx_path, shape):
    """The graph bdp compiles ONNX_PATH to (default pipeline, input fixed to SHAPE)."""
    import onnx

    from bdp.passes import run_pipeline

    m = onnx.load(onnx_path)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    final, _ = run_pipeline(m, "default", shapes={inp.name: tuple(shape)})
    return final


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))


def bench_network(name, onnx_path, x, want, kind, workdir, *, threads, rounds):
    """One row of the wild table (see the module docstring)."""
    import bdp

    from .table import time_interleaved
    from bdp.toolchain.bundle.format import load_bundle
    from bdp.toolchain.runtime.profile import per_op_breakdown
    from bdp.toolchain.runtime.timing import ort_session

    row = {"name": name, "kind": kind, "input_shape": list(x.shape), "load_average_start": list(os.getloadavg())}
    out = os.path.join(workdir, name.replace("/", "-") + ".bundle")
    t0 = time.perf_counter()
    bdp.compile(onnx_path, target="x86", out=out, input_shape=x.shape)
    row["compile_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    st = man.get("stats", {})
    row["binary_convs"], row["fp_convs"] = st.get("binary_convs"), st.get("fp_convs")
    row["left_float"] = sorted({f"{r['op']}: {r['reason']}" for r in rep.get("left_float", [])})
    macs = count_macs(_final_graph(onnx_path, x.shape), x)
    row["binary_macs"], row["float_macs"] = macs["binary"], macs["float"]
    total = macs["binary"] + macs["float"]
    row["binary_mac_share"] = macs["binary"] / total if total else 0.0

    bundle = load_bundle(out)
    x_dev = bundle.to_device(x)
    sess = ort_session(os.path.join(out, "reference.onnx"), threads)
    iname = sess.get_inputs()[0].name
    got = next(iter(bundle(x).values()))
    ort_out = sess.run(None, {iname: x})[0]
    row["max_rel_diff_vs_onnxruntime"] = _rel(got, ort_out)
    if want is not None:
        row["max_rel_diff_vs_source"] = _rel(got, want)
    res = time_interleaved({"bdp": lambda: bundle.run_raw(x_dev), "onnxruntime_fp32": lambda: sess.run(None, {iname: x})},
                           rounds)
    row.update(res)
    row["ratio"] = res["onnxruntime_fp32"]["median_ms"] / res["bdp"]["median_ms"]
    row["ratio_min"] = res["onnxruntime_fp32"]["min_ms"] / res["bdp"]["min_ms"]
    per_op, row["per_op_note"] = per_op_breakdown(bundle, x_dev, repeat=7)
    row["per_op_top"] = per_op[:6]
    kern = sum(r["total_ms"] for r in per_op) or 1.0
    row["binary_kernel_time_share"] = sum(r["total_ms"] for r in per_op if "binary" in r["op"]) / kern
    row["target_ratio"] = TARGET_RATIO if row["binary_mac_share"] >= TARGET_BINARY_SHARE else 1.0
    # a time of wrong outputs meets nothing (judged against the source framework where it ran)
    row["max_rel_diff"] = row.get("max_rel_diff_vs_source", row["max_rel_diff_vs_onnxruntime"])
    row["outputs_match"] = row["max_rel_diff"] <= MATCH_REL
    fast = row["ratio"] >= row["target_ratio"] if row["target_ratio"] > 1.0 else row["ratio"] > 1.0
    row["meets_target"] = fast and row["outputs_match"]
    row["load_average_end"] = list(os.getloadavg())
    return row


def brevitas_networks(names):
    """[(name, onnx bytes, x, torch output, kind)] from tests/wild_models.py, or [(name, error)]."""
    wm = _wild_models()
    if wm is None:
        return [(f"brevitas/{n}", "no tests/wild_models.py (bdp is not running from a source checkout)") for n in names]
    out = []
    for n in names:
        try:
            m = wm.bnn_pynq(n, "torchscript")
        except ImportError as e:
            out.append((f"brevitas/{n}", f"needs the test extra (brevitas): {e}"))
            continue
        out.append((f"brevitas/{n}", m.model.SerializeToString(), m.inputs[0], m.outputs[0], "bnn_pynq"))
    return out


TRAINING_CODE = ("reactnet-a", "bireal-18")
TRAINING_EXPORTS = ("onnx17", "dynamo")


def training_code_networks(quick=False):
    """[(name, onnx bytes, x, torch output, kind)]: ReActNet-A and Bi-Real-18 as their training
    code writes them (straight-through binarizers, tests/ste_models.py) at 224x224, exported by
    torch.onnx's TorchScript exporter (opset 17) and its dynamo exporter; or [(name, error)]."""
    tests = _repo_tests()
    names = TRAINING_CODE[:1] if quick else TRAINING_CODE
    if tests is None:
        return [(f"training-code/{n}", "no tests/ste_models.py (bdp is not running from a source checkout)")
                for n in names]
    import torch

    spec = importlib.util.spec_from_file_location("bdp_ste_models", os.path.join(tests, "ste_models.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = []
    for n in names:
        size = 112 if quick else 224
        m = mod.build_full(n, size=size)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = m(x).numpy()
        for how in TRAINING_EXPORTS[:1] if quick else TRAINING_EXPORTS:
            with tempfile.TemporaryDirectory() as d:
                path = mod.export(m, x, how, os.path.join(d, "m.onnx"))
                with open(path, "rb") as f:
                    data = f.read()
            out.append((f"training-code/{n}/{how}", data, x.numpy(), want, "train code"))
    return out


def format_wild(rows) -> str:
    lines = ["binarized networks from the wild, x86, batch 1 (ms: median of interleaved runs; x = ORT FP32 / bdp)",
             f"  {'network':<26} {'input':<14} {'kind':<9} {'packed':>6} {'bin MAC':>7} {'bdp':>9} {'ORT FP32':>9} "
             f"{'x':>6} {'x(min)':>6} {'target':>6} {'bin kern':>8} {'rel err':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['name']:<26} error: {r['error']}")
            continue
        shape = "x".join(str(d) for d in r["input_shape"][1:])
        lines.append(
            f"  {r['name']:<26} {shape:<14} {r['kind']:<9} {r['binary_convs']:>6} {100 * r['binary_mac_share']:6.1f}% "
            f"{r['bdp']['median_ms']:9.2f} {r['onnxruntime_fp32']['median_ms']:9.2f} {r['ratio']:6.2f} "
            f"{r['ratio_min']:6.2f} {('>=' if r['target_ratio'] > 1 else '>') + format(r['target_ratio'], 'g'):>6}"
            f"{'' if r['meets_target'] else '!':1} {100 * r['binary_kernel_time_share']:7.1f}% "
            f"{r['max_rel_diff']:8.1e}{'' if r['outputs_match'] else ' WRONG OUTPUTS'}")
    return "\n".join(lines)


def summarize_wild(rows) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {"networks": len(ok), "errors": [r["name"] for r in rows if "error" in r],
            "meet_target": [r["name"] for r in ok if r["meets_target"]],
            "miss_target": [r["name"] for r in ok if not r["meets_target"]],
            "wrong_outputs": [r["name"] for r in ok if not r["outputs_match"]],
            "ratio": {r["name"]: r["ratio"] for r in ok}}


def run_wild(res, json_path, *, threads, quick=False, wild_dir=None, workdir=None, training_code_only=False):
    """Time the wild networks into RES['wild'], print the table, write JSON_PATH; returns RES.
    TRAINING_CODE_ONLY (``--only training-code``): the training-code rows alone."""
    from .table import write_json

    if wild_dir is not None and not os.path.isdir(wild_dir):
        from bdp.errors import InputError

        raise InputError(f"--wild-dir {wild_dir}: no such folder")
    larq = [] if training_code_only else larq_networks(wild_dir)
    if quick:
        larq = larq[:2]
    nets = larq + ([] if training_code_only else brevitas_networks(BREVITAS[:1] + BREVITAS[3:] if quick else BREVITAS)) + \
        training_code_networks(quick)
    if training_code_only:
        nets = [n for n in nets if n[0].startswith("training-code/")]
    rounds = 5 if quick else 20
    res["wild_source"] = wild_dir or "committed fixtures (small: not representative of speed)"
    res["wild"] = []
    with tempfile.TemporaryDirectory(prefix="bdp-bench-wild-", dir=workdir) as tmp:
        for net in nets:
            if len(net) == 2:
                row = {"name": net[0], "error": net[1]}
            else:
                name, data, x, want, kind = net
                path = os.path.join(tmp, name.replace("/", "-") + ".onnx")
                with open(path, "wb") as f:
                    f.write(data)
                try:
                    row = bench_network(name, path, x, want, kind, tmp, threads=threads, rounds=rounds)
                except Exception as e:  # keep going: one network must not hide the others
                    row = {"name": name, "error": f"{type(e).__name__}: {first_line(e, 300, empty='')}"}
                finally:
                    os.remove(path)
            res["wild"].append(row)
            print(format_wild([row]).splitlines()[-1], flush=True)
    print(format_wild(res["wild"]))
    res["host"]["load_average_end"] = list(os.getloadavg())
    res["summary"] = {"wild": summarize_wild(res["wild"])}
    s = res["summary"]["wild"]
    print(f"wild: {len(s['meet_target'])} of {s['networks']} meet the target (> 1x ORT FP32; >= {TARGET_RATIO:g}x "
          f"where >= {100 * TARGET_BINARY_SHARE:g}% of MACs are binary); missing: {', '.join(s['miss_target']) or 'none'}")
    write_json(json_path, res)
    print(f"wrote {json_path} (no chart for --only wild)")
    return res
