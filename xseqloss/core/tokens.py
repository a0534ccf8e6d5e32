"""Which tokens count, written once (API.md sections 1 and 7): ``mask``, ``lengths`` and
``ignore_index``, the causal ``shift`` and packed documents (``segment_ids``). Everything here is
token-shaped (the targets' shape, in ``st.opts.tok_layout`` order) and O(tokens): the logits are
never touched, so a shift never copies them.

* ``shift=k`` scores the logits at step t against the target at t + k: the target-side arrays
  (targets, mask, weights, soft targets) are moved k steps back along T (``shift_targets``), and a
  step is a position only when its target step exists (``positions``);
* ``segment_ids``: a document is a maximal run of equal ids along T within a sequence, a negative
  id is padding; with a shift a target never crosses a document boundary;
* ``lengths`` describe the sequence: a step counts only when t + k < lengths[n].
"""

from __future__ import annotations

from typing import Any

from ..plan.call_plan import CallPlan
from . import common


def _time(st: CallPlan) -> int:
    return st.opts.tok_layout.index("T")


def shift_targets(ops: Any, st: CallPlan, y: Any, t: Any, mask: Any, weights: Any) -> tuple[Any, Any, Any, Any]:
    """The target-side arrays at the logits' positions: x[.., t, ..] <- x[.., t + k, ..] along T,
    the last k steps filled with a value that never counts (no position exists there). Soft
    targets (logits-shaped) are shifted along the logits' T axis: a copy of the targets, never of
    the logits."""
    k = st.shift
    if not k:
        return y, t, mask, weights
    ta = _time(st)
    y = None if y is None else common.shift(ops, y, k, ta, 0)
    t = None if t is None else common.shift(ops, t, k, st.opts.layout.index("T"), 0.0)
    mask = None if mask is None else common.shift(ops, mask, k, ta, 0)
    weights = None if weights is None else common.shift(ops, weights, k, ta, 0)
    return y, t, mask, weights


def _steps(ops: Any, st: CallPlan, like: Any) -> Any:
    """The step index t (in like's dtype and device), broadcastable against the token shape."""
    tok, ta = st.opts.tok_layout, _time(st)
    T = ops.dim(like, ta)
    s = ops.arange(T, like=like)
    for a in range(len(tok)):
        if a != ta:
            s = ops.expand(s, a)  # (1, T) for "NT", (T, 1) for "TN"
    return s


def _starts(ops: Any, st: CallPlan, segs: Any) -> Any:
    """True where a run of equal ids begins (t = 0, or the id changed from the step before)."""
    ta = _time(st)
    prev = common.shift(ops, segs, -1, ta, 0)
    first = _steps(ops, st, segs) == 0
    return (segs != prev) | first


def documents(ops: Any, st: CallPlan, segs: Any) -> tuple[Any, Any]:
    """(per token the number of its document within its sequence, -1 on padding; per sequence the
    number of documents, with N's shape or () without N). A document is a maximal run of equal
    non-negative ids along T."""
    ta = _time(st)
    start = _starts(ops, st, segs) & (segs >= 0)
    j = ops.cumsum(ops.cast(start, ops.dtype(segs)), ta) - 1
    j = ops.where(segs >= 0, j, -1)
    return j, ops.count(start, ta)


def positions(ops: Any, st: CallPlan, segs: Any, like: Any) -> Any:
    """The positions that exist (bool, token-shaped, or None for all): a step whose target step
    (t + shift) exists in the same sequence and, with segment_ids, in the same document; padding
    (a negative segment id) is no position. This is the "positions" denominator's set."""
    k = st.shift
    pos = None
    if k:
        ta = _time(st)
        pos = (_steps(ops, st, like) < ops.dim(like, ta) - k) & ops.true_like(like)  # the token shape
    if segs is not None:
        same = segs >= 0
        if k:  # the same run at t and t + k: no id change in (t, t + k]
            ta = _time(st)
            run = ops.cumsum(ops.cast(_starts(ops, st, segs), ops.dtype(segs)), ta)
            same = same & (run == common.shift(ops, run, k, ta, -1))
        pos = same if pos is None else (pos & same)
    return pos


def counted(ops: Any, st: CallPlan, y: Any, mask: Any, lengths: Any, pos: Any, like: Any) -> tuple[Any, Any]:
    """Which tokens count (bool, token shape, or None for all) and which counted ones are bad (or
    None). ``y`` and ``mask`` are already shifted (``shift_targets``); ``pos`` from ``positions``.

    A sequence with a bad length (negative or > T, only possible when values are not validated) is
    counted whole, so that every one of its tokens shows the NaN.
    """
    tok = st.opts.tok_layout
    out = pos
    if mask is not None:
        m = ops.nonzero(mask)
        out = m if out is None else (out & m)
    bad = None
    if lengths is not None:
        na, ta = tok.index("N"), tok.index("T")
        T = ops.dim(like, ta)
        steps = ops.expand(ops.arange(T, like=lengths), na)
        inside = steps + st.shift < ops.expand(lengths, ta)
        if st.mark_nan:
            seq_bad = ops.expand((lengths < 0) | (lengths > T), ta) & (steps >= 0)  # broadcast to tokens
            inside = inside | seq_bad
            bad = seq_bad if pos is None else (seq_bad & pos)
        out = inside if out is None else (out & inside)
    if y is not None and not st.soft and st.ignore:  # token_stats may have no targets
        if len(st.ignore) == 1:
            kept = y != st.ignore[0]
        else:
            ignored = None
            for v in st.ignore:
                hit = y == v
                ignored = hit if ignored is None else (ignored | hit)
            kept = ~ignored
        out = kept if out is None else (out & kept)
    if bad is not None and out is not None:
        bad = bad & out
    return out, bad


def token_facts(ops: Any, st: CallPlan, y: Any, t: Any, mask: Any, lengths: Any, weights: Any, segs: Any,
                like: Any) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """(y, t, mask, weights) at the logits' positions, and (counted, bad, positions): one call for
    the core, the value checks and token_count alike."""
    y, t, mask, weights = shift_targets(ops, st, y, t, mask, weights)
    pos = positions(ops, st, segs, like)
    c, bad = counted(ops, st, y, mask, lengths, pos, like)
    return y, t, mask, weights, c, bad, pos
