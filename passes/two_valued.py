"""``two-valued``: layers whose input takes two values, and weights that take two per channel.

* **Input.** A Conv, MatMul or Gemm whose input ``T`` takes two values (``lo`` where ``src <
  t``, ``hi`` where ``src >= t``; :mod:`bdp.passes.values` finds them whatever the spelling:
  AdaBin's ``b * sign(x - c) + c``, QKeras' ``{-1, +1}`` and ``{0, 1}`` quantizers, ``Relu(Sign)``,
  casts of comparisons) reads ``T = mid + half * s`` with ``s = (src >= t ? +1 : -1)``. Then::

      conv(T, W) = conv(s, W * half) + conv(mid, W)

  ``half`` must have one magnitude over the channels (a per-channel sign folds into the
  weights); ``mid`` may differ per channel. ``conv(mid, W)`` is a constant: one per output
  channel when the padded border holds a value ``s`` can hold (``(pad - mid) / half`` in
  {-1, 0, +1}: a ``{0, 1}`` input zero-padded is an ``s`` padded with -1), else a constant map
  over the output positions (static shapes needed). The layer is rewritten to the canonical
  binarizer ``Where(src >= t, 1, -1)`` feeding it, which the later passes pack.
* **Weights.** A conv with a binarized input and weights of two values per output channel
  (``{mu_m - sig_m, mu_m + sig_m}``, AdaBin) is ``conv(s, sig * ws) + mu * conv(s, 1)``: two
  binary convs (the second with one output channel per group), added.

Exact in real arithmetic: every rewritten layer computes the same sums, reordered.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import binarizers
from .binary_conv import _pad_attrs, own_pads, sign_scale, two_levels
from .core import register_pass
from .graph import const_value, from_gs, to_gs
from .shapes import _static_shapes, elem_types
from .values import MOVES, Analysis, describe_values, two_valued


def _scalar(v) -> float:
    """The one value of a constant of size 1, whatever its rank."""
    return float(np.asarray(v).reshape(-1)[0])


def _channel_vector(v, rank, axis, c):
    """Constant V broadcast over a rank-RANK tensor as a float64 vector [C] along AXIS; None when
    it varies along another axis."""
    v = np.asarray(v, np.float64)
    if rank is None:
        return np.full(c, float(v.reshape(-1)[0])) if v.size == 1 or np.all(v == v.reshape(-1)[0]) else None
    if v.ndim > rank:
        return None
    v = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if any(d != 1 for i, d in enumerate(v.shape) if i != axis % rank):
        return None
    vec = v.reshape(-1)
    if vec.size == 1:
        return np.full(c, vec[0])
    return vec if vec.size == c else None


def _mid_half(tv, rank, axis, c):
    lo, hi = _channel_vector(tv.lo, rank, axis, c), _channel_vector(tv.hi, rank, axis, c)
    if lo is None or hi is None:
        return None, "its two values vary along another axis than the channels"
    half, mid = (hi - lo) / 2.0, (hi + lo) / 2.0
    h = np.abs(half)
    if np.any(h == 0) or not np.all(np.isfinite(h)) or not np.all(np.isfinite(mid)):
        return None, "its two values are equal in some channel"
    if np.max(np.abs(h - h[0])) > 1e-6 * h[0]:
        return None, ("it is a binarized tensor times a non-scalar scale: the gap between its two values differs "
                      "per channel, which does not factor out of the binary dot product")
    return (mid, float(h[0]), np.sign(half)), ""


def _binarizer(graph, tv, name, scale=1.0, out=None):
    """The canonical binarizer ``Where(src >= t, scale, -scale)`` of TV, moved as TV's data is."""
    b = binarizers.Binarized(tv.src, tv.threshold, binarizers.WHERE, [], scale)
    if not tv.moves:
        return binarizers.emit(graph, tv.src, b, name, out=out)
    return _replay(graph, binarizers.emit(graph, tv.src, b, name), tv.moves, name, out=out)


def _window_sums(w, mid_w, v_pad, pads, strides, dils, in_hw):
    """[M, Ho, Wo]: per output position, the sum over the taps of W * (MID inside, V_PAD on the
    padded border), channel sums first."""
    m, cg, kh, kw = w.shape
    a_mid = np.einsum("mcyx,mc->myx", w, mid_w)
    a_pad = np.einsum("mcyx->myx", w) * v_pad
    h, wd = in_hw
    t, l, b, r = pads
    ho = (h + t + b - dils[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (wd + l + r - dils[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((m, ho, wo))
    for ky in range(kh):
        iy = np.arange(ho) * strides[0] - t + ky * dils[0]
        vy = (iy >= 0) & (iy < h)
        for kx in range(kw):
            ix = np.arange(wo) * strides[1] - l + kx * dils[1]
            vx = (ix >= 0) & (ix < wd)
            valid = vy[:, None] & vx[None, :]
            out += np.where(valid[None], a_mid[:, ky, kx][:, None, None], a_pad[:, ky, kx][:, None, None])
    return out


def _rewrite_conv(graph, conv, tv, pad_node, shapes, report):
    w = const_value(conv.inputs[1])
    if w is None or w.ndim != 4:
        return "weights are not a constant 2-D kernel"
    w = np.asarray(w, np.float64)
    m, cg = w.shape[:2]
    g = int(conv.attrs.get("group", 1))
    if m % g:
        return "output channels do not divide into the groups"
    got, why = _mid_half(tv, 4, 1, cg * g)
    if got is None:
        return f"input takes two values but {why}"
    mid, h, sgn = got
    cidx = (np.arange(m)[:, None] // (m // g)) * cg + np.arange(cg)[None, :]  # [M, Cg] input channel of each weight
    w_new = w * (h * sgn[cidx])[:, :, None, None]
    mid_w = mid[cidx]
    own = own_pads(conv)
    if own is None:
        return "auto_pad SAME (export with explicit pads)"
    v_pad, pads = 0.0, list(own)
    if pad_node is not None:
        pa = _pad_attrs(pad_node)
        if pa is None:
            return "input Pad is not a constant pad of H/W"
        v_pad, pre = pa
        if any(own) and any(pre) and v_pad != 0.0:
            return "Pad with a non-zero value followed by a Conv with its own zero padding"
        pads = [a + b for a, b in zip(pre, own)]
    strides = [int(s) for s in conv.attrs.get("strides", [1, 1])]
    dils = [int(d) for d in conv.attrs.get("dilations", [1, 1])]
    s_pad = (v_pad - mid) / (h * sgn)
    name = conv.name + "_2v"
    s = _binarizer(graph, tv, name)
    corr_map = None
    if not any(pads):
        x_in, conv_pads = s, [0, 0, 0, 0]
    elif np.all(s_pad == s_pad[0]) and s_pad[0] in (-1.0, 0.0, 1.0):
        if s_pad[0] == 0.0:
            x_in, conv_pads = s, pads
        else:
            x_in = gs.Variable(name + "_padded", dtype=np.float32)
            t, l, b, r = pads
            graph.nodes.append(gs.Node("Pad", name=name + "_pad", attrs={"mode": "constant"},
                                       inputs=[s, gs.Constant(name + "_pads", np.array([0, 0, t, l, 0, 0, b, r], np.int64)),
                                               gs.Constant(name + "_padv", np.array(s_pad[0], np.float32))],
                                       outputs=[x_in]))
            conv_pads = [0, 0, 0, 0]
    else:  # a border value s cannot hold: s is zero-padded, the border's share is a constant map
        shape = shapes.get(tv.src.name) if tv.src.name else None
        if shape is None or len(shape) != 4:
            return "input takes two values and its padded border a third; the border correction needs a static input shape"
        x_in, conv_pads = s, pads
        corr_map = _window_sums(w, mid_w, v_pad, pads, strides, dils, shape[2:])
    corr = np.einsum("mcyx,mc->m", w, mid_w)  # the full window of mid
    if corr_map is not None:
        corr_map = corr_map - corr[:, None, None]
        if np.all(corr_map == 0):
            corr_map = None
    b = const_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if len(conv.inputs) > 2 and conv.inputs[2].name and b is None:
        return "bias is not constant"
    bias = (np.zeros(m) if b is None else np.asarray(b, np.float64)) + corr
    conv.inputs[0] = x_in
    conv.inputs[1] = gs.Constant(name + "_W", w_new.astype(np.float32))
    bias_c = gs.Constant(name + "_B", bias.astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_c
    else:
        conv.inputs.append(bias_c)
    conv.attrs["pads"] = [conv_pads[0], conv_pads[1], conv_pads[2], conv_pads[3]]
    conv.attrs.pop("auto_pad", None)
    if corr_map is not None:
        y = conv.outputs[0]
        mid_out = gs.Variable(name + "_core", dtype=np.float32)
        conv.outputs = [mid_out]
        graph.nodes.append(gs.Node("Add", name=name + "_border", inputs=[mid_out, gs.Constant(
            name + "_bordermap", corr_map[None].astype(np.float32))], outputs=[y]))
    return None


def _rewrite_matmul(graph, mm, tv, shapes, report):
    w = const_value(mm.inputs[1])
    if w is None or w.ndim != 2:
        return "weights are not a constant matrix"
    if mm.op == "Gemm" and int(mm.attrs.get("transA", 0)):
        return "Gemm with transA"
    w = np.asarray(w, np.float64)
    trans_b = mm.op == "Gemm" and int(mm.attrs.get("transB", 0))
    wk = w.T if trans_b else w  # [K, N]
    shape = shapes.get(mm.inputs[0].name)
    rank = len(shape) if shape is not None else (2 if mm.op == "Gemm" else None)
    if tv.moves:
        rank = None  # scalar values (checked): no axis to map through the moves
    got, why = _mid_half(tv, rank, -1, wk.shape[0])
    if got is None:
        return f"input takes two values but {why}"
    mid, h, sgn = got
    wk_new = wk * (h * sgn)[:, None]
    corr = mid @ wk * (float(mm.attrs.get("alpha", 1.0)) if mm.op == "Gemm" else 1.0)
    name = mm.name + "_2v"
    mm.inputs[0] = _binarizer(graph, tv, name)
    mm.inputs[1] = gs.Constant(name + "_W", (wk_new.T if trans_b else wk_new).astype(np.float32))
    if np.any(corr != 0):
        y = mm.outputs[0]
        core = gs.Variable(name + "_core", dtype=np.float32)
        mm.outputs = [core]
        graph.nodes.append(gs.Node("Add", name=name + "_mid", inputs=[core, gs.Constant(name + "_midsum",
                                                                                         corr.astype(np.float32))],
                                   outputs=[y]))
    return None


def _split_weights(graph, conv, report):
    """Conv with a binarized input and two weight values per output channel -> two binary convs."""
    w = const_value(conv.inputs[1])
    if w is None or w.ndim != 4 or sign_scale(np.asarray(w, np.float32)) is not None:
        return False
    lv = two_levels(np.asarray(w, np.float32))
    if lv is None:
        return False
    mu, sig, ws = lv
    m, cg, kh, kw = w.shape
    g = int(conv.attrs.get("group", 1))
    name = conv.name + "_mu"
    x = conv.inputs[0]
    y = conv.outputs[0]
    attrs = {k: v for k, v in conv.attrs.items()}
    conv.inputs[1] = gs.Constant(conv.name + "_Wsig", (sig[:, None, None, None] * ws).astype(np.float32))
    core = gs.Variable(conv.name + "_sig", dtype=np.float32)
    conv.outputs = [core]
    if g == 1:
        ones = gs.Constant(name + "_ones", np.ones((1, cg, kh, kw), np.float32))
        count = gs.Variable(name + "_count", dtype=np.float32)
        graph.nodes.append(gs.Node("Conv", name=name, attrs=attrs, inputs=[x, ones], outputs=[count]))
        term = gs.Variable(name + "_term", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", name=name + "_scale", inputs=[count, gs.Constant(
            name + "_muv", mu.reshape(1, m, 1, 1).astype(np.float32))], outputs=[term]))
    else:
        term = gs.Variable(name + "_term", dtype=np.float32)
        graph.nodes.append(gs.Node("Conv", name=name, attrs=attrs, inputs=[x, gs.Constant(
            name + "_Wmu", (mu[:, None, None, None] * np.ones((m, cg, kh, kw))).astype(np.float32))], outputs=[term]))
    graph.nodes.append(gs.Node("Add", name=name + "_add", inputs=[core, term], outputs=[y]))
    report.fuse("two-valued", conv.name, f"weights of two values per output channel: split into +/-sig and mu "
                                         f"binary convs ({name})")
    return True


_MOVES = MOVES + ("Identity",)  # the analysis's data movement, and Identity


def _through_moves(x):
    """(T, [move nodes from T to X]) walking up single-consumer data movement from X."""
    moves = []
    while isinstance(x, gs.Variable) and len(x.inputs) == 1 and x.inputs[0].op in _MOVES and x.inputs[0].inputs \
            and len(moves) < 8:
        n = x.inputs[0]
        moves.append(n)
        x = n.inputs[0]
    return x, moves[::-1]


def _replay(graph, s, moves, name, out=None):
    """The data movement MOVES applied to S instead (new nodes; their other inputs shared); the
    last one writes OUT when given."""
    last = out
    for i, n in enumerate(moves):
        out = last if (i == len(moves) - 1 and last is not None) else gs.Variable(f"{name}_mv{i}", dtype=np.float32)
        graph.nodes.append(gs.Node(n.op, name=f"{name}_mv{i}", attrs=dict(n.attrs), inputs=[s] + list(n.inputs[1:]),
                                   outputs=[out]))
        s = out
    return s


def _canonical_in_place(graph, an, report):
    """A tensor of exactly two values +/-c (no third value anywhere), spelled other than the
    binarizer table's forms, is rewritten in place to the canonical ``Where(src >= t, c, -c)``:
    the same values, so every pass (sinking past pooling and reshapes, concat, links) sees it."""
    count = 0
    for n in list(graph.nodes):
        if len(n.outputs) != 1 or n.op in ("Where", "Sign", "Constant") or (n.domain or "") not in ("", "ai.onnx"):
            continue
        t = n.outputs[0]
        if getattr(t, "dtype", None) is not None and np.dtype(t.dtype) != np.float32:
            continue
        if binarizers.match(t) is not None:
            continue
        tv = two_valued(an.step(t))
        if tv is None or tv.point or tv.lo.size != 1 or tv.hi.size != 1 or _scalar(tv.hi) != -_scalar(tv.lo) \
                or _scalar(tv.hi) == 0.0 or tv.src is t:
            continue
        n.outputs = []
        _binarizer(graph, tv, n.name + "_canon", scale=_scalar(tv.hi), out=t)
        count += 1
        report.notes.append(f"{n.name}: two-valued {{{-_scalar(tv.hi):g}, {_scalar(tv.hi):g}}} at {tv.src.name} >= "
                            f"{tv.threshold:g} (from {len(tv.nodes)} ops) rewritten to the canonical binarizer")
    return count


def _binary_input(x):
    """The Conv input X is a binarizer's output (possibly behind a constant Pad)."""
    if isinstance(x, gs.Variable) and len(x.inputs) == 1 and x.inputs[0].op == "Pad":
        x = x.inputs[0].inputs[0]
    return isinstance(x, gs.Variable) and binarizers.match(x) is not None


@register_pass("two-valued", "layers whose input takes two values {lo, hi} (any spelling: value-set analysis) -> "
                             "canonical binarizer + constant; weights of two values per channel -> two binary convs")
def two_valued_layers(model, report):
    graph = to_gs(model)
    shapes = _static_shapes(model)
    types = elem_types(model)
    an = Analysis(lambda t: isinstance(t, gs.Variable) and types.get(t.name) == 1)  # float32 sources only
    if _canonical_in_place(graph, an, report):
        graph.cleanup()
        an = Analysis(an.source_ok)
    for n in [n for n in graph.nodes if n.op in ("Conv", "MatMul", "Gemm")]:
        if not n.inputs or not isinstance(n.inputs[0], gs.Variable) or len(n.inputs) < 2:
            continue
        x = n.inputs[0]
        pad_node = None
        if n.op == "Conv" and len(x.inputs) == 1 and x.inputs[0].op == "Pad":
            pad_node, x = x.inputs[0], x.inputs[0].inputs[0]
        moves = []
        if n.op != "Conv":
            x, moves = _through_moves(x)
        if not isinstance(x, gs.Variable) or binarizers.match(x) is not None:
            continue  # a binarizer the table knows: the other passes take it
        step = an.step(x)
        if step is None:
            continue
        tv = two_valued(step)
        if tv is not None and moves and (tv.lo.size != 1 or tv.hi.size != 1):
            report.leave(n.name, n.op, "input takes two values per channel behind data movement: runs in float")
            continue
        if tv is not None:
            tv.moves = list(tv.moves) + moves
        if tv is None:
            if len(step.simplified().values) > 2 and const_value(n.inputs[1]) is not None:
                report.leave(n.name, n.op, f"input takes {len(step.simplified().values)} values "
                                           f"{describe_values(step.simplified())}: a multi-bit input, runs in float")
            continue
        why = _rewrite_conv(graph, n, tv, pad_node, shapes, report) if n.op == "Conv" else \
            _rewrite_matmul(graph, n, tv, shapes, report)
        if why:
            report.leave(n.name, n.op, why)
            continue
        lo, hi = describe_values(step.simplified()).strip("{}").split(", ")[:2]
        report.fuse("two-valued", n.name, f"input takes two values {{{lo}, {hi}}} at {tv.src.name} >= "
                                          f"{tv.threshold:g}: canonical binarizer + constant")
        if tv.point:
            report.notes.append(f"{n.name}: the input's third value at exactly {tv.src.name} == {tv.threshold:g} "
                                f"read as the upper one (sgn(0) = +1)")
    for n in [n for n in graph.nodes if n.op == "Conv"]:
        if n.inputs and _binary_input(n.inputs[0]) and n.outputs:
            _split_weights(graph, n, report)
    return from_gs(graph, model)
