"""``exp`` and ``sigmoid`` that vectorize on CPUs.

LLVM has no vector ``exp`` for x86 or AArch64: TVM's ``T.exp`` (and ``T.sigmoid``, lowered to
``1 / (1 + exp(-x))``) becomes one ``expf`` library call per lane, about ten times slower than a
polynomial in vector registers. MTI-Net's softmax over tasks, its spatial-attention sigmoids and
Ding et al.'s gates spend most of their time there.

:func:`fast_exp_expr` is the Cephes ``expf`` scheme (the one TOPI's ``fast_exp`` uses): clamp
to the float range, ``n = round(x / ln 2)``, Cody-Waite reduction ``r = x - n ln 2`` (ln 2 in
two parts), a degree-7 polynomial for ``exp(r)`` on ``|r| <= ln(2)/2``, times ``2^n`` built in
the exponent bits. Its error is a few units in the last place (TOPI's version of the scheme
measured at most 4.5 ulp, relative 3.1e-7, over [-87, 87]), float round-off next to the 1e-4
the bundle is checked to. Above ln(FLT_MAX) it is inf, below ln(FLT_MIN) 0 (results that would
be subnormal are flushed).

:func:`rewrite_exp` replaces every float32 ``exp`` / ``sigmoid`` call of a PrimFunc with it,
before scheduling (the compile option ``fast_exp=false`` keeps the library calls).
"""

from __future__ import annotations


_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_X_MAX = 88.72283905206835  # ln(FLT_MAX): above, exp overflows to inf
_X_MIN = -87.33654475055310  # ln(FLT_MIN): below, the result is flushed to 0 (no subnormals)


def fast_exp_expr(x):
    """A float32 PrimExpr computing exp(X) with float operations and bit manipulation only."""
    from tvm import tirx

    def c(v):
        return tirx.const(v, "float32")

    xc = tirx.max(tirx.min(x, c(_X_MAX)), c(_X_MIN))
    n = tirx.floor(xc * c(_LOG2E) + c(0.5))
    r = xc - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_P[0])
    for k in _P[1:]:
        p = p * r + c(k)
    p = p * r * r + r + c(1.0)
    # 2^n as 2^h * 2^(n-h), h = n // 2: n runs from -126 to 128 over the clamped range, and
    # 2^-126 / 2^128 alone would need a subnormal / all-ones exponent field
    ni = tirx.Cast("int32", n)
    h = tirx.shift_right(ni, 1)

    def pow2(k):
        return tirx.reinterpret("float32", tirx.shift_left(k + 127, 23))

    y = p * pow2(h) * pow2(ni - h)
    y = tirx.Select(x > c(_X_MAX), c(float("inf")), y)
    return tirx.Select(x < c(_X_MIN), c(0.0), y)


def rewrite_exp(func, enabled=True):
    """FUNC (a PrimFunc) with its float32 exp and sigmoid calls computed by :func:`fast_exp_expr`
    (FUNC itself when not ENABLED: the compile option ``fast_exp=false``)."""
    if not enabled:
        return func
    import tvm
    import tvm_ffi
    from tvm import tirx

    def visit(call):
        name = str(getattr(call.op, "name", ""))
        if name not in ("tirx.exp", "tirx.sigmoid") or str(call.ty) != "float32" or len(call.args) != 1:
            return call
        x = call.args[0]
        if name == "tirx.exp":
            return fast_exp_expr(x)
        return tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + fast_exp_expr(-x))

    return tvm_ffi.structural_map(func, (tvm.ir.Call, visit), order="post")
