"""Layout: undo the transposes of graphs converted from NHWC frameworks (tf2onnx from Keras/Larq).

tf2onnx keeps a TensorFlow graph's NHWC layout and wraps every NCHW-only op (Conv, pooling) in
``Transpose(0,3,1,2) ... Transpose(0,2,3,1)``; everything between two convs (BatchNorm as
``Mul``/``Add`` with ``[C]`` constants, the binarizer, Larq's ``Pad(1.0)``) runs in NHWC. A
binarizer separated from its conv by a Transpose does not pack. ``cancel-transposes`` moves each
Transpose down through the ops that do not care about layout (elementwise ops, whose constants it
permutes; ``Pad``, whose pads it permutes; ``Concat``, whose axis it maps) until it meets another
Transpose, composes the two, and drops the pair when they cancel: what onnxruntime's transpose
optimizer does, so the result does not depend on the user pre-optimizing. Exact: only data
movement changes place.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .core import register_pass
from .graph import const_value, from_gs, to_gs

# ops that compute each output element from the same-position elements of their inputs
# (NumPy broadcasting), with the attributes below unaffected by layout
_ELEMENTWISE = {
    "Relu", "Sign", "Neg", "Abs", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Cast",
    "Not", "Erf", "Floor", "Ceil", "Round", "Softsign", "Softplus", "HardSigmoid", "HardSwish", "LeakyRelu",
    "Elu", "Selu", "Celu", "ThresholdedRelu", "Clip", "PRelu",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "And", "Or", "Xor", "Where", "BitShift", "Mod",
}
# inputs that are scalar parameters, not data (Clip's min/max)
_PARAM_INPUTS = {"Clip": (1, 2)}


def _perm(t: gs.Node):
    p = t.attrs.get("perm")
    return [int(v) for v in p] if p is not None else None


def _inverse(p):
    inv = [0] * len(p)
    for i, v in enumerate(p):
        inv[v] = i
    return inv


def _transpose_of(t: gs.Tensor, rank=None):
    """(source tensor, perm) when T is made by a Transpose with an explicit perm, else None."""
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or t.inputs[0].op != "Transpose":
        return None
    p = _perm(t.inputs[0])
    if p is None or (rank is not None and len(p) != rank):
        return None
    return t.inputs[0].inputs[0], p


def _permute_const(c: np.ndarray, perm) -> np.ndarray | None:
    """A constant that broadcasts against Y = transpose(X, PERM), re-laid out to broadcast
    against X the same way (None when its rank exceeds Y's)."""
    r = len(perm)
    if c.ndim > r:
        return None
    full = c.reshape((1,) * (r - c.ndim) + c.shape)
    out = np.transpose(full, _inverse(perm))
    # drop leading 1s again where possible (keeps scalars scalars)
    while out.ndim > c.ndim and out.shape[0] == 1:
        out = out[0]
    return np.ascontiguousarray(out)


def _push_through(graph, node, perm, counter, dry=False):
    """Rewrite NODE, every data input of which is a Transpose(PERM) or a constant, to run on the
    untransposed tensors and put one Transpose(PERM) after it. Returns True when done (with DRY:
    when it could be done, changing nothing)."""
    data = [i for k, i in enumerate(node.inputs) if k not in _PARAM_INPUTS.get(node.op, ()) and i.name]
    if node.op == "Pad":
        data = node.inputs[:1]
    if len(node.outputs) != 1 or not data:
        return False
    r = len(perm)
    new_inputs = list(node.inputs)
    for k, t in enumerate(node.inputs):
        if t not in data:
            continue
        tr = _transpose_of(t, r)
        if tr is not None and tr[1] == perm:
            new_inputs[k] = tr[0]
            continue
        c = const_value(t)
        if c is None and t in graph.inputs and len(t.shape or ()) == r:
            # a graph input (an NHWC model's own input): read it through the inverse Transpose,
            # which merges with the one the model already applies to it
            if not dry:
                tt = gs.Variable(f"{t.name}_t{next(counter)}", dtype=t.dtype)
                graph.nodes.append(gs.Node("Transpose", name=f"{tt.name}_transpose",
                                           attrs={"perm": _inverse(perm)}, inputs=[t], outputs=[tt]))
                new_inputs[k] = tt
            continue
        if c is None or node.op in ("Pad", "Concat"):
            return False
        c2 = _permute_const(np.asarray(c), perm)
        if c2 is None:
            return False
        if dry:
            continue
        new_inputs[k] = gs.Constant(f"{node.name}_in{k}_nchw{next(counter)}", c2.astype(c.dtype))
    attrs = dict(node.attrs)
    if node.op == "Pad":
        pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or (len(node.inputs) > 3 and node.inputs[3].name):  # axes input: leave it
            return False
        pads = [int(v) for v in np.asarray(pads).reshape(-1)]
        if len(pads) != 2 * r:
            return False
        if dry:
            return True
        begin, end = [0] * r, [0] * r
        for i in range(r):  # Y dim i is X dim perm[i]
            begin[perm[i]], end[perm[i]] = pads[i], pads[r + i]
        new_inputs[1] = gs.Constant(f"{node.name}_pads_nchw{next(counter)}", np.array(begin + end, np.int64))
    elif node.op == "Concat":
        axis = int(node.attrs["axis"]) % r
        attrs["axis"] = perm[axis]
    elif node.op not in _ELEMENTWISE:
        return False
    if dry:
        return True
    y = node.outputs[0]
    inner = gs.Variable(f"{y.name}_nchw{next(counter)}", dtype=y.dtype)
    graph.nodes.append(gs.Node(node.op, name=node.name, domain=node.domain, attrs=attrs, inputs=new_inputs,
                               outputs=[inner]))
    graph.nodes.append(gs.Node("Transpose", name=f"{node.name}_transpose{next(counter)}", attrs={"perm": list(perm)},
                               inputs=[inner], outputs=[y]))
    node.inputs, node.outputs = [], []
    return True


def _compose(graph, t2: gs.Node):
    """Transpose(Transpose(x, p), q) -> Transpose(x, p[q]) or x itself; True when changed."""
    src = _transpose_of(t2.inputs[0])
    q = _perm(t2)
    if src is None or q is None or len(src[1]) != len(q):
        return False
    x, p = src
    comp = [p[i] for i in q]
    y = t2.outputs[0]
    if comp == list(range(len(comp))):
        if y in graph.outputs:  # keep the graph output's name: an Identity
            graph.nodes.append(gs.Node("Identity", name=t2.name, inputs=[x], outputs=[y]))
        else:
            for c in list(y.outputs):
                c.inputs = [x if i is y else i for i in c.inputs]
    else:
        graph.nodes.append(gs.Node("Transpose", name=t2.name, attrs={"perm": comp}, inputs=[x], outputs=[y]))
    t2.inputs, t2.outputs = [], []
    return True


def _merge_duplicates(graph) -> bool:
    """One Transpose per (input, perm): the others' readers read it instead."""
    seen, changed = {}, False
    for t in [n for n in graph.nodes if n.op == "Transpose" and n.inputs and n.outputs]:
        key = (id(t.inputs[0]), tuple(_perm(t) or ()))
        first = seen.setdefault(key, t)
        if first is t or t.outputs[0] in graph.outputs:
            continue
        y, keep = t.outputs[0], first.outputs[0]
        for c in list(y.outputs):
            c.inputs = [keep if i is y else i for i in c.inputs]
        t.inputs, t.outputs = [], []
        changed = True
    return changed


def _reaches_inverse(y: gs.Tensor, perm, outputs, depth=64) -> bool:
    """Is pushing a Transpose(PERM) of Y down worth it: does a Transpose that composes with PERM
    to the identity lie downstream of Y, through layout-agnostic ops only, or does the way there
    meet an op whose other input is a Transpose(PERM) too (the two become one)?"""
    inv = _inverse(perm)
    r = len(perm)
    frontier, seen = [y], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for c in t.outputs:
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op == "Transpose":
                    if _perm(c) == inv:
                        return True
                    continue
                if any(i is not t and (_transpose_of(i, r) or (None, None))[1] == perm for i in c.inputs):
                    return True
                if (c.op in _ELEMENTWISE or c.op in ("Pad", "Concat")) and len(c.outputs) == 1:
                    nxt.append(c.outputs[0])
        frontier = nxt
        if not frontier:
            break
    return False


@register_pass("cancel-transposes", "move Transposes down through layout-agnostic ops (elementwise, Pad, Concat) "
                                    "and cancel inverse pairs (NHWC graphs from tf2onnx)")
def cancel_transposes(model, report):
    if not any(n.op_type == "Transpose" for n in model.graph.node):
        return model
    graph = to_gs(model)
    counter = iter(range(1 << 30))
    before = sum(1 for n in graph.nodes if n.op == "Transpose")
    for _ in range(10 * max(1, before)):
        changed = False
        for t in [n for n in graph.nodes if n.op == "Transpose" and n.outputs]:
            if not t.outputs or not t.inputs:
                continue
            y = t.outputs[0]
            if _compose(graph, t):
                changed = True
                continue
            perm = _perm(t)
            if perm is None or y in graph.outputs or not y.outputs:
                continue
            # push into every consumer or none (a half-pushed Transpose would stay and multiply),
            # and only where an inverse Transpose lies ahead to cancel with
            cons = [c for c in y.outputs if c.op != "Transpose"]
            if not cons or not all(_push_through(graph, c, perm, counter, dry=True) for c in cons):
                continue
            if not _reaches_inverse(y, perm, graph.outputs):
                continue
            for c in cons:
                changed |= _push_through(graph, c, perm, counter)
        changed |= _merge_duplicates(graph)
        graph.cleanup()
        if not changed:
            break
    after = sum(1 for n in graph.nodes if n.op == "Transpose")
    if after != before:
        report.notes.append(f"cancel-transposes: {before} Transposes -> {after}")
    return from_gs(graph, model)
