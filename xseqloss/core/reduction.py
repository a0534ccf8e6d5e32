"""Reductions and denominators, written once (API.md sections 1 and 7.3).

``coef_and_finish(...)`` returns the coefficient d result / d (weighted token loss) per token, known before
any loss is computed (so a fused kernel folds it into the gradient it forms in its forward pass),
and ``finish(out)``, which turns the weighted per-token losses into the result. The denominators
never depend on the losses.
"""

from __future__ import annotations

from typing import Any, Callable

from ..plan.call_plan import CallPlan


def _axes(tok: str, letters: str) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(tok) if a in letters)


def _sum(ops: Any, x: Any, axes: tuple[int, ...] | None) -> Any:
    """Sum over ``axes`` (None: all, giving a scalar; (): none, the identity)."""
    return x if axes == () else ops.sum(x, axes)


def inverse(ops: Any, den: Any) -> tuple[Any, Any]:
    """(1/den, or 0 where den == 0; den == 0): the gradient through an empty denominator is exactly 0."""
    zero = den == 0
    return ops.where(zero, 0.0, 1.0 / ops.where(zero, 1.0, den)), zero


def divide(ops: Any, num: Any, inv: Any, zero: Any, empty: str) -> Any:
    """num / den from ``inverse``'s output, with the empty rule where den == 0."""
    out = num * inv
    return ops.where(zero, float("nan"), out) if empty == "nan" else out


def denominator_weights(ops: Any, st: CallPlan, y: Any, counted: Any, w: Any, cw: Any, cwy: Any = None) -> Any:
    """W[n, t]: weights * cw[y] at counted tokens (soft targets: weights only); None = all ones.
    ``cwy``: cw[y] already gathered (classes split across workers: from the worker holding y)."""
    if st.opts.denominator != "weights":
        return None
    W = w
    if cw is not None and not st.soft:
        cwy = ops.take(cw, y) if cwy is None else cwy
        W = cwy if W is None else W * cwy
    if W is not None and counted is not None:
        W = ops.where(counted, W, 0.0)
    return W


def per_token_den(ops: Any, st: CallPlan, W: Any, counted: Any, pos: Any, like: Any, acc: Any) -> Any:
    """What each token adds to the denominator: W ("weights"), 1 where it counts ("tokens"), 1 where
    it is a position ("positions": every step, or with shift / segment_ids the steps whose target
    exists in the same sequence and document), in the accumulation dtype."""
    d = st.opts.denominator
    if d == "weights" and W is not None:
        return W
    flags = counted if d != "positions" else pos
    return ops.full_tokens(like, 1.0, acc) if flags is None else ops.cast(flags, acc)


def _den(ops: Any, st: CallPlan, W: Any, counted: Any, pos: Any, like: Any, axes: tuple[int, ...] | None,
         acc: Any) -> Any:
    """The denominator summed over ``axes`` of the token array (None: all). Counts are integers,
    cast to the accumulation dtype only for the division."""
    d = st.opts.denominator
    if d == "weights" and W is not None:
        return _sum(ops, W, axes)
    flags = counted if d != "positions" else pos
    if flags is None:
        flags = ops.true_like(like)
    if axes == ():  # per token (torch would read dim=() as every dim)
        return ops.cast(flags, acc)
    return ops.cast(ops.count(flags, axes), acc)


# ---------------------------------------------------------------------- documents: "NT" orientation

def _nt(ops: Any, tok: str, x: Any) -> Any:
    """A token-shaped array as (N, T) rows of sequences (N of size 1 without an N axis)."""
    if tok == "T":
        return ops.expand(x, 0)
    return ops.moveaxis(x, 0, 1) if tok == "TN" else x


def _from_nt(ops: Any, tok: str, x: Any) -> Any:
    if tok == "T":
        return x[0]
    return ops.moveaxis(x, 1, 0) if tok == "TN" else x


def coef_and_finish(ops: Any, st: CallPlan, *, like: Any, counted: Any, W: Any, pos: Any, docs: Any, normalizer: Any,
         acc: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(coef, finish): coef broadcasts against the token shape (a Python 1.0 when it is 1);
    finish(out) gives the result from the weighted per-token losses ``out`` (0 where not counted).
    ``docs``: (document index per token, documents per sequence) for the segment reductions."""
    o = st.opts
    tok, red = o.tok_layout, o.reduction
    if red == "none":
        return 1.0, lambda out: out
    if red == "sum":
        return 1.0, lambda out: ops.sum(out, None)
    if red == "mean":
        D = normalizer if normalizer is not None else _den(ops, st, W, counted, pos, like, None, acc)
        inv, zero = inverse(ops, D)
        return inv, lambda out: divide(ops, ops.sum(out, None), inv, zero, o.empty)
    if red in ("per_segment", "segment_mean"):
        return _segments(ops, st, like=like, counted=counted, W=W, pos=pos, docs=docs, normalizer=normalizer,
                         acc=acc)
    over = "T" if red in ("per_sequence", "sequence_mean") else "N"
    axes = _axes(tok, over)
    inv, zero = inverse(ops, _den(ops, st, W, counted, pos, like, axes, acc))
    coef = ops.expand(inv, tok.index(over)) if axes else inv
    if red != "sequence_mean":
        return coef, lambda out: divide(ops, _sum(ops, out, axes), inv, zero, o.empty)
    n_seq = normalizer if normalizer is not None else ops.cast(ops.dim(like, tok.index("N")), acc)
    inv2, zero2 = inverse(ops, n_seq)

    def finish(out: Any) -> Any:
        per_seq = divide(ops, _sum(ops, out, axes), inv, zero, o.empty)
        return divide(ops, ops.sum(per_seq, None), inv2, zero2, o.empty)
    return coef * inv2, finish


def _segments(ops: Any, st: CallPlan, *, like: Any, counted: Any, W: Any, pos: Any, docs: Any, normalizer: Any,
              acc: Any) -> tuple[Any, Callable[[Any], Any]]:
    """"per_segment": entry [n, j] the mean loss of the j-th document of sequence n over its
    denominator (0 past the last document); "segment_mean": the mean over documents of those means
    (every document weighs the same), ``normalizer`` replacing the number of documents."""
    o = st.opts
    tok = o.tok_layout
    j, ndocs = docs
    j, ndocs = _nt(ops, tok, j), (ops.expand(ndocs, 0) if tok == "T" else ndocs)
    exists = ops.expand(ops.arange(ops.dim(j, 1), like=j), 0) < ops.expand(ndocs, 1)  # (N, T): doc slots
    jj = ops.where(j >= 0, j, 0)  # padding: any slot, its tokens never count
    den = ops.segment_sum(_nt(ops, tok, per_token_den(ops, st, W, counted, pos, like, acc)), jj)
    inv, zero = inverse(ops, den)
    coef = _from_nt(ops, tok, ops.gather_along(inv, jj, 1))
    inv2 = zero2 = None
    if o.reduction == "segment_mean":
        n_docs = normalizer if normalizer is not None else ops.cast(ops.sum(ndocs, None), acc)
        inv2, zero2 = inverse(ops, n_docs)
        coef = coef * inv2

    def finish(out: Any) -> Any:
        num = ops.segment_sum(_nt(ops, tok, out), jj)
        per_doc = ops.where(exists, divide(ops, num, inv, zero, o.empty), 0.0)
        if o.reduction == "per_segment":
            return _from_nt(ops, tok, per_doc)
        return divide(ops, ops.sum(per_doc, None), inv2, zero2, o.empty)
    return coef, finish


def default_native(st: CallPlan, n: int) -> str:
    """The reduction a backend's own kernel applies in the default call (``CallPlan.default_call``,
    ``Backend.default_token_loss``): "none", "sum", or "mean", its mean over the ``n`` counted
    tokens, which is the core's mean when n > 0 (a framework's cross-entropy with ``ignore_index``
    and no weights divides by exactly that count). The empty mean is taken as "sum" (0) and
    finished by ``default``."""
    r = st.opts.reduction
    return "sum" if r == "mean" and n == 0 else r


def default(ops: Any, st: CallPlan, l: Any, n: int) -> Any:
    """The default call's result from ``l``, what the kernel's ``default_native`` reduction gave
    (``n``: the counted tokens, on the host: the default call runs eagerly): ``l`` itself, or for
    an empty mean the ``empty`` rule, 0 or NaN with exactly 0 gradient. The same rule as
    ``coef_and_finish``, without the token weights the default call does not have."""
    if st.opts.reduction == "mean" and n == 0:
        return l * 0.0 + (float("nan") if st.opts.empty == "nan" else 0.0)
    return l


def default_coef(st: CallPlan, n: int) -> float:
    """d result / d l of each counted token in the default call (a kernel that forms the gradient)."""
    return (1.0 / n if n > 0 else 0.0) if st.opts.reduction == "mean" else 1.0
