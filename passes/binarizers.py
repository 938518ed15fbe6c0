"""The one table of binarizer forms.

A binarizer maps a float tensor ``x`` to ``scale * (x >= t ? +1 : -1)``: threshold ``t`` and a
non-zero ``scale`` (1 for a plain sign; XNOR-Net's and QONNX's scaled signs carry another; a
negative scale is a decreasing binarizer, ``x >= t ? -1 : +1`` times ``|scale|``). Every
exporter spells this differently; each spelling is one :class:`Form` in :data:`FORMS`, with

* ``match(t)``: is tensor ``t`` made by this form? -> a :class:`Binarized` (input tensor,
  threshold, scale, the nodes that make it);
* ``reader_threshold(node, index, consts)``: on an ONNX ``NodeProto``, the threshold at which
  ``node`` binarizes its input number ``index`` when ``node`` is the first node of this form
  (what ``--verify`` and the link planner ask of the readers of a tensor);
* ``emit``: every form is re-emitted in one canonical spelling by :func:`emit` (``Sign`` stays
  ``Sign``, the others ``Where(x >= t, s, -s)``), which the rewrites use to put a binarizer
  back after moving data.

Passes use :func:`match` (the table in order, then the scaled wrapper) and never look at node
types of binarizers themselves, so a new spelling is one entry here.

Thresholds are exact in float32: ``x > t`` is ``x >= nextafter(t, +inf)``. ONNX ``Sign`` gives 0
at exactly 0; a packed-bit kernel has no 0, so ``Sign`` is read as ``x >= 0`` (``sgn(0) = +1``,
the convention of every BNN runtime); its :class:`Binarized` says so (``zero_is_zero``) and the
compile report notes it. Larq's ``ste_sign`` (``Sign(Add(Sign(x), 0.1))``) is exactly
``x >= 0``, without that caveat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import scalar_value

QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")


def above(t: float) -> float:
    """The float32 threshold of ``x > t``: the next float32 after T."""
    return float(np.nextafter(np.float32(t), np.float32(np.inf)))


@dataclass
class Binarized:
    """``out = scale * (src >= threshold ? +1 : -1)``, made by NODES (the last one makes ``out``)."""

    src: gs.Tensor
    threshold: float
    form: "Form"
    nodes: list = field(default_factory=list)
    scale: float = 1.0
    out: gs.Tensor | None = None

    @property
    def kind(self) -> str:
        return self.form.name

    @property
    def zero_is_zero(self) -> bool:
        """True where the source op gives 0 at ``src == threshold`` (ONNX ``Sign``); bdp reads +1."""
        return self.form.zero_is_zero

    @property
    def increasing(self) -> bool:
        return self.scale > 0


@dataclass(frozen=True)
class Form:
    name: str
    doc: str
    match: "Callable[[gs.Tensor], Binarized | None] | None"
    reader_threshold: Callable | None = None  # (NodeProto, input index, scalar consts) -> t or None
    zero_is_zero: bool = False


# --------------------------------------------------------------------------------------- forms

def _only_producer(t, op):
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or t.inputs[0].op != op:
        return None
    return t.inputs[0]


def _match_sign(t):
    n = _only_producer(t, "Sign")
    if n is None or not n.inputs:
        return None
    # Larq's ste_sign: Sign(Add(Sign(x), c)), 0 < |c| < 1, is x >= 0 (c > 0) or x > 0 (c < 0)
    add = _only_producer(n.inputs[0], "Add")
    if add is not None and len(add.inputs) == 2:
        for a, b in ((0, 1), (1, 0)):
            inner = _only_producer(add.inputs[a], "Sign")
            c = scalar_value(add.inputs[b])
            if inner is not None and c is not None and 0.0 < abs(c) < 1.0 and len(add.inputs[a].outputs) == 1 \
                    and len(n.inputs[0].outputs) == 1:
                return Binarized(inner.inputs[0], 0.0 if c > 0 else above(0.0), LARQ_STE_SIGN, [inner, add, n], 1.0, t)
    return Binarized(n.inputs[0], 0.0, SIGN, [n], 1.0, t)


_COND = {  # op -> (x on the left: True when x >= t' with t' from t, x on the right: same)
    "GreaterOrEqual": (lambda t: (True, t), lambda t: (False, above(t))),  # x >= t | t >= x: x < next(t)
    "Greater": (lambda t: (True, above(t)), lambda t: (False, t)),  # x > t | t > x: x < t
    "Less": (lambda t: (False, t), lambda t: (True, above(t))),  # x < t | t < x: x >= next(t)
    "LessOrEqual": (lambda t: (False, above(t)), lambda t: (True, t)),  # x <= t | t <= x: x >= t
}


def _condition(cond: gs.Tensor):
    """(x, t, sense) for a comparison of x with a scalar constant: sense True means the
    condition holds exactly where ``x >= t``, False exactly where ``x < t``."""
    c = cond.inputs[0] if len(cond.inputs) == 1 else None
    if c is None or c.op not in _COND or len(c.inputs) != 2:
        return None
    left, right = c.inputs
    tr, tl = scalar_value(right), scalar_value(left)
    if tr is not None and tl is None:
        sense, t = _COND[c.op][0](tr)
        return left, t, sense, c
    if tl is not None and tr is None:
        sense, t = _COND[c.op][1](tl)
        return right, t, sense, c
    return None


def _match_where(t):
    n = _only_producer(t, "Where")
    if n is None or len(n.inputs) != 3:
        return None
    cond, a, b = n.inputs
    av, bv = scalar_value(a), scalar_value(b)
    if av is None or bv is None or av == 0.0 or av != -bv:
        return None
    got = _condition(cond)
    if got is None:
        return None
    x, thr, sense, cmp = got
    # where x >= thr the output is av if the condition is "x >= thr", else bv
    return Binarized(x, thr, WHERE, [cmp, n], av if sense else bv, t)


def _match_bipolar_quant(t):
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    if n.op != "BipolarQuant" or n.domain not in QONNX_DOMAINS + ("",) or len(n.inputs) != 2:
        return None
    s = scalar_value(n.inputs[1])
    if s is None or s == 0.0:
        return None
    return Binarized(n.inputs[0], 0.0, BIPOLAR_QUANT, [n], s, t)


def _reader_sign(node, index, consts):
    return 0.0 if node.op_type == "Sign" and node.domain in ("", "ai.onnx") and index == 0 else None


def _reader_cond(node, index, consts):
    if node.op_type not in _COND or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    other = node.input[1 - index]
    if other not in consts:
        return None
    sense, t = _COND[node.op_type][index](consts[other])
    return t


def _reader_bipolar(node, index, consts):
    if node.op_type == "BipolarQuant" and node.domain in QONNX_DOMAINS and index == 0:
        return 0.0
    return None


SIGN = Form("Sign", "ONNX Sign(x) (torch.sign, tf.sign): read as x >= 0 (sgn(0) = +1)", _match_sign,
            _reader_sign, zero_is_zero=True)
LARQ_STE_SIGN = Form("ste_sign", "Larq's exported ste_sign: Sign(Add(Sign(x), c)), 0 < |c| < 1", _match_sign,
                     _reader_sign)
WHERE = Form("Where", "Where(x >= t, s, -s) and every comparison spelling (>=, >, <, <=, either operand order, "
                      "branches either way round)", _match_where, _reader_cond)
BIPOLAR_QUANT = Form("BipolarQuant", "QONNX BipolarQuant(x, s) = s * (x >= 0 ? 1 : -1)", _match_bipolar_quant,
                     _reader_bipolar)

STRAIGHT_THROUGH = Form("straight-through", "training code's identities: sign(x) - p(x) + p(x) (ReActNet, Bi-Real, IR-Net, "
                                          "FDA), x + stop_gradient(-x + q(x)) (QKeras), a tensor and its negation "
                                          "cancelled by the cancel-terms pass, then any form here", None)
TWO_VALUED = Form("two-valued", "any elementwise expression of comparisons, Sign, Where, Abs, Clip, Round, casts and "
                                "constants that takes two values {lo, hi} split at one threshold (QKeras "
                                "sign(x) + (1 - |sign(x)|), {0, 1} activations, AdaBin b * sign(x - c) + c): the "
                                "value-set analysis (passes/values.py) and the two-valued pass", None)

# Every spelling, in the order match() tries them. A form with ``match=None`` is found by another
# form's matcher (ste_sign by Sign's) or by a pass of its own (named in its doc).
FORMS: tuple[Form, ...] = (SIGN, LARQ_STE_SIGN, WHERE, BIPOLAR_QUANT, STRAIGHT_THROUGH, TWO_VALUED)


def _match_plain(t) -> Binarized | None:
    seen = set()
    for f in FORMS:
        if f.match is None or f.match in seen:
            continue
        seen.add(f.match)
        b = f.match(t)
        if b is not None:
            return b
    return None


def match(t: gs.Tensor, scaled=True) -> Binarized | None:
    """The binarizer that makes tensor T, or None. With SCALED, a binarizer times a scalar
    constant (``Mul(b, s)``, ``Mul(s, b)``, ``Div(b, s)``, nested) is one too, with the product of
    the scales."""
    if not isinstance(t, gs.Variable):
        return None
    b = _match_plain(t)
    if b is not None or not scaled:
        return b
    n = t.inputs[0] if len(t.inputs) == 1 else None
    if n is None or n.op not in ("Mul", "Div") or len(n.inputs) != 2:
        return None
    pairs = ((0, 1), (1, 0)) if n.op == "Mul" else ((0, 1),)
    for a, k in pairs:
        s = scalar_value(n.inputs[k])
        if s is None or s == 0.0 or not isinstance(n.inputs[a], gs.Variable) or len(n.inputs[a].outputs) != 1:
            continue
        inner = match(n.inputs[a], scaled=True)
        if inner is not None:
            factor = s if n.op == "Mul" else 1.0 / s
            return Binarized(inner.src, inner.threshold, inner.form, inner.nodes + [n], inner.scale * factor, t)
    return None


def reader_threshold(node, index: int, consts: dict):
    """The threshold at which ONNX NODE binarizes its input number INDEX (as the first node of a
    binarizer form), or None. CONSTS: scalar constants of the model by name."""
    seen = set()
    for f in FORMS:
        if f.reader_threshold is not None and f.reader_threshold not in seen:
            seen.add(f.reader_threshold)
            t = f.reader_threshold(node, index, consts)
            if t is not None:
                return t
    return None


def emit(graph: gs.Graph, src: gs.Tensor, b: Binarized, name: str, out: gs.Variable | None = None) -> gs.Variable:
    """A fresh binarizer computing the same function as B, applied to SRC, written to OUT (a new
    tensor when None); returns its output."""
    out = gs.Variable(name, dtype=np.float32) if out is None else out
    if b.form.zero_is_zero and b.scale == 1.0:  # keep ONNX Sign's own semantics
        graph.nodes.append(gs.Node("Sign", name=name + "_sign", inputs=[src], outputs=[out]))
        return out
    ge = gs.Variable(name + "_ge", dtype=bool)
    graph.nodes.append(gs.Node("GreaterOrEqual", name=name + "_cmp",
                               inputs=[src, gs.Constant(name + "_t", np.array(b.threshold, np.float32))],
                               outputs=[ge]))
    s = np.float32(b.scale)
    graph.nodes.append(gs.Node("Where", name=name + "_where",
                               inputs=[ge, gs.Constant(name + "_p1", np.array(s, np.float32)),
                                       gs.Constant(name + "_m1", np.array(-s, np.float32))], outputs=[out]))
    return out


def consumers_binarizing(t: gs.Tensor, depth=3) -> list[Binarized]:
    """The binarizers (found by :func:`match`, unscaled) that read tensor T as their input,
    searching up to DEPTH nodes downstream of T."""
    found, seen, frontier = [], set(), [t]
    for _ in range(depth):
        nxt = []
        for u in frontier:
            for n in u.outputs:
                for o in n.outputs:
                    if id(o) in seen:
                        continue
                    seen.add(id(o))
                    b = _match_plain(o)
                    if b is not None and b.src is t:
                        found.append(b)
                    else:
                        nxt.append(o)
        frontier = nxt
    return found


def describe() -> list[tuple[str, str]]:
    """(name, what) of every form, for ``bdp passes`` and the README."""
    return [(f.name, f.doc) for f in FORMS] + [
        ("scaled", "any of these times a scalar constant: Mul(b, s), Mul(s, b), Div(b, s) (XNOR-Net, QONNX, "
                   "Brevitas)")]
