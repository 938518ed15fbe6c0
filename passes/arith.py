"""``cancel-terms``: algebraic canonicalisation of elementwise float sums.

Training code binarizes with a straight-through identity: the forward value is ``sign(x)``, the
backward pass sees a smooth proxy ``p(x)``::

    out = sign(x).detach() - p(x).detach() + p(x)     # ReActNet, Bi-Real Net, ReCU, FDA, ...
    out = x + stop_gradient(-x + q(x))                 # QKeras

Exporters keep the arithmetic (``detach`` and ``stop_gradient`` are identities): ``Add(Sub(S,
P), P)``, ``Add(x, Add(Neg(x), S))``. This pass reads every Add/Sub/Neg tree (also through
``Identity``, ``Sum``, a float-to-same-float ``Cast`` and ``Mul`` by a scalar +/-1) as a signed
sum of leaf tensors, cancels a term and its negation when they are *the same tensor* (never two
tensors that merely hold equal values) and rewrites the root to what remains: ``S`` and ``q(x)``
above. Exact in real arithmetic; the source framework's float evaluation of the uncancelled sum
differs from it by round-off (``(s - p) + p`` is ``s`` to within one ulp of the largest term).

A cancellation is made only where the remaining terms alone have the root's shape (broadcasting
could otherwise change it) and dtype; shapes come from ONNX shape inference.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .core import register_pass
from .graph import const_value, from_gs, to_gs
from .shapes import _static_shapes

_FLOATS = (np.float16, np.float32, np.float64)
_TENSORS: dict = {}  # id -> tensor of the terms being expanded (gs tensors are not hashable)


def _same_float_cast(n) -> bool:
    if n.op != "Cast" or not n.inputs or not n.outputs:
        return False
    a, b = getattr(n.inputs[0], "dtype", None), getattr(n.outputs[0], "dtype", None)
    try:
        return a is not None and b is not None and np.dtype(a) == np.dtype(b) and np.dtype(a).type in _FLOATS
    except TypeError:
        return False


def _terms(t, sign, acc: Counter, depth=0):
    """Add SIGN * T, expanded through Add/Sub/Neg/..., into ACC (tensor -> integer coefficient)."""
    n = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    if n is not None and depth < 64:
        if n.op in ("Add", "Sub") and len(n.inputs) == 2:
            _terms(n.inputs[0], sign, acc, depth + 1)
            _terms(n.inputs[1], sign if n.op == "Add" else -sign, acc, depth + 1)
            return
        if n.op == "Sum" and n.inputs:
            for i in n.inputs:
                _terms(i, sign, acc, depth + 1)
            return
        if n.op == "Neg" and len(n.inputs) == 1:
            _terms(n.inputs[0], -sign, acc, depth + 1)
            return
        if (n.op == "Identity" and len(n.inputs) == 1) or _same_float_cast(n):
            _terms(n.inputs[0], sign, acc, depth + 1)
            return
        if n.op == "Mul" and len(n.inputs) == 2:
            for a, b in ((0, 1), (1, 0)):
                c = const_value(n.inputs[b])
                if c is not None and c.size == 1 and float(c.reshape(-1)[0]) in (1.0, -1.0):
                    _terms(n.inputs[a], sign * int(c.reshape(-1)[0]), acc, depth + 1)
                    return
    acc[id(t)] += sign
    _TENSORS[id(t)] = t


def _broadcast(shapes):
    try:
        return list(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        return None


def _shape(t, shapes):
    if isinstance(t, gs.Constant):
        return list(t.values.shape)
    return shapes.get(t.name)


_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
           "Dropout", "If", "Loop", "Scan"}


def _key_of_tensor(t):
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        return ("c", str(v.dtype), v.shape, v.tobytes()) if v.size <= 4096 else ("t", id(t))
    return ("t", id(t))


def _key_of_attr(v):
    if isinstance(v, gs.Constant):
        a = np.asarray(v.values)
        return ("c", str(a.dtype), a.shape, a.tobytes())
    if isinstance(v, np.ndarray):
        return ("a", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_key_of_attr(x) for x in v)
    if isinstance(v, (int, float, str, bytes, bool)) or v is None:
        return v
    return ("o", id(v))


def merge_common(graph, outputs) -> int:
    """Common subexpressions: nodes of the same op, attributes and inputs (constants compared by
    value) compute the same tensors, so every reader of a later one reads the first. Exporters
    write ``clamp(x)`` twice for ``clamp(x).detach() - ... + clamp(x)``; merged, the two terms
    are one tensor and cancel. Random and control-flow ops are left alone."""
    graph.toposort()
    seen, merged = {}, 0
    for n in list(graph.nodes):
        if n.op in _RANDOM or not n.outputs or any(o.name in outputs for o in n.outputs):
            continue
        try:
            key = (n.op, n.domain, tuple(sorted((k, _key_of_attr(v)) for k, v in n.attrs.items())),
                   tuple(_key_of_tensor(t) for t in n.inputs), len(n.outputs))
            hash(key)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = n
            continue
        for old, new in zip(n.outputs, first.outputs):
            for c in list(old.outputs):
                for i, t in enumerate(c.inputs):
                    if t is old:
                        c.inputs[i] = new
        n.outputs = []
        merged += 1
    if merged:
        graph.cleanup()
    return merged


@register_pass("cancel-terms", "straight-through identities: Add/Sub/Neg trees read as signed sums, a tensor and its "
                               "negation cancel (sign(x) - p + p -> sign(x))")
def cancel_terms(model, report):
    graph = to_gs(model)
    shapes = _static_shapes(model)
    outputs = {t.name for t in graph.outputs}
    if merge_common(graph, outputs):
        report.notes.append("common subexpressions merged (identical ops on identical inputs)")
    count = 0
    for n in list(graph.nodes):
        if n.op not in ("Add", "Sub", "Sum") or len(n.outputs) != 1 or not n.inputs:
            continue
        root = n.outputs[0]
        acc = Counter()
        _TENSORS.clear()
        _terms(root, 1, acc)
        if len(acc) < 2 or not any(c == 0 for c in acc.values()):
            continue  # nothing cancels
        left = [(_TENSORS[k], c) for k, c in acc.items() if c != 0]
        if len(left) != 1 or left[0][1] not in (1, -1):
            continue  # only a full cancellation down to one term is rewritten (the STE forms)
        keep, coef = left[0]
        want, have = _shape(root, shapes), _shape(keep, shapes)
        gone = [_shape(_TENSORS[k], shapes) for k, c in acc.items() if c == 0]
        if have is None or any(g is None for g in gone) or _broadcast([have] + gone) != list(have) \
                or (want is not None and list(want) != list(have)):
            continue  # the cancelled terms may broadcast the result (or shapes are unknown): keep it
        dt_root, dt_keep = getattr(root, "dtype", None), getattr(keep, "dtype", None)
        if dt_root is not None and dt_keep is not None and np.dtype(dt_root) != np.dtype(dt_keep):
            continue
        n.outputs = []  # the sum's node is bypassed; its operands are cleaned up if nothing else reads them
        if coef == 1 and root.name not in outputs:
            for c in list(root.outputs):
                for i, t in enumerate(c.inputs):
                    if t is root:
                        c.inputs[i] = keep
        else:
            graph.nodes.append(gs.Node("Identity" if coef == 1 else "Neg", name=n.name + "_cancelled", inputs=[keep],
                                       outputs=[root]))
        count += 1
        report.notes.append(f"{n.name}: straight-through identity cancelled ({keep.name} - ... + ... -> "
                            f"{'' if coef == 1 else '-'}{keep.name})")
    return from_gs(graph, model)
