"""TensorFlow's ragged inputs (API.md 7.1): ``tf.RaggedTensor`` logits as the (R, C) rows of the
padded batch they mean (``core.ragged.Converted``); side arrays ragged or padded."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ..._errors import XSeqLossError
from ...core.ragged import FILL, Converted
from ...core.sides import side



class TensorflowRagged:
    def ragged_rows(self, kind: str, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict,
                    reduction: str) -> Converted:
        return _tf_ragged(self, logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)

    def ragged_stand_in(self, kind: str, targets: Any) -> Any:
        return tf.RaggedTensor.from_row_splits(tf.zeros([tf.shape(targets.flat_values)[0], 1]), targets.row_splits)


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
    if lengths is not None:
        tf.debugging.assert_equal(tf.cast(side(be, lengths, "lengths", data), lens.dtype), lens,
                                  message="lengths differ from the RaggedTensor logits' row lengths")

    def padded(name: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tf.RaggedTensor):
            if tf.executing_eagerly() and not bool(tf.reduce_all(tf.equal(value.row_lengths(), lens))):
                raise XSeqLossError(f"{name} has row lengths {value.row_lengths().numpy().tolist()} but the "
                                    f"RaggedTensor logits have {lens.numpy().tolist()}: the same row lengths "
                                    f"are required")
            if name == "targets" and value.flat_values.dtype.is_floating:
                return value.flat_values
            return value.to_tensor(default_value=FILL.get(name),
                                   shape=tf.stack([N, T]) if n_static is None else None)
        v = side(be, value, name, data)
        return v

    y = padded("targets", targets)
    out_sides = {k: padded(k, v) for k, v in sides.items()}
    real = tf.sequence_mask(lens, T)
    m = out_sides.get("mask")
    out_sides["mask"] = real if m is None else (real & be.nonzero(m))

    def restore(r: Any) -> Any:
        if reduction != "none":
            return r
        return tf.RaggedTensor.from_row_splits(tf.gather(tf.reshape(r, [-1]), rows), splits)

    return Converted(data, y, out_sides, "NTC", rows=rows, padded=(n_static, None), restore=restore,
                     restore_grad=lambda g: g)


