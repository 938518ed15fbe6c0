"""Fold the next layer's binarizer into a binary conv: integer thresholds, packed-bit links.

After ``fuse-binary-conv`` and ``fold-binary-glue`` a binary layer is
``Y = scale[m] * D + bias[m]`` (BatchNorm, per-channel scales and shifts folded in). When every
consumer of ``Y`` binarizes it again, the float ``Y`` is never needed: the binarizer moves into
the producer (``out_sign=1``, ``out_threshold=t``; see :mod:`bdp.passes.ops`), where it is an
integer comparison of ``D`` per channel, turned around for a negative multiplier. The compiler
then writes the layer's output as packed bits straight into the next binary conv's input
(:mod:`bdp.targets.kernels`): no float tensor between the two layers.

Two shapes are folded:

* ``A -> Y -> BinaryConv B_i (X input)`` for every consumer, all with the same
  ``act_threshold`` t: A gets ``out_sign=1, out_threshold=t`` and each ``B_i`` reads ±1 at
  threshold 0 (a packed link).
* ``A -> Y -> Where(Y >= t, 1, -1)`` (or ``Where(Y < t, -1, 1)``), Y used by nothing else:
  the binarizer node goes away and A writes ±1 (a binarized attention gate, for example). Plain
  ``Sign`` is not folded here: ONNX ``Sign`` gives 0 at exactly 0, the folded form gives +1.

Between ``Y`` and the binarizer there may be a chain of per-channel elementwise ops with
constant parameters (``Relu``, ``PRelu``, ``LeakyRelu``, ``Clip``, ``Add``/``Sub``/``Mul``/``Div`` by a
per-channel constant: a plain BNN's ``ReLU``, ReactNet's RPReLU shifts and the next RSign's
threshold), each intermediate used only by the next op. With ``out_sign=1`` the producer's
output is only a per-channel predicate on the integer ``D``, so the chain folds too: the pass
evaluates ``chain(scale*D + bias) >= t`` in float32 (the ops' own arithmetic) at every ``D`` in
``[-K, K]``, and when that is a one-sided threshold (``flip*D >= T``: the chain is monotone
over the values ``Y`` can take) it rewrites the producer to ``scale = flip``,
``bias = 0.5 - T``, ``out_threshold = 0``, which is exactly that predicate. A chain that is not
monotone there (a negative PReLU slope, say) stays float.

A ``Y`` that also feeds float consumers (a Bi-Real shortcut, a bypass, an attention product) stays
float: those consumers need the real value. The report says which link is packed and why each
other one is not.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .core import register_pass
from .graph import const_value, from_gs, to_gs
from .graph import per_channel as _per_channel
from .ops import BINARY_CONV, DOMAIN

# per-channel elementwise ops a chain between a binary conv and the next binarizer may hold
_CHAIN_OPS = ("Relu", "PRelu", "LeakyRelu", "Clip", "Add", "Sub", "Mul", "Div")


def _is_bc(n):
    return n.op == BINARY_CONV and n.domain == DOMAIN


def _is_bc_proto(n):
    return n.op_type == BINARY_CONV and n.domain == DOMAIN


def packed_links(model) -> dict:
    """The one rule for packed-bit links, on the ONNX proto: for every ``bdp.BinaryConv`` with
    ``out_sign=1``, the names of the binary convs reading its output as packed bits, or None when
    the output must stay ±1 floats.

    The output travels as bits when it is not a graph output, the producer's weight is a constant
    (its channel count sizes the bits), and every consumer is a BinaryConv reading it as X at a
    threshold in (-1, 1] (which reads ±1 unchanged). ``link_stats`` counts with it and the compiler
    (:func:`bdp.targets.lower.plan_links`) lowers with it, so the two cannot disagree."""
    from .ops import binary_conv_attrs

    is_bc = _is_bc_proto
    inits = {t.name for t in model.graph.initializer}
    outs = {o.name for o in model.graph.output}
    cons = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            cons.setdefault(name, []).append((n, i))
    plan = {}
    for n in model.graph.node:
        if not is_bc(n) or not binary_conv_attrs(n)["out_sign"]:
            continue
        y = n.output[0]
        users = cons.get(y, [])
        ok = bool(users) and y not in outs and n.input[1] in inits and all(
            is_bc(c) and i == 0 and -1.0 < binary_conv_attrs(c)["act_threshold"] <= 1.0 for c, i in users)
        plan[n.name] = [c.name for c, _ in users] if ok else None
    return plan


def _chain_step(node, x, m):
    """float32 function [M, n] -> [M, n] for one per-channel elementwise NODE whose data input is
    tensor X (M channels), or None when NODE is not such an op with constant parameters."""
    op = node.op
    if op == "Relu" and len(node.inputs) == 1:
        return lambda y: np.maximum(y, np.float32(0))
    if op == "LeakyRelu" and len(node.inputs) == 1:
        a = np.float32(node.attrs.get("alpha", 0.01))
        return lambda y: np.where(y < 0, (y * a).astype(np.float32), y)
    if op == "PRelu" and len(node.inputs) == 2 and node.inputs[0] is x:
        a = _per_channel(const_value(node.inputs[1]), m)
        return None if a is None else (lambda y: np.where(y < 0, (y * a[:, None]).astype(np.float32), y))
    if op == "Clip" and node.inputs and node.inputs[0] is x:
        lo = hi = None
        if len(node.inputs) > 1 and node.inputs[1].name:
            lo = const_value(node.inputs[1])
            if lo is None or np.asarray(lo).size != 1:
                return None
        if len(node.inputs) > 2 and node.inputs[2].name:
            hi = const_value(node.inputs[2])
            if hi is None or np.asarray(hi).size != 1:
                return None
        lo = np.float32(-np.inf if lo is None else np.asarray(lo).reshape(-1)[0])
        hi = np.float32(np.inf if hi is None else np.asarray(hi).reshape(-1)[0])
        return lambda y: np.minimum(np.maximum(y, lo), hi)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2 and x in node.inputs:
        first = node.inputs[0] is x
        c = _per_channel(const_value(node.inputs[1] if first else node.inputs[0]), m)
        if c is None:
            return None
        c = c[:, None]
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return (lambda y: f(y, c).astype(np.float32)) if first else (lambda y: f(c, y).astype(np.float32))
    return None


def _activation_chain(y, outs, m):
    """The chain of per-channel elementwise ops that starts at tensor Y: (nodes, end tensor,
    functions). Each intermediate tensor feeds only the next op and is not a graph output."""
    nodes, fns, t = [], [], y
    while t.name not in outs and len(t.outputs) == 1 and t.outputs[0].op in _CHAIN_OPS:
        n = t.outputs[0]
        f = _chain_step(n, t, m)
        if f is None or len(n.outputs) != 1:
            break
        nodes.append(n)
        fns.append(f)
        t = n.outputs[0]
    return nodes, t, fns


def _chain_threshold(a, fns, t):
    """(scale, bias) that make producer A's ``scale*D + bias >= 0`` the predicate
    ``chain(scale*D + bias) >= t`` at every integer D a kernel can produce, or None when that
    predicate is not one-sided in D. The float32 arithmetic of the chain is evaluated as is."""
    scale = const_value(a.inputs[2])
    bias = const_value(a.inputs[3])
    wbits = const_value(a.inputs[1])
    if scale is None or bias is None or wbits is None:
        return None
    scale = np.asarray(scale, np.float32).reshape(-1)
    bias = np.asarray(bias, np.float32).reshape(-1)
    k = 8 * int(np.asarray(wbits).shape[1])  # >= C/group*kH*kW: a superset of the reachable D
    d = np.arange(-k, k + 1, dtype=np.int64)
    with np.errstate(all="ignore"):
        y = (scale[:, None] * d.astype(np.float32)[None, :]).astype(np.float32) + bias[:, None]
        for f in fns:
            y = f(y.astype(np.float32))
        plus = np.asarray(y, np.float32) >= np.float32(t)
    flip = np.ones(scale.size, np.float32)
    thr = np.empty(scale.size, np.float32)
    for i in range(scale.size):
        p = plus[i]
        if np.all(p[1:] >= p[:-1]):  # +1 from some D on
            flip[i], hit = 1.0, d[p]
            thr[i] = hit.min() if hit.size else k + 1
        elif np.all(p[1:] <= p[:-1]):  # +1 up to some D: -D >= T
            flip[i], hit = -1.0, -d[p]
            thr[i] = hit.min() if hit.size else k + 1
        else:
            return None
    return flip, (np.float32(0.5) - thr).astype(np.float32)


def _sign_output(a, t, readers, report, what):
    """A writes ±1 at threshold T; its READERS (binary convs) read them at 0 (packed bits)."""
    a.attrs["out_sign"], a.attrs["out_threshold"] = 1, float(t)
    for c in readers:
        c.attrs["act_threshold"] = 0.0
    report.fuse("fold-sign-output", a.name, f"{what} folded into integer thresholds; writes packed bits "
                                            f"into {', '.join(c.name for c in readers)}")


@register_pass("fold-sign-output", "fold the next binarizer into a bdp.BinaryConv (integer thresholds; "
                                   "packed-bit output into the next binary conv)")
def fold_sign_output(model, report):
    graph = to_gs(model)
    outs = {t.name for t in graph.outputs}
    changed = False
    for a in [n for n in graph.nodes if _is_bc(n)]:
        if int(a.attrs.get("out_sign", 0)):
            continue
        y = a.outputs[0]
        if y.name in outs or not y.outputs:
            continue
        cons = list(y.outputs)
        sc = const_value(a.inputs[2])
        chain, z, fns = _activation_chain(y, outs, np.asarray(sc).size) if sc is not None else ([], y, [])
        if chain and z.name not in outs and z.outputs and all(_is_bc(c) and c.inputs[0] is z for c in z.outputs):
            thr = {float(c.attrs.get("act_threshold", 0.0)) for c in z.outputs}
            folded = _chain_threshold(a, fns, thr.pop()) if len(thr) == 1 else None
            if folded is not None:
                zc = list(z.outputs)
                a.inputs[2] = gs.Constant(a.name + "_sign_flip", folded[0])
                a.inputs[3] = gs.Constant(a.name + "_sign_bias", folded[1])
                a.outputs = [z]
                for n in chain:
                    n.inputs, n.outputs = [], []
                _sign_output(a, 0.0, zc, report, f"{' -> '.join(n.op for n in chain)} and the next binarizer")
                changed = True
                continue
            report.notes.append(f"{a.name}: {' -> '.join(n.op for n in chain)} before the next binarizer is "
                                f"not a one-sided threshold on the conv's integer sum; kept float")
        if all(_is_bc(c) and c.inputs[0] is y for c in cons):
            thr = {float(c.attrs.get("act_threshold", 0.0)) for c in cons}
            if len(thr) != 1:
                report.notes.append(f"{a.name}: output read by binary convs at different thresholds "
                                    f"{sorted(thr)}; kept float")
                continue
            t = thr.pop()
            _sign_output(a, t, cons, report, f"next binarizer (x >= {t:g})")
            changed = True
            continue
        b = _sole_binarizer(y, cons)
        if b is not None:
            t = b.threshold
            a.attrs["out_sign"], a.attrs["out_threshold"] = 1, float(t)
            a.outputs = [b.out]
            for n in b.nodes:
                n.inputs, n.outputs = [], []
            report.fuse("fold-sign-output", a.name,
                        f"binarizer {b.nodes[-1].name} ({b.kind}, t={t:g}) folded into integer thresholds")
            changed = True
            continue
        floats = sorted({c.op for c in cons if not _is_bc(c)})
        if any(_is_bc(c) for c in cons):
            report.notes.append(f"{a.name}: output also feeds float {'/'.join(floats)} (e.g. a shortcut), "
                                f"so it stays float; the next binary conv packs it")
    if changed:
        graph.cleanup()
    return from_gs(graph, model)


def _sole_binarizer(y, cons):
    """The binarizer that is everything reading Y (its nodes read nothing else of the graph and
    nothing else reads their intermediates), when it writes exactly +/-1 with +1 at and above its
    threshold (not ONNX ``Sign``: that gives 0 at 0, the folded form +1); else None."""
    found = [b for b in binarizers.consumers_binarizing(y) if b.scale == 1.0 and not b.zero_is_zero]
    if len(found) != 1:
        return None
    b = found[0]
    ids = {id(n) for n in b.nodes}
    if not all(id(c) in ids for c in cons):
        return None
    for n in b.nodes[:-1]:
        if any(id(c) not in ids for o in n.outputs for c in o.outputs):
            return None
    return b


def link_stats(model) -> dict:
    """Count the links between binary convs of a (passed) model: ``packed`` ones (bits from one
    kernel into the next, by :func:`packed_links`) and ``float`` ones (the producer's output is
    also needed as a float)."""
    plan = packed_links(model)
    cons = {}
    for n in model.graph.node:
        if n.input:
            cons.setdefault(n.input[0], []).append(n)
    packed = flt = 0
    for n in model.graph.node:
        if not _is_bc_proto(n):
            continue
        into_bc = [c for c in cons.get(n.output[0], []) if _is_bc_proto(c)]
        if not into_bc:
            continue
        if plan.get(n.name) is not None:
            packed += len(into_bc)
        else:
            flt += len(into_bc)
    return {"packed": packed, "float": flt}
