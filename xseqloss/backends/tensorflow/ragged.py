"""TensorFlow's ragged inputs (API.md 7.1): ``tf.RaggedTensor`` logits as the (R, C) rows of the
padded batch they mean (``core.ragged.Converted``); side arrays ragged or padded.

Row partitions that differ from the logits' (a ragged ``targets``, ``mask``, ``weights`` or
``segment_ids`` with other row lengths, ``lengths`` that contradict the rows, a padded side array
of another shape) are our error where they can be read: eagerly, or at trace time where they are
static. Inside a ``tf.function`` whose row lengths are known only when it runs, the comparison is
part of the program and a mismatch marks every token NaN (decisions.md item 70): never a finite
loss against the wrong targets."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ..._errors import XSeqLossError
from ...core.ragged import FILL, Converted
from ...core.sides import side
from ...plan.messages import fmt_shape


class TensorflowRagged:
    def ragged_rows(self, kind: str, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict,
                    reduction: str) -> Converted:
        return _tf_ragged(self, logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)

    def ragged_stand_in(self, kind: str, targets: Any) -> Any:
        return tf.RaggedTensor.from_row_splits(tf.zeros([tf.shape(targets.flat_values)[0], 1]), targets.row_splits)


def _known(x: Any) -> Any:
    """The value of ``x`` as a NumPy array where it can be read now (eagerly, or a constant under
    tracing), else None."""
    if tf.executing_eagerly():
        return x.numpy()
    return tf.get_static_value(x)


def _row_lengths(r: Any) -> Any:
    """A RaggedTensor's row lengths as a NumPy array where they can be read now (from its row
    splits: a constant's splits are static under tracing, its row_lengths() op is not), else None."""
    s = _known(r.row_splits)
    return None if s is None else np.diff(s)


def _same_rows(what: str, got: Any, got_known: Any, lens: Any, lens_known: Any) -> Any:
    """Whether the row lengths ``got`` equal the logits' ``lens`` (``*_known``: their values where
    they can be read now, else None): our error where both can be read (``what`` starts the
    message); else a scalar bool tensor computed when the traced program runs (a different number
    of rows is False, not a shape error)."""
    if got_known is not None and lens_known is not None:
        if got_known.shape != lens_known.shape or not np.array_equal(got_known, lens_known):
            raise XSeqLossError(f"{what} {got_known.tolist()} but the RaggedTensor logits have "
                                f"{lens_known.tolist()}: the same row lengths are required")
        return None
    n_got, n_lens = got.shape[0], lens.shape[0]
    if n_got is not None and n_lens is not None and n_got != n_lens:
        raise XSeqLossError(f"{what} given for {n_got} rows but the RaggedTensor logits have {n_lens} rows: "
                            f"the same row lengths are required")
    got = tf.cast(got, lens.dtype)
    return tf.cond(tf.equal(tf.size(got), tf.size(lens)),
                   lambda: tf.reduce_all(tf.equal(got, lens)), lambda: tf.constant(False))


def _tf_ragged(be: Any, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
    if logits.ragged_rank != 1 or logits.shape.rank != 3:
        raise XSeqLossError(f"RaggedTensor logits must be (N, None, C) with one ragged axis, got shape "
                            f"{logits.shape} with ragged_rank {logits.ragged_rank}")
    data = logits.flat_values
    splits = logits.row_splits
    lens = logits.row_lengths()
    N = tf.shape(splits, out_type=splits.dtype)[0] - 1
    T = tf.reduce_max(tf.concat([lens, tf.zeros([1], lens.dtype)], 0))
    seq = logits.value_rowids()
    rows = seq * T + (tf.range(tf.shape(data, out_type=seq.dtype)[0], dtype=seq.dtype) - tf.gather(splits, seq))
    n_static = logits.shape[0]
    lens_known = _row_lengths(logits)
    checks = []  # traced comparisons: all true, or every token is marked NaN
    if lengths is not None:
        lv = side(be, lengths, "lengths", data)
        if not lv.dtype.is_integer:
            lv = None  # prepare_call's dtype error names it
        ok = None if lv is None else _same_rows("lengths are", lv, _known(lv), lens, lens_known)
        if ok is not None:
            checks.append(ok)

    def padded(name: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tf.RaggedTensor):
            ok = None if value.row_splits is splits else _same_rows(  # the logits' own splits: nothing to compare
                f"{name} has row lengths", value.row_lengths(), _row_lengths(value), lens, lens_known)
            if ok is not None:
                checks.append(ok)
            if name == "targets" and value.flat_values.dtype.is_floating:
                return value.flat_values
            out = value.to_tensor(default_value=FILL.get(name), shape=tf.stack([N, T]))
            out.set_shape([n_static, None])
            return out
        v = side(be, value, name, data)
        _padded_shape(name, v, lens_known, n_static)
        return v

    y = padded("targets", targets)
    out_sides = {k: padded(k, v) for k, v in sides.items()}
    real = tf.sequence_mask(lens, T)
    m = out_sides.get("mask")
    if checks:  # traced, lengths unknown until run time: a mismatch marks every token (lengths -1)
        ok = tf.reduce_all(tf.stack(checks))
        out_sides["lengths"] = tf.where(ok, lens, -tf.ones_like(lens))
        m = None if m is None else (be.nonzero(m) | ~ok)  # a mismatched mask must not hide a token
    out_sides["mask"] = real if m is None else (real & be.nonzero(m))

    def restore(r: Any) -> Any:
        if reduction != "none":
            return r
        return tf.RaggedTensor.from_row_splits(tf.gather(tf.reshape(r, [-1]), rows), splits)

    return Converted(data, y, out_sides, "NTC", rows=rows, padded=(n_static, None), restore=restore,
                     restore_grad=lambda g: g)


def _padded_shape(name: str, v: Any, lens_known: Any, n_static: Any) -> None:
    """A padded side array (or padded index targets) of RaggedTensor logits is (N, T), T the
    longest row: our error where the shapes can be read (soft padded targets are (N, T, C))."""
    shape = tuple(v.shape)
    if name == "targets" and v.dtype.is_floating:
        return  # soft targets of ragged logits are rows; prepare_call's shape check names them
    if lens_known is None:
        want = (n_static, None)
    else:
        want = (len(lens_known), int(lens_known.max(initial=0)))
    if len(shape) != 2 or any(w is not None and g is not None and g != w for g, w in zip(shape, want)):
        raise XSeqLossError(f"{name} has shape {fmt_shape(shape)} but the RaggedTensor logits mean the padded batch "
                            f"{fmt_shape(want, 'NT')} (N rows, T = the longest row); give {name} as a RaggedTensor "
                            f"with the logits' row lengths, or padded to (N, T)")
