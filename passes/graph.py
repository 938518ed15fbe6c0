"""Graph helpers every pass uses: onnx <-> onnx-graphsurgeon, constants, per-channel tests.

Passes edit graphs with onnx-graphsurgeon (:func:`to_gs` / :func:`from_gs`); these helpers read
constants whatever way the graph holds them (initializer, ``Constant`` node) and decide whether
a constant broadcasts per channel over an NCHW tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def to_gs(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def from_gs(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """GRAPH back to a ModelProto with LIKE's IR version, opsets, functions and metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    have = {(f.domain, f.name) for f in out.functions}  # gs carries model-local functions over itself
    out.functions.extend(f for f in like.functions if (f.domain, f.name) not in have)
    out.producer_name = like.producer_name or "bdp"
    for p in like.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    return out


def const_value(t):
    """numpy value of a gs tensor if it is a constant (initializer or Constant node), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if v is not None:
            return np.asarray(v)
    return None


def scalar_value(t):
    """The value of a constant whose elements are all equal (a scalar, or a folded ones_like)."""
    v = const_value(t)
    if v is None or v.size == 0:
        return None
    first = v.reshape(-1)[0]
    if v.size > 1 and not np.all(v == first):
        return None
    return float(first)


def per_channel(v, m):
    """A constant that broadcasts over [N, M, H, W] per channel (scalar, or shape [1, M, 1, 1] /
    [M, 1, 1] by ONNX broadcasting) -> float32 [M]; anything else -> None."""
    if v is None:
        return None
    v = np.asarray(v, np.float32)
    if v.size == 1 and v.ndim <= 4:
        return np.full(m, float(v.reshape(-1)[0]), np.float32)
    shape = (1,) * (4 - v.ndim) + tuple(v.shape) if v.ndim <= 4 else None
    if shape == (1, m, 1, 1):
        return v.reshape(m)
    return None


def producer(t: gs.Tensor):
    """The node that makes tensor T, or None (a graph input or a constant)."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def ints(v, n, default):
    """An int-list attribute, or N copies of DEFAULT when it is absent."""
    return [int(x) for x in v] if v is not None else [default] * n


def attr_str(v, default=""):
    """A string attribute as str (onnx-graphsurgeon may hand it over as bytes)."""
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


def fold_bn(bn: gs.Node):
    """An inference BatchNormalization with constant parameters as ``(s, shift)``: per channel,
    ``BN(y) = s * y + shift(0)``, and a bias b before it becomes ``shift(b) = (b - mean) * s +
    beta`` (float64); None for anything else."""
    if bn.op != "BatchNormalization" or bn.attrs.get("training_mode", 0):
        return None
    vals = [const_value(t) for t in bn.inputs[1:5]]
    if len(vals) != 4 or any(v is None for v in vals):
        return None
    gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in vals)
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, (lambda b: (np.asarray(b, np.float64) - mean) * s + beta)
