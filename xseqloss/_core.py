"""The numeric core ``_numeric``, written once over a small set of backend ops:
which tokens count -> per-token loss l (the backend's native kernel along its own class axis, or
``token_loss``) -> token weights -> reduction over the chosen denominator.

Under tracing or ``validate=False`` the value problems that the eager checks would have raised
instead mark "bad" tokens: their loss is multiplied by NaN, which makes the loss and the gradient
row NaN there and nowhere else. Labels are clamped into [0, C) before any gather, so nothing reads
out of bounds.
"""

from __future__ import annotations

from typing import Any

from ._plan import Static
from ._token_loss import token_loss

PROBS_SUM_TOL = 1e-3  # inputs="probs": a row must sum to 1 within this


def probs_rows(ops: Any, st: Static, z: Any) -> tuple[Any, Any]:
    """inputs="probs": per token, whether an entry is outside [0, 1] (or not finite), and the row's
    sum in float64 (JAX without x64: float32, its widest type). One rule, one precision for the eager
    check and the traced NaN mark alike: a float32 sum depends on the order of the additions, which
    differs between eager kernels and XLA, so a row near 1 +- 1e-3 could pass one and not the other
    (issue 17); in float64 the order changes the sum by ~1e-16."""
    p = ops.cast(z, ops.wide_dtype())
    k = st.opts.k
    return ops.any((p < 0) | (p > 1) | ~ops.isfinite(p), k), ops.sum(p, k)


def _axes(tok: str, letters: str) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(tok) if a in letters)


def _sum(ops: Any, x: Any, axes: tuple[int, ...] | None) -> Any:
    """Sum over ``axes`` (None: all, giving a scalar; (): none, the identity)."""
    return x if axes == () else ops.sum(x, axes)


def _inverse(ops: Any, den: Any) -> tuple[Any, Any]:
    """(1/den, or 0 where den == 0; den == 0): the gradient through an empty denominator is exactly 0."""
    zero = den == 0
    return ops.where(zero, 0.0, 1.0 / ops.where(zero, 1.0, den)), zero


def _divide(ops: Any, num: Any, inv: Any, zero: Any, empty: str) -> Any:
    """num / den from ``_inverse``'s output, with the empty rule where den == 0."""
    out = num * inv
    return ops.where(zero, float("nan"), out) if empty == "nan" else out


def _counted(ops: Any, st: Static, y: Any, mask: Any, lengths: Any, like: Any) -> tuple[Any, Any]:
    """Which tokens count (bool, token shape, or None for all) and which counted ones are bad (or None).

    A sequence with a bad length (negative or > T, only possible when values are not validated) is
    counted whole, so that every one of its tokens shows the NaN.
    """
    tok = st.opts.tok_layout
    counted = None if mask is None else ops.nonzero(mask)
    bad = None
    if lengths is not None:
        na, ta = tok.index("N"), tok.index("T")
        T = ops.dim(like, ta)
        steps = ops.expand(ops.arange(T, like=lengths), na)
        inside = steps < ops.expand(lengths, ta)
        if st.mark_bad:
            seq_bad = ops.expand((lengths < 0) | (lengths > T), ta) & (steps >= 0)  # broadcast to tokens
            inside = inside | seq_bad
            bad = seq_bad
        counted = inside if counted is None else (counted & inside)
    if not st.soft and st.ignore:
        if len(st.ignore) == 1:
            kept = y != st.ignore[0]
        else:
            ignored = None
            for v in st.ignore:
                hit = y == v
                ignored = hit if ignored is None else (ignored | hit)
            kept = ~ignored
        counted = kept if counted is None else (counted & kept)
    if bad is not None and counted is not None:
        bad = bad & counted
    return counted, bad


def _or(a: Any, b: Any) -> Any:
    return b if a is None else (a | b)


def _den(ops: Any, st: Static, W: Any, counted: Any, like: Any, axes: tuple[int, ...] | None, acc: Any) -> Any:
    """The denominator summed over ``axes`` of the token array (None: all; (): per token).

    "weights": sum of W; "tokens": number of counted tokens; "positions": number of positions.
    Counts are integers, cast to the accumulation dtype only for the division.
    """
    d = st.opts.denominator
    if d == "weights" and W is not None:
        return _sum(ops, W, axes)
    flags = counted if (d != "positions" and counted is not None) else ops.true_like(like)
    if axes == ():
        return ops.cast(flags, acc)
    return ops.cast(ops.count(flags, axes), acc)


def _denominator_weights(ops: Any, st: Static, y: Any, counted: Any, w: Any, cw: Any) -> Any:
    """W[n, t]: weights * cw[y] at counted tokens (soft targets: weights only); None = all ones."""
    if st.opts.denominator != "weights":
        return None
    W = w
    if cw is not None and not st.soft:
        cwy = ops.take(cw, y)
        W = cwy if W is None else W * cwy
    if W is not None and counted is not None:
        W = ops.where(counted, W, 0.0)
    return W


def _numeric(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
             cw: Any, normalizer: Any, want_grad: bool = False) -> Any:
    o = st.opts
    tok = o.tok_layout
    acc = ops.acc_dtype(z)
    like = y if y is not None else ops.drop_class(z, o.k)
    counted, bad = _counted(ops, st, y, mask, lengths, like)
    if st.mark_bad and not st.soft:
        lab_bad = (y < 0) | (y >= st.C)
        bad = _or(bad, lab_bad if counted is None else (lab_bad & counted))
    if y is not None:
        y = ops.where((y >= 0) & (y < st.C), y, 0)  # clamp before any gather: never out of bounds, never wraps
    if cw is not None:
        cw = ops.cast(cw, acc)
        if st.mark_bad:
            cw = ops.where((cw >= 0) & ops.isfinite(cw), cw, float("nan"))
    if st.mark_bad and st.soft:
        rb = ops.any((t < 0) | ~ops.isfinite(t), o.k)
        bad = _or(bad, rb if counted is None else (rb & counted))
    if st.mark_bad and o.inputs == "probs":
        outside, sums = probs_rows(ops, st, z)
        rb = outside | (ops.abs(sums - 1.0) > PROBS_SUM_TOL)
        bad = _or(bad, rb if counted is None else (rb & counted))

    if st.mark_bad and o.inputs == "probs" and bad is not None:
        # clamps and wheres would drop the NaN from parts of the row's gradient: poison the input row
        z = z * ops.expand(ops.cast(ops.where(bad, float("nan"), 1.0), ops.dtype(z)), o.k)
    # token weights W (for the denominator) and the multiplier of each token's loss
    w = None if weights is None else ops.cast(weights, acc)
    if counted is not None and w is not None:
        w = ops.where(counted, w, 0.0)
    mult = w
    if bad is not None:
        nan_or_1 = ops.cast(ops.where(bad, float("nan"), 1.0), acc)
        mult = nan_or_1 if mult is None else mult * nan_or_1

    # the denominators never depend on the losses: coef = d result / d (weighted token loss), known
    # before the loss is computed, so a fused kernel can fold it into the gradient it forms in its
    # forward pass (see expected_dl below)
    red = o.reduction
    coef = 1.0  # (no annotation: autograph cannot convert an annotated name a closure reads)
    inv = zero = inv2 = zero2 = axes = None
    if red not in ("none", "sum"):
        W = _denominator_weights(ops, st, y, counted, w, cw)
        if normalizer is not None:
            normalizer = ops.cast(normalizer, acc)
            if st.mark_bad:  # a negative or non-finite normalizer (unchecked): NaN, never a flipped sign
                normalizer = ops.where((normalizer >= 0) & ops.isfinite(normalizer), normalizer, float("nan"))
        if red == "mean":
            D = normalizer if normalizer is not None else _den(ops, st, W, counted, like, None, acc)
            inv, zero = _inverse(ops, D)
            coef = inv
        else:
            over = "T" if red in ("per_sequence", "sequence_mean") else "N"
            axes = _axes(tok, over)
            inv, zero = _inverse(ops, _den(ops, st, W, counted, like, axes, acc))
            coef = ops.expand(inv, tok.index(over)) if axes else inv
            if red == "sequence_mean":
                n_seq = ops.cast(normalizer if normalizer is not None else ops.dim(like, tok.index("N")), acc)
                inv2, zero2 = _inverse(ops, n_seq)
                coef = coef * inv2

    def expected_dl() -> Any:
        """d result / d l per token when result's own upstream gradient is 1 (bad-token NaNs left
        out): what a fused kernel's backward receives in the common case."""
        ct = ops.full_tokens(like, 1.0, acc) * coef  # coef may be a Python float or a 0-d array
        if w is None:
            return ct
        ct = ct * w
        return ct if counted is None else ops.where(counted, ct, 0.0)  # as ``out`` below

    def cotangent() -> Any:
        """d result / d l per token, bad-token NaNs included: the gradient's per-row factor."""
        ct = ops.full_tokens(like, 1.0, acc) * coef
        if mult is not None:
            ct = ct * mult
        return ct if counted is None else ops.where(counted, ct, 0.0)

    l = g = grad = None
    if want_grad:  # without autodiff (NumPy): a backend's kernel forms the scaled gradient itself
        fused_vg = getattr(ops, "fused_value_and_grad", None)
        if fused_vg is not None:
            l, grad = fused_vg(st, z, y, t, counted, cw, acc, cotangent)
    else:
        fused = getattr(ops, "fused_token_loss", None)  # a backend's own forward+backward kernel, if any
        l = None if fused is None else fused(st, z, y, t, counted, cw, acc, expected_dl)
    if l is None:
        l, g = token_loss(ops, st, z, y, t, counted, cw, acc, want_grad)

    out = l if mult is None else l * mult
    if counted is not None and mult is not None:
        out = ops.where(counted, out, 0.0)
    if red == "none":
        result = out
    elif red == "sum":
        result = ops.sum(out, None)
    elif red == "mean":
        result = _divide(ops, ops.sum(out, None), inv, zero, o.empty)
    else:
        result = _divide(ops, _sum(ops, out, axes), inv, zero, o.empty)
        if red == "sequence_mean":
            result = _divide(ops, ops.sum(result, None), inv2, zero2, o.empty)
    if not want_grad:
        return result
    if grad is None:
        grad = g * ops.expand(cotangent(), o.k)
    return result, grad


