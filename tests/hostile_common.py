"""Small real inputs for the hostile-input tests: a binary ONNX model built with onnx.helper
(float conv -> Sign -> conv with +/-alpha weights -> two outputs) and its compiled bundle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (1, 3, 8, 8)


def tiny_onnx(path, seed=0, shape=SHAPE, head=0):
    """Write a small binarized dense predictor to PATH (opset 17) and return PATH. HEAD > 0 puts
    a float 1x1 conv of HEAD channels in front of the semseg output (HEAD x 16 float weights)."""
    rng = np.random.default_rng(seed)
    c = 16
    w0 = rng.standard_normal((c, shape[1], 3, 3)).astype(np.float32) * 0.3
    b0 = (rng.standard_normal(c) * 0.1).astype(np.float32)
    alpha = rng.uniform(0.5, 1.5, (c, 1, 1, 1)).astype(np.float32)
    w1 = (alpha * np.sign(rng.standard_normal((c, c, 3, 3)))).astype(np.float32)
    w2 = rng.standard_normal((2, c, 1, 1)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Sign", ["h"], ["s"]),
        helper.make_node("Conv", ["s", "w1"], ["depth"], pads=[1, 1, 1, 1]),
    ]
    inits = [("w0", w0), ("b0", b0), ("w1", w1)]
    if head:
        w3 = rng.standard_normal((head, c, 1, 1)).astype(np.float32) * 0.1
        w2 = rng.standard_normal((2, head, 1, 1)).astype(np.float32) * 0.1
        nodes += [helper.make_node("Conv", ["depth", "w3"], ["wide"]),
                  helper.make_node("Conv", ["wide", "w2"], ["semseg"])]
        inits += [("w3", w3), ("w2", w2)]
    else:
        nodes.append(helper.make_node("Conv", ["depth", "w2"], ["semseg"]))
        inits.append(("w2", w2))
    n, _, hh, ww = shape
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [n, c, hh, ww]),
         helper.make_tensor_value_info("semseg", TensorProto.FLOAT, [n, 2, hh, ww])],
        initializer=[numpy_helper.from_array(a, k) for k, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def onnxruntime_outputs(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))


def tree(folder):
    """Every path under FOLDER (relative), for 'nothing was left behind' checks."""
    import os

    out = set()
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out


def shared_bundle(tmp_path_factory):
    """One compiled x86 bundle of :func:`tiny_onnx` per test session (compiled by the first test
    module that asks, reused by the others). Tests copy it before changing anything."""
    import bdp

    base = tmp_path_factory.getbasetemp()
    out = base / "hostile-shared" / "bundle"
    if not (out / "manifest.json").is_file():
        (base / "hostile-shared").mkdir(exist_ok=True)
        model = tiny_onnx(base / "hostile-shared" / "tiny.onnx")
        bdp.compile(str(model), out=str(out))
    return out


def copy_bundle(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst
