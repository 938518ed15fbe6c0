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

A ``Y`` that also feeds float consumers (a Bi-Real shortcut, a bypass, an attention product) stays
float: those consumers need the real value. The report says which link is packed and why each
other one is not.
"""

from __future__ import annotations

from .binary_conv import match_binarizer
from .canonicalize import from_gs, to_gs
from .core import register_pass
from .ops import BINARY_CONV, DOMAIN


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
        if all(_is_bc(c) and c.inputs[0] is y for c in cons):
            thr = {float(c.attrs.get("act_threshold", 0.0)) for c in cons}
            if len(thr) != 1:
                report.notes.append(f"{a.name}: output read by binary convs at different thresholds "
                                    f"{sorted(thr)}; kept float")
                continue
            t = thr.pop()
            a.attrs["out_sign"], a.attrs["out_threshold"] = 1, t
            for c in cons:
                c.attrs["act_threshold"] = 0.0
            report.fuse("fold-sign-output", a.name,
                        f"next binarizer (x >= {t:g}) folded into integer thresholds; writes packed bits "
                        f"into {', '.join(c.name for c in cons)}")
            changed = True
            continue
        if len(cons) == 1 and cons[0].op in ("GreaterOrEqual", "Less") and len(cons[0].outputs[0].outputs) == 1:
            cond = cons[0]
            b = cond.outputs[0].outputs[0]  # the Where
            z = b.outputs[0] if b.op == "Where" and b.outputs else None
            m = match_binarizer(z) if z is not None else None
            if m is not None and m[0] is y:
                t = m[1]
                a.attrs["out_sign"], a.attrs["out_threshold"] = 1, float(t)
                a.outputs = [z]
                b.outputs, b.inputs = [], []
                cond.inputs, cond.outputs = [], []
                report.fuse("fold-sign-output", a.name,
                            f"binarizer {b.name} ({m[3]}, t={t:g}) folded into integer thresholds")
                changed = True
                continue
        floats = sorted({c.op for c in cons if not _is_bc(c)})
        if any(_is_bc(c) for c in cons):
            report.notes.append(f"{a.name}: output also feeds float {'/'.join(floats)} (e.g. a shortcut), "
                                f"so it stays float; the next binary conv packs it")
    if changed:
        graph.cleanup()
    return from_gs(graph, model)


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
