"""``pool``: one vector per sequence from per-step hidden states, over the steps that count."""

from __future__ import annotations

from typing import Any

from . import _checks, _dispatch
from ._checks import fmt_shape, position, shape_error
from ._errors import XSeqLossError, XSeqLossTypeError, keep_type_when_compiled

METHODS = ("last", "first", "mean", "max")


@keep_type_when_compiled
def pool(hidden: Any, *, layout: str = "NTH", lengths: Any = None, mask: Any = None, method: str = "last",
         validate: bool = True, backend: str | None = None) -> Any:
    """Pool (N, T, H) hidden states to (N, H) over the counted steps of each sequence.

    "last" takes the last counted step (not index -1, which in a padded batch is padding), "first" the
    first; "mean" and "max" reduce over counted steps. A sequence with no counted step gives zeros.
    Steps that do not count never leak into the result or its gradient, even when they hold NaN.

    >>> import numpy as np, xseqloss as xsl
    >>> h = np.arange(6.0).reshape(1, 3, 2)        # steps [0,1], [2,3], [4,5]
    >>> xsl.pool(h, lengths=np.array([2])).tolist()  # last real step, not the padding at index 2
    [[2.0, 3.0]]
    """
    layout = _checks.parse_layout(layout, "layout", letters="NTH", required="NTH")
    method = _checks.choice(method, "method", METHODS)
    be, h = _dispatch.resolve(hidden, backend)
    if be.kind(h) != "f":
        raise XSeqLossTypeError(f"hidden must have a floating dtype, got {be.dtype_name(h)}")
    shape = be.shape(h)
    if len(shape) != 3:
        raise XSeqLossError(f"hidden has shape {fmt_shape(shape)} but layout={layout!r} needs 3 axes")
    h = be.moveaxis(h, layout.index("N"), 0) if layout.index("N") != 0 else h
    rest = [a for a in layout if a != "N"]
    if rest[0] != "T":
        h = be.moveaxis(h, 2, 1)
    N, T, H = be.shape(h)
    steps = None
    if mask is not None:
        mask = _dispatch.side(be, mask, "mask", h)
        ml = "".join(a for a in layout if a != "H")
        want = tuple(shape[layout.index(a)] for a in ml)
        if not _checks.same_shape(be.shape(mask), want):
            raise shape_error("mask", be.shape(mask), want, ml)
        steps = be.nonzero(mask)
        if ml != "NT":
            steps = be.moveaxis(steps, 1, 0)
    if lengths is not None:
        lengths = _dispatch.side(be, lengths, "lengths", h)
        if be.kind(lengths) not in "iu":
            raise XSeqLossTypeError(f"lengths must have an integer dtype, got {be.dtype_name(lengths)}")
        if not _checks.same_shape(be.shape(lengths), (N,)):
            raise shape_error("lengths", be.shape(lengths), (N,), "N")
        lengths = be.index_dtype(lengths)
        if validate and not be.tracing(h) and be.any_true((lengths < 0) | (lengths > T)):
            arr = be.to_numpy(lengths)
            i = int(((arr < 0) | (arr > T)).nonzero()[0][0])
            raise XSeqLossError(f"lengths{position((i,))} = {arr[i]} is out of range: valid lengths are "
                                f"[0, {T}] (T = {T})")
    return be.run(_pool_core, method, h, steps, lengths)


def _pool_core(ops: Any, method: str, h: Any, steps: Any, lengths: Any) -> Any:
    """h: (N, T, H); steps: (N, T) bool or None; lengths: (N,) or None."""
    T = ops.dim(h, 1)
    counted = steps
    if lengths is not None:
        inside = ops.expand(ops.arange(T, like=lengths), 0) < ops.expand(lengths, 1)
        counted = inside if counted is None else (counted & inside)
    if counted is None:
        counted = ops.true_like(ops.drop_class(h, 2))
    has = ops.expand(ops.any(counted, 1), 1)
    safe = ops.where(ops.expand(counted, 2), h, 0.0)  # steps that do not count never reach the result
    if method in ("last", "first"):
        n = ops.count(counted, 1)  # integer, on h's device: the index type for arange
        t = ops.expand(ops.arange(T, like=lengths if lengths is not None else n), 0)
        if method == "last":
            idx = ops.max(ops.where(counted, t, -1), 1)
        else:
            idx = ops.min(ops.where(counted, t, T), 1)
        idx = ops.where((idx < 0) | (idx >= T), 0, idx)
        return ops.where(has, ops.pick_step(safe, idx), 0.0)
    if method == "mean":
        n = ops.count(counted, 1)
        n = ops.cast(ops.where(n > 0, n, 1), ops.dtype(h))
        return ops.where(has, ops.sum(safe, 1) / ops.expand(n, 1), 0.0)
    best = ops.max(ops.where(ops.expand(counted, 2), h, -float("inf")), 1)
    return ops.where(has, best, 0.0)
