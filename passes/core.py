"""The pass framework.

A pass is a pure, named rewrite ``ModelProto -> ModelProto``: it never mutates its argument
(the manager hands it a copy) and records what it did in a :class:`Report`. Passes are grouped
into named pipelines. ``run_pipeline(..., verify=True)`` runs onnxruntime on the graph before
and after every pass on the same random inputs and raises if any output moved by more than the
tolerance: the proof, pass by pass, that a rewrite kept the function.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from bdp.errors import InputError


@dataclass
class Report:
    """What the passes did: fused nodes and nodes left in float, each with its reason."""

    fused: list = field(default_factory=list)  # (pass, node name, what)
    left_float: dict = field(default_factory=dict)  # node name -> (op_type, reason)
    notes: list = field(default_factory=list)
    verified: list = field(default_factory=list)  # (pass, max abs diff)

    def fuse(self, pass_name, node_name, what):
        self.fused.append((pass_name, node_name, what))
        self.left_float.pop(node_name, None)

    def leave(self, node_name, op_type, reason):
        self.left_float[node_name] = (op_type, reason)

    def to_dict(self):
        return {
            "fused": [{"pass": p, "node": n, "what": w} for p, n, w in self.fused],
            "left_float": [{"node": n, "op": o, "reason": r} for n, (o, r) in sorted(self.left_float.items())],
            "notes": list(self.notes),
            "verified": [{"pass": p, "max_abs_diff": d} for p, d in self.verified],
        }


@dataclass
class Pass:
    name: str
    fn: Callable[[onnx.ModelProto, Report], onnx.ModelProto]
    description: str
    exact: bool = True  # binary-exact rewrite (verify tolerance is float round-off)

    def __call__(self, model, report=None):
        report = report if report is not None else Report()
        return self.fn(copy.deepcopy(model), report)


PASSES: dict[str, Pass] = {}
PIPELINES: dict[str, list[str]] = {}


def register_pass(name, description, exact=True):
    def deco(fn):
        PASSES[name] = Pass(name, fn, description, exact)
        return fn

    return deco


def register_pipeline(name, pass_names):
    PIPELINES[name] = list(pass_names)


def random_inputs(model: onnx.ModelProto, seed=0, shapes=None) -> dict:
    """Random normal inputs for every graph input (dims left open become 1, or from ``shapes``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if shapes and inp.name in shapes:
            shape = list(shapes[inp.name])
        else:
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_onnxruntime(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    from .ops import attach_functions

    m = attach_functions(copy.deepcopy(model))
    if m.ir_version > 10:
        m.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_abs_diff(a: list, b: list) -> float:
    if len(a) != len(b):
        return float("inf")
    d = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            scale = max(1.0, float(np.abs(y).max()))
            d = max(d, float(np.abs(x.astype(np.float64) - y).max()) / scale)
    return d


def run_pipeline(model: onnx.ModelProto, pipeline="default", *, verify=False, verify_tol=1e-4,
                 dump_after=None, dump_dir=None, report=None, shapes=None, progress=None):
    """Run the passes of PIPELINE (a name or a list of pass names) in order.

    ``dump_after``: a pass name (or "all"); the model after it is written to ``dump_dir``.
    ``verify``: compare onnxruntime outputs before/after each pass (relative to output magnitude).
    """
    names = PIPELINES[pipeline] if isinstance(pipeline, str) else list(pipeline)
    for n in names:
        if n not in PASSES:
            raise InputError(f"unknown pass '{n}'; `bdp passes` lists them")
    if dump_after and dump_after != "all" and dump_after not in names:
        raise InputError(f"--dump-after {dump_after}: no such pass in pipeline "
                         f"({', '.join(names)}); `bdp passes` lists them")
    report = report if report is not None else Report()
    feeds = ref = None
    for i, n in enumerate(names):
        p = PASSES[n]
        if progress:
            progress(n)
        if verify and ref is None:
            feeds = random_inputs(model, shapes=shapes)
            ref = run_onnxruntime(model, feeds)
        model = p(model, report)
        if verify:
            got = run_onnxruntime(model, feeds)
            d = max_abs_diff(got, ref)
            report.verified.append((n, d))
            if not d <= verify_tol:
                raise RuntimeError(f"pass '{n}' changed the model's outputs (max relative diff {d:.3g})")
        if dump_after and dump_dir and dump_after in (n, "all"):
            os.makedirs(dump_dir, exist_ok=True)
            path = os.path.join(dump_dir, f"{i:02d}-{n}.onnx")
            from .ops import attach_functions

            onnx.save(attach_functions(copy.deepcopy(model)), path)
            report.notes.append(f"wrote {path}")
    return model, report
