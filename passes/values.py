"""Value-set analysis: which tensors take finitely many values, and where each value is taken.

A tensor ``T`` is a *step function* of one float tensor ``x`` (its source) when, elementwise,
``T = values[j]`` where ``j`` is the number of thresholds ``t_i`` with ``x >= t_i`` (thresholds
ascending float32; each value a constant broadcastable to ``T``: a scalar, or one per channel).
``Sign(x)`` is ``x -> {-1, 0, +1}`` with thresholds ``(0, next(0))``; ``x > c`` is ``{False,
True}`` at ``next(c)``. Elementwise ops of a step function and constants, or of two step
functions of the same source, are step functions again: their values are the op applied to the
values, region by region (thresholds merged). So every way of spelling a binarizer from
comparisons, signs, ``Where``, ``Abs``, ``Clip``, ``Round``, casts and affine maps reduces to
one canonical form, whatever the exporter wrote:

* QKeras: ``Sign(x) + (1 - Abs(Sign(x)))`` is ``{-1, +1}`` at ``x >= 0`` (+1 at zero);
* AdaBin: ``b * Sign(x - c) + c`` is ``{c - b, c, c + b}`` with the middle value only at
  ``x == c`` (read as the upper one, ``sgn(0) = +1``, as every BNN runtime does);
* ``Where(x >= t, 1, 0)``, ``Cast(x > t)``, ``Relu(Sign(x))``: ``{0, 1}``.

A layer whose input takes two values ``{lo, hi}`` is a binary layer: ``lo + (hi - lo) * bit``
is ``mid + half * s`` with ``s = +/-1``, so the layer is a popcount plus a constant
(:mod:`bdp.passes.two_valued` makes the rewrite).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .binarizers import _condition, above
from .graph import const_value

MAX_THRESHOLDS = 8
MOVES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")  # value-preserving data movement


@dataclass
class Step:
    """``T = values[#{i: src >= thresholds[i]}]`` elementwise."""

    src: gs.Tensor
    thresholds: tuple
    values: tuple  # len(thresholds) + 1 numpy arrays
    nodes: list = field(default_factory=list)
    # data movement (Transpose, Reshape, ...) between SRC and the tensor: T = moves(step(src));
    # only with scalar values (a per-channel value would move with the data)
    moves: tuple = ()

    def simplified(self) -> "Step":
        """Adjacent regions with equal values merged (their threshold dropped)."""
        ts, vs = [], [self.values[0]]
        for t, v in zip(self.thresholds, self.values[1:]):
            if _equal(v, vs[-1]):
                continue
            ts.append(t)
            vs.append(v)
        return Step(self.src, tuple(ts), tuple(vs), self.nodes, self.moves)


def _equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        return False
    return a.dtype == b.dtype and bool(np.array_equal(a, b))


_UNARY = {
    "Identity": lambda v, n: v,
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "Relu": lambda v, n: np.maximum(v, 0).astype(v.dtype),
    "Sign": lambda v, n: np.sign(v),
    "Round": lambda v, n: np.round(v),  # half to even, as ONNX Round
    "Floor": lambda v, n: np.floor(v),
    "Ceil": lambda v, n: np.ceil(v),
    "Not": lambda v, n: np.logical_not(v),
    "Tanh": lambda v, n: np.tanh(v),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Reciprocal": lambda v, n: 1.0 / v,
}
_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
    "Equal": np.equal, "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
    "LessOrEqual": np.less_equal,
}
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                10: np.float16, 11: np.float64}


def _as_values(v):
    """Constants as the analysis holds them: floats in float32 (what the graph computes in), bools."""
    v = np.asarray(v)
    if v.dtype == np.bool_:
        return v
    if v.dtype.kind in "iu":
        return v.astype(np.int64)
    return v.astype(np.float32)


class Analysis:
    """Step functions of the tensors of one graph (memoized)."""

    def __init__(self, source_ok=None):
        self.memo: dict[int, Step | None] = {}
        # which tensors may be a source (the rewrites compare them with a float32 threshold)
        self.source_ok = source_ok or (lambda t: True)

    def step(self, t) -> Step | None:
        key = id(t)
        if key not in self.memo:
            self.memo[key] = None  # a cycle (none in an ONNX graph) or a failure reads as "not finite"
            self.memo[key] = self._step(t)
        return self.memo[key]

    # ------------------------------------------------------------------------------------------
    def _step(self, t):
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
            return None
        n = t.inputs[0]
        op = n.op
        if (n.domain or "") not in ("", "ai.onnx"):
            return None
        if op == "Sign" and len(n.inputs) == 1:
            inner = self.step(n.inputs[0])
            if inner is not None:
                return _map(inner, np.sign, n)
            if not self.source_ok(n.inputs[0]):
                return None
            return Step(n.inputs[0], (0.0, above(0.0)), (np.float32(-1), np.float32(0), np.float32(1)), [n])
        if op in ("Greater", "GreaterOrEqual", "Less", "LessOrEqual") and len(n.inputs) == 2:
            if not any(self.step(i) is not None for i in n.inputs):
                got = _condition(t)
                if got is None:
                    return None
                x, thr, sense, _cmp = got
                if not self.source_ok(x):
                    return None
                return Step(x, (thr,), (np.bool_(not sense), np.bool_(sense)), [n])
        if op in MOVES and n.inputs:
            inner = self.step(n.inputs[0])
            if inner is None or any(np.asarray(v).size != 1 for v in inner.values):
                return None
            return Step(inner.src, inner.thresholds, inner.values, inner.nodes + [n], inner.moves + (n,))
        if op in _UNARY and len(n.inputs) == 1:
            inner = self.step(n.inputs[0])
            return None if inner is None else _map(inner, lambda v, n=n: _UNARY[op](v, n), n)
        if op == "Cast" and len(n.inputs) == 1:
            inner = self.step(n.inputs[0])
            to = _ONNX_DTYPES.get(int(n.attrs.get("to", 0)))
            if inner is None or to is None:
                return None
            return _map(inner, lambda v: _as_values(np.asarray(v).astype(to)), n)
        if op == "Clip" and n.inputs:
            inner = self.step(n.inputs[0])
            bounds = [const_value(i) if i.name else None for i in n.inputs[1:3]]
            if inner is None or any(b is None and i.name for b, i in zip(bounds, n.inputs[1:3])):
                return None
            lo = bounds[0] if len(bounds) > 0 and bounds[0] is not None else -np.inf
            hi = bounds[1] if len(bounds) > 1 and bounds[1] is not None else np.inf
            return _map(inner, lambda v: np.clip(v, lo, hi).astype(v.dtype), n)
        if op in _BINARY and len(n.inputs) == 2:
            return self._binary(n, _BINARY[op])
        if op in ("Sum", "Max", "Min") and len(n.inputs) > 2:
            return None
        if op == "Where" and len(n.inputs) == 3:
            parts = [self._operand(i) for i in n.inputs]
            if any(p is None for p in parts) or not any(isinstance(p, Step) for p in parts):
                return None
            return _combine(parts, lambda c, a, b: np.where(c, a, b), n)
        return None

    def _operand(self, t):
        """A Step, or a constant's values, or None."""
        s = self.step(t)
        if s is not None:
            return s
        c = const_value(t)
        return None if c is None else _as_values(c)

    def _binary(self, n, fn):
        a, b = self._operand(n.inputs[0]), self._operand(n.inputs[1])
        if a is None or b is None or not (isinstance(a, Step) or isinstance(b, Step)):
            return None
        return _combine([a, b], fn, n)


def _map(s: Step, fn, node) -> Step | None:
    with np.errstate(all="ignore"):
        vals = tuple(_as_values(fn(np.asarray(v))) for v in s.values)
    return Step(s.src, s.thresholds, vals, s.nodes + [node], s.moves).simplified()


def _combine(parts, fn, node) -> Step | None:
    steps = [p for p in parts if isinstance(p, Step)]
    src = steps[0].src
    if any(s.src is not src for s in steps):
        return None  # step functions of different tensors: not one source
    moves = steps[0].moves
    if any(tuple(map(id, s.moves)) != tuple(map(id, moves)) for s in steps):
        return None  # the same source moved differently
    if moves and any(not isinstance(p, Step) and np.asarray(p).size != 1 for p in parts):
        return None  # a non-scalar constant against moved data
    ts = sorted(set().union(*[s.thresholds for s in steps]))
    if len(ts) > MAX_THRESHOLDS:
        return None
    lows = [-np.inf] + ts
    vals = []
    with np.errstate(all="ignore"):
        for lo in lows:
            args = []
            for p in parts:
                if isinstance(p, Step):
                    j = sum(1 for t in p.thresholds if t <= lo)
                    args.append(np.asarray(p.values[j]))
                else:
                    args.append(p)
            try:
                vals.append(_as_values(fn(*args)))
            except (ValueError, TypeError):
                return None
    nodes = [m for s in steps for m in s.nodes] + [node]
    out = Step(src, tuple(ts), tuple(vals), nodes, moves).simplified()
    if moves and any(np.asarray(v).size != 1 for v in out.values):
        return None
    return out


@dataclass
class TwoValued:
    """``T = hi where src >= threshold, else lo`` (LO, HI: constants broadcastable to T).
    POINT: the source's op gives a third value exactly at ``src == threshold`` (ONNX ``Sign``'s
    0), read as HI (``sgn(0) = +1``)."""

    src: gs.Tensor
    threshold: float
    lo: np.ndarray
    hi: np.ndarray
    point: bool
    nodes: list
    moves: list = field(default_factory=list)  # data movement between the tensor and its reader


def two_valued(s: Step | None) -> TwoValued | None:
    """S as a two-valued function, or None (not finite, one value, or three and more)."""
    if s is None:
        return None
    s = s.simplified()
    if len(s.thresholds) == 1:
        return TwoValued(s.src, s.thresholds[0], np.asarray(s.values[0]), np.asarray(s.values[1]), False, s.nodes,
                         list(s.moves))
    if len(s.thresholds) == 2 and s.thresholds[1] == above(s.thresholds[0]) and not _equal(s.values[0], s.values[2]):
        return TwoValued(s.src, s.thresholds[0], np.asarray(s.values[0]), np.asarray(s.values[2]), True, s.nodes,
                         list(s.moves))
    return None


def describe_values(s: Step, limit=4) -> str:
    vals = []
    for v in s.values[:limit]:
        v = np.asarray(v)
        vals.append(f"{v.reshape(-1)[0]:g}" if v.size == 1 or np.all(v == v.reshape(-1)[0]) else "per channel")
    more = ", ..." if len(s.values) > limit else ""
    return "{" + ", ".join(vals) + more + "}"
