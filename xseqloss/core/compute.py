"""The numeric core ``compute``, written once over a small set of backend ops:
which tokens count -> per-token loss l (the backend's native kernel along its own class axis, or
``token_loss``) -> token weights -> reduction over the chosen denominator.

Under tracing or ``validate=False`` the value problems that the eager checks would have raised
instead mark "bad" tokens: their loss is multiplied by NaN, which makes the loss and the gradient
row NaN there and nowhere else. Labels are clamped into [0, C) before any gather, so nothing reads
out of bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..plan.call_plan import CallPlan
from . import common, reduction, tokens
from .ragged import scatter_rows, shifted_rows
from .token_loss import token_loss

PROBS_SUM_TOL = 1e-3  # inputs="probs": a row must sum to 1 within this
# the float64 PROBS_SUM_TOL as an unevaluated float32 pair: the float32 rule compares against it exactly
_TOL_HI = float(np.float32(PROBS_SUM_TOL))
_TOL_LO = float(np.float32(PROBS_SUM_TOL - _TOL_HI))


def probs_rows(ops: Any, st: CallPlan, z: Any) -> tuple[Any, Any, Any]:
    """inputs="probs": per token, whether an entry is outside [0, 1] (or not finite), the row's sum,
    and whether that sum is off 1 by more than 1e-3, decided on the float64 sum. One rule, one
    precision for the eager check and the traced NaN mark alike, on every backend: a float32 sum
    depends on the order of the additions, which differs between eager kernels and XLA, so a row
    near 1 +- 1e-3 could pass one and not the other (issue 17); in float64 the order changes the
    sum by ~1e-16. Where float64 does not exist (JAX without x64) the sum is a compensated float32
    pair hi + lo compared exactly with the float64 tolerance, which decides as float64 does
    (decisions.md item 72)."""
    p = ops.cast(z, ops.wide_dtype())
    k = st.opts.k
    if st.class_parallel is not None and st.class_parallel.padded:
        p = ops.where(ops.reducer(st.class_parallel).valid(p, k), p, 0.0)
    outside = ops.any((p < 0) | (p > 1) | ~ops.isfinite(p), k)
    if "float64" in str(ops.wide_dtype()):
        sums = ops.sum(p, k)
        if st.class_parallel is not None:  # the row is spread over the workers: its sum is theirs together
            outside, sums = _cp_any(ops, st, outside, sums)
        return outside, sums, ops.abs(sums - 1.0) > PROBS_SUM_TOL
    hi, lo = common.two_sum(ops, p, k)
    if st.class_parallel is not None:  # the workers' pairs summed (hi rounded once per worker)
        outside, hi, lo = _cp_any(ops, st, outside, hi, lo)
    a = hi - 1.0  # exact for hi in [0.5, 2]; outside it the row is far off either way
    off = ((a - _TOL_HI) > (_TOL_LO - lo)) | ((a + _TOL_HI) < -(lo + _TOL_LO))
    return outside, hi + lo, off


def _cp_any(ops: Any, st: CallPlan, flags: Any, *more: Any) -> Any:
    """Token flags true where any worker's slice flags them (and ``more`` partial sums combined),
    in one all-reduce."""
    dt = ops.dtype(more[0]) if more else ops.wide_dtype()
    out = ops.reducer(st.class_parallel).sums([ops.cast(flags, dt), *more])
    return (out[0] > 0, *out[1:]) if more else out[0] > 0


def _or(a: Any, b: Any) -> Any:
    return b if a is None else (a | b)


class TokenRules:
    """What the core knows about one call before any loss is computed: the target-side arrays at the
    logits' positions (``y`` clamped, ``t``), which tokens count, the loss multiplier ``mult``
    (token weights, NaN at bad tokens), the class weights ``cw``, the coefficient of every token
    (``expected_dl``, ``cotangent``) and ``finish``, the reduction."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def per_token(self, with_marks: bool) -> Any:
        ops = self.ops
        ct = ops.full_tokens(self.like, 1.0, self.acc) * self.coef  # coef may be a Python float or 0-d
        m = self.mult if with_marks else self.w
        if m is None:
            return ct
        ct = ct * m
        return ct if self.counted is None else ops.where(self.counted, ct, 0.0)  # as ``combine``

    def expected_dl(self) -> Any:
        """d result / d l per token when result's own upstream gradient is 1 (bad-token NaNs left
        out): what a fused kernel's backward receives in the common case."""
        return self.per_token(False)

    def cotangent(self) -> Any:
        """d result / d l per token, bad-token NaNs included: the gradient's per-row factor."""
        return self.per_token(True)

    def combine(self, l: Any) -> Any:
        """The weighted per-token losses (``finish`` takes them): l * mult, exactly 0 where not counted."""
        out = l if self.mult is None else l * self.mult
        if self.counted is not None and self.mult is not None:
            out = self.ops.where(self.counted, out, 0.0)
        return out


def token_rules(ops: Any, st: CallPlan, like: Any, acc: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
               cw: Any, normalizer: Any, segs: Any, extra_bad: Any = None, k: int | None = None,
               to_tokens: Any = None) -> TokenRules:
    """The token-level half of the core, shared by ``compute`` and the fused output layer
    (linear.py). ``extra_bad``: token-shaped bad marks only the caller can compute (probability
    rows); ``k``: the class axis of soft targets ``t``; ``to_tokens``: ragged rows -> the padded
    token array, for soft targets given as rows."""
    o = st.opts
    k = o.k if k is None else k
    y, t, mask, weights, counted, bad, pos = tokens.token_facts(ops, st, y, t, mask, lengths, weights, segs, like)
    if st.mark_nan and not st.soft:
        lab_bad = (y < 0) | (y >= st.C)
        bad = _or(bad, lab_bad if counted is None else (lab_bad & counted))
    if y is not None:
        y = ops.where((y >= 0) & (y < st.C), y, 0)  # clamp before any gather: never out of bounds, never wraps
    if cw is not None:
        cw = ops.cast(cw, acc)
        if st.mark_nan:
            cw = ops.where((cw >= 0) & ops.isfinite(cw), cw, float("nan"))
    if st.mark_nan and st.soft:
        rb = ops.any((t < 0) | ~ops.isfinite(t), k)
        if st.class_parallel is not None:
            rb = _cp_any(ops, st, rb)
        if to_tokens is not None:
            rb = to_tokens(rb)
        bad = _or(bad, rb if counted is None else (rb & counted))
    if extra_bad is not None:
        bad = _or(bad, extra_bad if counted is None else (extra_bad & counted))
    # token weights W (for the denominator) and the multiplier of each token's loss
    w = None if weights is None else ops.cast(weights, acc)
    if counted is not None and w is not None:
        w = ops.where(counted, w, 0.0)
    mult = w
    if bad is not None:
        nan_or_1 = ops.cast(ops.where(bad, float("nan"), 1.0), acc)
        mult = nan_or_1 if mult is None else mult * nan_or_1
    if normalizer is not None:
        normalizer = ops.cast(normalizer, acc)
        if st.mark_nan:  # a negative or non-finite normalizer (unchecked): NaN, never a flipped sign
            normalizer = ops.where((normalizer >= 0) & ops.isfinite(normalizer), normalizer, float("nan"))
    W = None
    if o.reduction not in ("none", "sum"):
        cwy = None
        if st.class_parallel is not None and cw is not None and not st.soft:
            cwy = ops.reducer(st.class_parallel).take(cw, y)
        W = reduction.denominator_weights(ops, st, y, counted, w, cw, cwy)
    docs = tokens.documents(ops, st, segs) if o.reduction in ("per_segment", "segment_mean") else None
    # coef = d result / d (weighted token loss), known before the loss is computed, so a fused kernel
    # can fold it into the gradient it forms in its forward pass (TokenRules.expected_dl)
    coef, finish = reduction.coef_and_finish(ops, st, like=like, counted=counted, W=W, pos=pos, docs=docs,
                                normalizer=normalizer, acc=acc)
    return TokenRules(ops=ops, like=like, acc=acc, y=y, t=t, counted=counted, bad=bad, mult=mult, w=w, cw=cw,
                coef=coef, finish=finish)


def compute(ops: Any, st: CallPlan, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
             cw: Any, normalizer: Any, segs: Any = None, rows: Any = None, want_grad: bool = False) -> Any:
    """The loss (and with ``want_grad`` its gradient, for backends without autodiff).

    ``rows`` (ragged inputs, _ragged.py): z and soft targets hold only the real tokens, as (R, C)
    rows; the token-shaped arrays are the padded (N, T) batch, with a mask that is true exactly at
    the real tokens; rows[r] is row r's flat index into it. The per-token loss is computed on the
    rows (``st.row_plan``, class axis 1) and scattered into the padded token array, so every rule
    below is the padded batch's.

    With ``st.stats`` (a loss's ``return_stats``, API.md 11.5) the result is ``(result, stats)``:
    the per-token outputs named there, from the same pass over the logits as the loss.
    """
    o = st.opts
    k = st.row_plan.opts.k  # the class axis of z as given
    acc = ops.acc_dtype(z)
    like = y if y is not None else (ops.drop_class(t, o.k) if rows is None else mask)
    if rows is not None and st.soft and st.shift:
        t = shifted_rows(ops, st, t, rows, like)
    to_tokens = (lambda v: scatter_rows(ops, v, rows, like)) if rows is not None else None
    probs_bad = None
    if st.mark_nan and o.inputs == "probs":
        outside, _, off = probs_rows(ops, st.row_plan, z)
        probs_bad = outside | off
        if rows is not None:
            probs_bad = to_tokens(probs_bad)
    p = token_rules(ops, st, like, acc, y, t, mask, lengths, weights, cw, normalizer, segs,
                   extra_bad=probs_bad, k=k, to_tokens=to_tokens)
    if st.mark_nan and o.inputs == "probs" and p.bad is not None:
        # clamps and wheres would drop the NaN from parts of the row's gradient: poison the input row
        b = p.bad if rows is None else ops.take(ops.flat(p.bad), rows)
        z = z * ops.expand(ops.cast(ops.where(b, float("nan"), 1.0), ops.dtype(z)), k)

    def to_kernel(x: Any) -> Any:
        """A token-shaped array as the kernel sees it (rows: gathered at the rows)."""
        return x if rows is None or x is None else ops.take(ops.flat(x), rows)

    rp = st.row_plan
    yk, ck, tk = to_kernel(p.y), to_kernel(p.counted), p.t  # soft targets are rows already
    expected_dl = lambda: to_kernel(p.expected_dl())  # noqa: E731
    cotangent = lambda: to_kernel(p.cotangent())  # noqa: E731
    l = g = grad = None
    collect = None if st.stats is None else {}
    if st.class_parallel is not None and not (ops.fused_class_parallel and not want_grad):
        pass  # classes split across workers: the generic formula with its sums combined (token_loss)
    elif want_grad:  # without autodiff (NumPy): a backend's kernel forms the scaled gradient itself
        if ops.fused_value_and_grad is not None:
            l, grad = ops.fused_value_and_grad(rp, z, yk, tk, ck, p.cw, acc, cotangent)
    else:
        # a backend's own forward+backward kernel, if any
        l = None if ops.fused_token_loss is None else ops.fused_token_loss(rp, z, yk, tk, ck, p.cw, acc, expected_dl,
                                                                           collect)
    if l is None:
        l, g = token_loss(ops, rp, z, yk, tk, ck, p.cw, acc, want_grad, collect=collect)
    if rows is not None:
        l = scatter_rows(ops, l, rows, like)
    result = p.finish(p.combine(l))
    if collect is not None:
        result = (result, metrics(ops, collect, p, rows, like))
    if not want_grad:
        return result
    if grad is None:
        grad = g * ops.expand(cotangent(), k)
    return result, grad


def metrics(ops: Any, collect: dict, p: TokenRules, rows: Any, like: Any) -> dict:
    """A loss's per-token outputs (``return_stats``) in the token shape: scattered from ragged rows,
    NaN at bad tokens (correct False), and ``counted``."""
    from .stats import apply_marks
    out = {}
    for name, v in collect.items():
        if rows is not None:
            fill = -1 if name == "argmax" else False if name == "correct" else 0.0
            v = _scatter_filled(ops, v, rows, like, fill)
        out[name] = v
    return apply_marks(ops, out, p.bad, p.counted, like)


def _scatter_filled(ops: Any, v: Any, rows: Any, like: Any, fill: Any) -> Any:
    """Per-row values into the padded token array, ``fill`` where no row is."""
    placed = scatter_rows(ops, v, rows, like)
    if isinstance(fill, float) and fill == 0.0 or fill is False:
        return placed
    there = scatter_rows(ops, ops.true_like(v), rows, like)
    return ops.where(there, placed, fill)
