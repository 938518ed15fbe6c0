"""The pass framework.

A pass is a pure, named rewrite ``ModelProto -> ModelProto``: it never mutates its argument
(the manager hands it a copy) and records what it did in a :class:`Report`. Passes are grouped
into named pipelines. ``run_pipeline(..., verify=True)`` checks every pass with onnxruntime on random inputs:
the proof, pass by pass, that a rewrite kept the function.

The check is *local* (teacher-forced, :func:`verify_rewrite`): the nodes a pass changed run on
the values the graph before the pass computed for their inputs, and their outputs are compared
with the values the old nodes computed. Comparing only the graph outputs does not work for a
binary network: a rewrite that changes the float rounding of a conv by one ulp moves the values
that lie within one ulp of the next binarizer's threshold to the other side, each flip moves
the next layer by a whole step, and ten layers later every output is different (a trained
ReActNet at 256x320 differs everywhere after ``fuse-binary-conv``, which is exact). Locally a
flip stays a flip: an output passes when at most ``TIE_FRACTION`` of its elements differ by
more than the tolerance (values that sat on a threshold), which a wrong border, channel or
stride would exceed.
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
    verified: list = field(default_factory=list)  # (pass, max relative diff, node by node)
    one_bit_float: dict = field(default_factory=dict)  # node name -> reason: 1-bit weights, left in float

    def fuse(self, pass_name, node_name, what):
        self.fused.append((pass_name, node_name, what))
        self.left_float.pop(node_name, None)
        self.one_bit_float.pop(node_name, None)

    def leave(self, node_name, op_type, reason):
        self.left_float[node_name] = (op_type, reason)

    def to_dict(self):
        return {
            "fused": [{"pass": p, "node": n, "what": w} for p, n, w in self.fused],
            "left_float": [{"node": n, "op": o, "reason": r} for n, (o, r) in sorted(self.left_float.items())],
            "notes": list(self.notes),
            "verified": [{"pass": p, "max_relative_diff": d} for p, d in self.verified],
            "one_bit_float": [{"node": n, "reason": r} for n, r in self.one_bit_float.items()],
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


def run_onnxruntime(model: onnx.ModelProto, feeds: dict, optimize=True) -> list:
    """Run MODEL (bdp ops as their function bodies) in onnxruntime on FEEDS. ``optimize=False``
    turns onnxruntime's graph optimizations off: every node computes as written (its Conv + Mul
    fusion, for one, folds a binary conv's scale into ±1 weights and rounds the integer sum)."""
    import onnxruntime as ort

    from .ops import attach_functions

    m = attach_functions(copy.deepcopy(model))
    if m.ir_version > 10:
        m.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: a failing node is reported by the caller, on one line
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


TIE_FRACTION = 1e-3  # elements of one tensor allowed to differ (binarizer ties) in verify_rewrite
TIE_TOL = 1e-5  # a binarized value this close to its threshold (relative) is a tie


def _all_values(model, feeds) -> dict:
    """Every tensor MODEL computes on FEEDS (onnxruntime; intermediates as untyped outputs)."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                vi = onnx.ValueInfoProto()
                vi.name = o
                m.graph.output.append(vi)
                have.add(o)
    vals = dict(zip([o.name for o in m.graph.output], run_onnxruntime(m, feeds, optimize=False)))
    vals.update(feeds)
    return vals


def _compare(got, want, tol):
    """(max relative difference outside ties, fraction of elements beyond TOL)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf"), 1.0
    if not got.size:
        return 0.0, 0.0
    if got.dtype == bool or want.dtype == bool or not np.issubdtype(want.dtype, np.number):
        bad = got != want
        return (float("inf") if bad.mean() > TIE_FRACTION else 0.0), float(bad.mean())
    scale = max(1.0, float(np.abs(want).max()))
    rel = np.abs(got.astype(np.float64) - want) / scale
    bad = rel > tol
    frac = float(bad.mean())
    if frac == 0:
        return float(rel.max()), 0.0
    return (float(rel[~bad].max()) if (~bad).any() else float("inf")) if frac <= TIE_FRACTION else float(rel.max()), frac


def _tensor_key(t):
    from onnx import numpy_helper

    v = numpy_helper.to_array(t)
    return (str(v.dtype), v.shape, v.tobytes())


def _node_key(n):
    """What a node computes, independent of how its proto was serialized."""
    attrs = []
    for a in n.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = _tensor_key(v)
        elif isinstance(v, (onnx.GraphProto, list)) and not all(isinstance(x, (int, float, bytes, str)) for x in
                                                                (v if isinstance(v, list) else [v])):
            v = a.SerializeToString()
        elif isinstance(v, list):
            v = tuple(v)
        attrs.append((a.name, repr(v)))
    return (n.domain, n.op_type, n.name, tuple(n.input), tuple(n.output), tuple(sorted(attrs)))


def _scalar_consts(model) -> dict:
    from onnx import numpy_helper

    out = {}
    for t in model.graph.initializer:
        if np.prod(t.dims, dtype=np.int64) == 1:
            out[t.name] = float(numpy_helper.to_array(t).reshape(-1)[0])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute:
            a = n.attribute[0]
            if a.name == "value" and np.prod(a.t.dims, dtype=np.int64) == 1:
                out[n.output[0]] = float(numpy_helper.to_array(a.t).reshape(-1)[0])
            elif a.name == "value_float":
                out[n.output[0]] = float(a.f)
    return out


def _sign_readers(model, name, consts=None):
    """The threshold at which every reader of tensor NAME binarizes it, when all of them do so at
    one threshold (``bdp.BinaryConv`` reading it as X, or the first node of any binarizer form of
    :mod:`bdp.passes.binarizers`) and it is not a graph output; else None."""
    from .binarizers import reader_threshold
    from .ops import BINARY_CONV, DOMAIN

    if name in {o.name for o in model.graph.output}:
        return None
    consts = _scalar_consts(model) if consts is None else consts
    ts = set()
    for n in model.graph.node:
        if name not in n.input:
            continue
        if list(n.input).count(name) != 1:
            return None
        index = list(n.input).index(name)
        if n.domain == DOMAIN and n.op_type == BINARY_CONV and index == 0:
            ts.add(next((a.f for a in n.attribute if a.name == "act_threshold"), 0.0))
            continue
        t = reader_threshold(n, index, consts)
        if t is None:
            return None
        ts.add(t)
    return ts.pop() if len(ts) == 1 else None


def verify_rewrite(before, after, feeds, tol=1e-4, before_values=None):
    """Teacher-forced check of one rewrite: ``(max relative diff, tie fraction, compared)``.

    The nodes of AFTER that are not in BEFORE (or that read an initializer the pass changed) run
    in onnxruntime on BEFORE's values of their inputs, and the tensors they produce that BEFORE
    also has are compared with BEFORE's values:

    * a tensor that only binarizers read, before and after (binary convs, ``x >= t``), is compared
      as they see it, binarized at their thresholds (``fold-sign-output`` turns a float into the
      ±1 it stood for); a value that was on the threshold to round-off may go either way (a tie),
      every other bit must agree. Rewritten nodes that read it get BEFORE's value (as ±1 where
      their threshold differs), so a tie does not travel from one rewritten node into the next;
    * any other tensor is compared as it is, when something unchanged reads it or it is a graph
      output (else it is internal to the rewrite: the same name may stand for something else).

    For a float tensor the diff is ``inf`` where more than ``TIE_FRACTION`` of its elements differ
    by more than TOL (relative to its largest magnitude)."""
    vals = before_values if before_values is not None else _all_values(before, feeds)
    old_nodes = {_node_key(n) for n in before.graph.node}
    old_inits = {i.name: _tensor_key(i) for i in before.graph.initializer}
    new_inits = {i.name: i for i in after.graph.initializer}
    changed_inits = {k for k, v in new_inits.items() if old_inits.get(k) != _tensor_key(v)}
    changed = [n for n in after.graph.node
               if _node_key(n) not in old_nodes or any(i in changed_inits for i in n.input)]
    if not changed:
        return 0.0, 0.0, 0
    graph_outs = {o.name for o in after.graph.output}
    lost = [o for o in graph_outs if o not in vals]
    if lost:
        raise RuntimeError(f"verify: graph output {lost[0]} is new")
    changed_ids = {id(n) for n in changed}
    read_by_unchanged = {i for n in after.graph.node if id(n) not in changed_ids for i in n.input}
    produced = [o for n in changed for o in n.output if o]

    # what to compare (name -> (before threshold, after threshold) or None for as-is) and which
    # rewritten readers get BEFORE's value instead of the rewritten producer's
    compare, forced = {}, {}
    cb, ca = _scalar_consts(before), _scalar_consts(after)
    for o in produced:
        if o not in vals:
            continue
        tb, ta = _sign_readers(before, o, cb), _sign_readers(after, o, ca)
        if tb is not None and ta is not None:
            compare[o] = (tb, ta)
            if ta == tb:
                forced[o] = np.asarray(vals[o])
            elif -1.0 < ta <= 1.0:
                forced[o] = np.where(np.asarray(vals[o]) >= np.float32(tb), 1.0, -1.0).astype(np.float32)
        elif o in graph_outs or o in read_by_unchanged:
            compare[o] = None
            forced[o] = np.asarray(vals[o])
    if not compare:
        return 0.0, 0.0, 0

    nodes, feed_vals, used_inits = [], {}, []
    produced_set = set(produced)
    for n in changed:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        for k, i in enumerate(n2.input):
            if not i:
                continue
            if i in forced:
                n2.input[k] = i + "__before"
                feed_vals[i + "__before"] = forced[i]
            elif i in produced_set:
                continue
            elif i in new_inits:
                if i not in used_inits:
                    used_inits.append(i)
            elif i in vals:
                feed_vals[i] = np.asarray(vals[i])
            else:
                raise RuntimeError(f"verify: no value for {i} before the pass")
        nodes.append(n2)
    inputs = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feed_vals.items()]
    outs = list(compare)
    outputs = []
    for o in outs:
        vi = onnx.ValueInfoProto()
        vi.name = o
        outputs.append(vi)
    graph = onnx.helper.make_graph(nodes, "verify", inputs, outputs, [new_inits[i] for i in used_inits])
    sub = onnx.helper.make_model(graph, opset_imports=list(after.opset_import), ir_version=after.ir_version)
    sub.functions.extend(after.functions)
    got = run_onnxruntime(sub, feed_vals, optimize=False)
    worst, ties = 0.0, 0.0
    for o, g in zip(outs, got):
        w = vals[o]
        if compare[o] is not None:  # only binarized: compare what the readers see
            tb, ta = compare[o]
            raw = np.asarray(w, np.float64)
            g, w = np.where(g >= np.float32(ta), 1.0, -1.0), np.where(w >= np.float32(tb), 1.0, -1.0)
            # a value on the threshold to round-off (an integer sum that lands exactly on it, summed
            # in float by the old graph) may go either way
            tie = np.abs(raw - tb) <= TIE_TOL * max(1.0, float(np.abs(raw).max()))
            g = np.where(tie, w, g)
            # every other bit must agree: the old value was clear of the threshold
            flips = float((g != w).mean())
            d, f = (float(np.abs(g - w).max()) if flips else 0.0), flips
            worst, ties = max(worst, d), max(ties, f)
            continue
        d, f = _compare(g, w, tol)
        worst, ties = max(worst, d), max(ties, f)
    return worst, ties, len(outs)


def _foreign_ops(model: onnx.ModelProto) -> list:
    """Domain:op of the nodes onnxruntime has no kernel for (QONNX's custom ops, which
    ``qonnx-to-standard`` rewrites): verification waits until they are gone."""
    from .binarizers import QONNX_DOMAINS

    return sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain in QONNX_DOMAINS})


def run_pipeline(model: onnx.ModelProto, pipeline="default", *, verify=False, verify_tol=1e-4,
                 dump_after=None, dump_dir=None, report=None, shapes=None, progress=None):
    """Run the passes of PIPELINE (a name or a list of pass names) in order.

    ``dump_after``: a pass name (or "all"); the model after it is written to ``dump_dir``.
    ``verify``: check each pass node by node with onnxruntime (:func:`verify_rewrite`).
    """
    names = PIPELINES[pipeline] if isinstance(pipeline, str) else list(pipeline)
    for n in names:
        if n not in PASSES:
            raise InputError(f"unknown pass '{n}'; `bdp passes` lists them")
    if dump_after and dump_after != "all" and dump_after not in names:
        raise InputError(f"--dump-after {dump_after}: no such pass in pipeline "
                         f"({', '.join(names)}); `bdp passes` lists them")
    report = report if report is not None else Report()
    feeds = vals = None
    for i, n in enumerate(names):
        p = PASSES[n]
        if progress:
            progress(n)
        checked = verify and not _foreign_ops(model)
        if verify and not checked:
            report.notes.append(f"verify {n}: not checked, the graph before it has ops onnxruntime cannot run "
                                f"({', '.join(_foreign_ops(model))}); checking starts once they are rewritten")
        if checked and vals is None:
            feeds = random_inputs(model, shapes=shapes)
            vals = _all_values(model, feeds)
        before = model
        model = p(model, report)
        if checked:
            d, ties, k = verify_rewrite(before, model, feeds, verify_tol, before_values=vals)
            report.verified.append((n, d))
            if ties:
                report.notes.append(f"verify {n}: {ties:.2g} of the elements of a rewritten tensor differ "
                                    f"(values on a binarizer's threshold, where rounding decides)")
            if not d <= verify_tol:
                raise RuntimeError(f"pass '{n}' changed what the graph computes (max relative diff {d:.3g}"
                                   f"{f', in {ties:.2g} of the elements' if ties else ''}, checked node by node)")
            if model.graph.SerializeToString() != before.graph.SerializeToString():
                vals = _all_values(model, feeds)
        if dump_after and dump_dir and dump_after in (n, "all"):
            os.makedirs(dump_dir, exist_ok=True)
            path = os.path.join(dump_dir, f"{i:02d}-{n}.onnx")
            from .ops import attach_functions

            onnx.save(attach_functions(copy.deepcopy(model)), path)
            report.notes.append(f"wrote {path}")
    return model, report
