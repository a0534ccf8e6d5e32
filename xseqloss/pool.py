"""``pool``: one vector per sequence from per-step hidden states, over the steps that count."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.compiled import keep_type_when_compiled
from .api import ragged as _ragged
from .core.ragged import check_lengths
from .core.sides import side
from .plan.messages import fmt_shape, position, same_shape, shape_error
from .plan.options import choice, parse_layout

METHODS = ("last", "first", "mean", "max", "attention")


@keep_type_when_compiled
def pool(hidden: Any, *, layout: str = "NTH", lengths: Any = None, mask: Any = None, method: str = "last",
         scores: Any = None, validate: bool = True, backend: str | None = None) -> Any:
    """Pool (N, T, H) hidden states to (N, H) over the counted steps of each sequence.

    "last" takes the last counted step (not index -1, which in a padded batch is padding), "first" the
    first; "mean" and "max" reduce over counted steps; "attention" takes the weighted sum with the
    softmax of ``scores`` (N, T) over the counted steps. A sequence with no counted step gives zeros.
    Steps that do not count never leak into the result or its gradient, even when they (or their
    scores) hold NaN. ``hidden`` may also be a list of (length, H) arrays or a PyTorch
    PackedSequence (``scores`` then a list of (length,) arrays or padded): the padded batch with
    ``lengths`` it means.

    >>> import numpy as np, xseqloss as xsl
    >>> h = np.arange(6.0).reshape(1, 3, 2)        # steps [0,1], [2,3], [4,5]
    >>> xsl.pool(h, lengths=np.array([2])).tolist()  # last real step, not the padding at index 2
    [[2.0, 3.0]]
    >>> xsl.pool([h[0, :2]], method="attention", scores=[np.array([0.0, np.log(3.0)])]).tolist()  # 1/4, 3/4
    [[1.5, 2.5]]
    """
    layout = parse_layout(layout, "layout", letters="NTH", required="NTH")
    method = choice(method, "method", METHODS)
    if (scores is None) != (method != "attention"):
        raise XSeqLossError('method="attention" needs scores (N, T), and scores mean nothing to the other '
                            f'methods; got method={method!r} with scores={"None" if scores is None else "given"}')
    hidden, scores, lengths, layout = _ragged_pool(hidden, scores, lengths, layout, backend)
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
    ml = "".join(a for a in layout if a != "H")
    want = tuple(shape[layout.index(a)] for a in ml)
    if mask is not None:
        mask = side(be, mask, "mask", h)
        if not same_shape(be.shape(mask), want):
            raise shape_error("mask", be.shape(mask), want, ml)
        steps = be.nonzero(mask)
        if ml != "NT":
            steps = be.moveaxis(steps, 1, 0)
    if scores is not None:
        scores = side(be, scores, "scores", h)
        if be.kind(scores) != "f":
            raise XSeqLossTypeError(f"scores must have a floating dtype, got {be.dtype_name(scores)}")
        if not same_shape(be.shape(scores), want):
            raise shape_error("scores", be.shape(scores), want, ml)
        if ml != "NT":
            scores = be.moveaxis(scores, 1, 0)
    if lengths is not None:
        lengths = side(be, lengths, "lengths", h)
        if be.kind(lengths) not in "iu":
            raise XSeqLossTypeError(f"lengths must have an integer dtype, got {be.dtype_name(lengths)}")
        if not same_shape(be.shape(lengths), (N,)):
            raise shape_error("lengths", be.shape(lengths), (N,), "N")
        lengths = be.index_dtype(lengths)
        if validate and not be.tracing(h) and be.any_true((lengths < 0) | (lengths > T)):
            arr = be.to_numpy(lengths)
            i = int(((arr < 0) | (arr > T)).nonzero()[0][0])
            raise XSeqLossError(f"lengths{position((i,))} = {arr[i]} is out of range: valid lengths are "
                                f"[0, {T}] (T = {T})")
    return be.run(_pool_core, method, h, steps, lengths, scores)


def _ragged_pool(hidden: Any, scores: Any, lengths: Any, layout: str, backend: Any) -> tuple[Any, Any, Any, str]:
    """A list of (length, H) arrays or a PackedSequence as the padded batch with lengths ("NTH")."""
    kind = _ragged.kind_of(hidden)
    for arg, k in (("hidden", kind), ("scores", _ragged.kind_of(scores))):
        if k in ("nested", "ragged"):
            what, how = (("a PyTorch nested tensor", f"{arg}.to_padded_tensor(0.0) with lengths=<each sequence's "
                          f"length>") if k == "nested" else
                         ("a tf.RaggedTensor", f"{arg}.to_tensor() with lengths={arg}.row_lengths()"))
            raise XSeqLossTypeError(f"pool: {arg} is {what}, which pool does not take; pass the padded batch "
                                    f"({how}), a list of per-sequence arrays, or a PackedSequence")
    if kind == "packed":
        h, scores, lens = _dispatch.load("torch").padded_hidden(hidden, scores, lengths)
        return h, scores, lens, "NTH"
    if isinstance(hidden, (list, tuple)):
        be, first = _dispatch.resolve(hidden[0] if hidden else np.zeros((0, 0)), backend)
        items = [side(be, v, f"hidden[{i}]", first) for i, v in enumerate(hidden)]
        lens = [int(be.shape(v)[0]) for v in items]
        T = max(lens + [0])
        h = be.pad_stack(items, T, 0.0)
        if isinstance(scores, (list, tuple)):
            got = [int(be.shape(side(be, v, "scores", first))[0]) for v in scores]
            if got != lens:
                raise XSeqLossError(f"scores is a list with lengths {got} but hidden has lengths {lens}")
            scores = be.pad_stack([side(be, v, f"scores[{i}]", first) for i, v in enumerate(scores)],
                                  T, 0.0)
        check_lengths(lengths, lens, be, "list of hidden states")
        return h, scores, np.asarray(lens, np.int64), "NTH"
    return hidden, scores, lengths, layout


def _pool_core(ops: Any, method: str, h: Any, steps: Any, lengths: Any, scores: Any = None) -> Any:
    """h: (N, T, H); steps: (N, T) bool or None; lengths: (N,) or None; scores: (N, T) or None."""
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
    if method == "attention":  # softmax over the counted steps; padding scores (NaN too) never reach it
        s = ops.where(counted, ops.cast(scores, ops.dtype(h)), -float("inf"))
        m = ops.stop_gradient(ops.max(s, 1))
        m = ops.where(m == -float("inf"), 0.0, m)
        e = ops.where(counted, ops.exp(s - ops.expand(m, 1)), 0.0)
        tot = ops.sum(e, 1)
        a = e / ops.expand(ops.where(tot > 0, tot, 1.0), 1)
        return ops.where(has, ops.sum(safe * ops.expand(a, 2), 1), 0.0)
    best = ops.max(ops.where(ops.expand(counted, 2), h, -float("inf")), 1)
    return ops.where(has, best, 0.0)
