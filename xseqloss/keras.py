"""``SequenceCrossEntropy``: ``xseqloss.sequence_cross_entropy`` as a Keras 3 loss, for ``model.compile`` and
``fit`` on every Keras backend (TensorFlow, JAX, PyTorch; NumPy for inference).

What it does differently from ``keras.losses.Loss`` (on purpose, see docs/porting.md):

* the Keras mask that layers attach to the predictions (``Embedding(mask_zero=True)`` and every layer that
  propagates it) becomes xseqloss's ``mask``; ``sample_weight`` becomes the token ``weights``;
* xseqloss's own ``reduction`` and ``denominator`` are used, not Keras's ``sum_over_batch_size`` (which
  divides by every position when there is no mask);
* integer labels stay integers: Keras's ``Loss.__call__`` converts ``y_true`` to the loss dtype (float32),
  which silently rounds class ids above 2**24 and turns a label bug into a float. Labels that Keras
  itself hands over as floats (float64 under ``MirroredStrategy``) are accepted when every value is an
  exact integer and converted back to integers; a non-integral value is an error (NaN when traced).

>>> import numpy as np
>>> import xseqloss.keras
>>> loss = xseqloss.keras.SequenceCrossEntropy(label_smoothing=0.1)
>>> cfg = loss.get_config()
>>> (cfg["label_smoothing"], cfg["reduction"], cfg["ignore_index"])
(0.1, 'mean', -100)
>>> type(xseqloss.keras.SequenceCrossEntropy.from_config(cfg)).__name__
'SequenceCrossEntropy'

Importing this module imports Keras (an explicit request); ``import xseqloss`` alone does not.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from ._errors import XSeqLossError, XSeqLossTypeError
from .loss import sequence_cross_entropy
from .plan.options import normalizer_reduction, number, parse_layout, parse_options, plain_ignore
from .plan.messages import fmt_shape

__all__ = ["SequenceCrossEntropy"]

# Keras backend name -> xseqloss backend name (Keras's NumPy backend computes with NumPy arrays).
_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}


def _keras_mask(x: Any) -> Any:
    """The mask Keras attached to ``x``, or None.

    Keras 3 keeps it in ``x._keras_mask`` where the tensor type allows attributes (TF, torch) and in a
    side table keyed by ``id(x)`` otherwise (JAX arrays and tracers); ``keras.src.backend.get_keras_mask``
    reads both. It is not public API, so an older or newer Keras falls back to the attribute.
    """
    try:
        from keras.src.backend import get_keras_mask
    except ImportError:  # pragma: no cover - other Keras 3 layouts
        return getattr(x, "_keras_mask", None)
    return get_keras_mask(x)


def _is_symbolic_placeholder(x: Any) -> bool:
    """torch-backend Keras builds the loss once on "meta" tensors (no values to check)."""
    device = getattr(x, "device", None)
    return getattr(device, "type", None) == "meta"


@keras.saving.register_keras_serializable(package="xseqloss")
class SequenceCrossEntropy(keras.losses.Loss):
    """Sequence cross-entropy as a ``keras.losses.Loss``; every option of ``sequence_cross_entropy``.

    ``model.compile(loss=SequenceCrossEntropy(...))`` and ``fit`` work on the TensorFlow, JAX and PyTorch
    backends (under ``tf.function`` with an unknown batch size, under ``jax.jit``, and eagerly). The call
    ``loss(y_true, y_pred, sample_weight=None)``:

    * ``y_pred``: the logits (``layout``, default "NTC", i.e. Keras's classes-last sequence outputs);
    * ``y_true``: integer class ids of the tokens' shape, never cast to float, or soft targets;
    * the Keras mask on ``y_pred`` (if any) -> ``mask``: padded steps do not count;
    * ``sample_weight`` -> ``weights``: tokens' shape (Keras's "temporal" sample weights), or fewer
      axes, which are broadcast over the trailing token axes as Keras does for per-sample weights
      (shape (N,) -> every token of sequence n gets weight s[n]).

    The result is xseqloss's ``reduction`` over its ``denominator``: with the defaults, a weighted mean
    over the tokens that count (sum of w * l / sum of w). Keras's own ``reduction`` argument does not
    exist here; to reproduce ``SparseCategoricalCrossentropy`` exactly use ``**xseqloss.presets.KERAS``.
    Under ``tf.distribute`` a local mean is scaled by 1 / replicas like Keras's losses (not when a
    global ``normalizer`` is given, which already makes the sum over replicas exact): exact only when
    every replica holds the same number of tokens. ``normalizer="global"`` divides each replica's
    sum by the count of the **global** batch (``xsl.global_token_count``, one all-reduce in the
    replica context), which is exact however the tokens fall (API.md 9.1; docs/distributed.md).

    Value checks (out-of-range labels) raise in eager mode; inside ``fit`` (traced on TF and JAX) a bad
    label gives a NaN loss instead, as everywhere in xseqloss.

    Args:
        layout, ignore_index, class_weights, inputs, label_smoothing, smoothing, z_loss, logit_softcap,
        reduction, denominator, normalizer, empty, num_classes, validate: as in
        ``xseqloss.sequence_cross_entropy`` (docs/semantics.md). ``class_weights`` is stored as a list.
        name: the loss name (Keras logs it).
        dtype: Keras's loss dtype policy; the result is cast to it.
    """

    def __init__(self, *, layout: str = "NTC", ignore_index: Any = -100, class_weights: Any = None,
                 inputs: str = "logits", label_smoothing: float = 0.0, smoothing: str = "uniform",
                 z_loss: float = 0.0, logit_softcap: float | None = None, reduction: str = "mean",
                 denominator: str = "weights", normalizer: float | str | None = None, empty: str = "zero",
                 num_classes: int | None = None, validate: bool = True, name: str = "sequence_cross_entropy",
                 dtype: Any = None, shift: int = 0, segments_in_targets: bool = False) -> None:
        opts = parse_options(layout=layout, ignore_index=ignore_index, inputs=inputs,
                                     label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss,
                                     logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
                                     empty=empty, num_classes=num_classes, validate=validate,
                                     inplace_backward=False, shift=shift)
        if not isinstance(segments_in_targets, bool):
            raise XSeqLossTypeError(f"segments_in_targets must be True or False, got {segments_in_targets!r}")
        if isinstance(normalizer, str):
            if normalizer != "global":
                raise XSeqLossError(f"normalizer={normalizer!r} is not valid: a number (a fixed denominator), "
                                    f"'global' (each batch's count over all replicas) or None")
            if opts.reduction not in ("mean", "sequence_mean", "segment_mean"):
                raise XSeqLossError(f"normalizer='global' divides by the count of the global batch, which only "
                                    f"reduction='mean', 'sequence_mean' or 'segment_mean' uses; got "
                                    f"reduction={opts.reduction!r}")
        elif normalizer is not None:
            normalizer_reduction(opts.reduction)
            normalizer = number(normalizer, "normalizer", 0.0)
        # Keras's base class only knows its own reductions; ours is kept in self.reduction after it.
        super().__init__(name=name, reduction="none", dtype=dtype)
        self.reduction = reduction
        self.layout = layout
        ig = plain_ignore(ignore_index)
        self.ignore_index = list(ig) if isinstance(ig, tuple) else ig  # JSON-serialisable
        self.class_weights = _class_weights(class_weights, opts.num_classes)
        self.inputs = inputs
        self.label_smoothing = float(label_smoothing)
        self.smoothing = smoothing
        self.z_loss = float(z_loss)
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        self.denominator = denominator
        self.normalizer = normalizer
        self.empty = empty
        self.num_classes = opts.num_classes
        self.validate = validate
        self.shift = opts.shift
        self.segments_in_targets = segments_in_targets

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None, segment_ids: Any = None) -> Any:
        mask = _keras_mask(y_pred)  # read before any conversion creates a new tensor without it
        with keras.name_scope(self.name):
            if _is_ragged(y_pred) or _is_ragged(y_true):  # TensorFlow RaggedTensors go to xseqloss as they are
                opts = self._options()
                opts.update(validate=self.validate, shift=self.shift, segment_ids=segment_ids)
                loss = sequence_cross_entropy(y_pred, y_true, mask=mask, **opts)
                return ops.cast(loss, self.dtype)
            y_pred = ops.convert_to_tensor(y_pred)  # keeps its dtype
            y_true = ops.convert_to_tensor(y_true)  # keeps its dtype: integer labels are never cast to float
            y_true = self._float_class_ids(y_true, y_pred)
            if self.segments_in_targets:  # (.., 2) integer targets: [.., 0] class ids, [.., 1] segment ids
                segment_ids, y_true = y_true[..., 1], y_true[..., 0]
            soft = "float" in keras.backend.standardize_dtype(y_true.dtype)
            weights = None
            if sample_weight is not None:
                weights = self._token_weights(ops.convert_to_tensor(sample_weight), y_true, y_pred, soft)
            if mask is not None:
                mask = ops.convert_to_tensor(mask)
            opts = self._options()
            opts["validate"] = self.validate and not _is_symbolic_placeholder(y_pred)
            if self.normalizer == "global":
                opts["normalizer"] = self._global_count(y_true, mask, weights, segment_ids, opts)
            loss = sequence_cross_entropy(y_pred, y_true, mask=mask, weights=weights, shift=self.shift,
                                          segment_ids=segment_ids, **opts)
            if self.reduction in ("mean", "sequence_mean") and self.normalizer is None:
                loss = _scale_for_distribution(loss)
            return ops.cast(loss, self.dtype)

    def _global_count(self, y_true: Any, mask: Any, weights: Any, segment_ids: Any, opts: dict) -> Any:
        """normalizer="global": the denominator of this batch summed over the replicas (inside a
        ``tf.distribute`` replica context one all-reduce; elsewhere the batch is the global one), so
        the replicas' losses sum to the global mean and Keras's summed gradients are exact."""
        from . import distributed
        from ._dispatch import load
        from .loss import segment_count, token_count
        common = dict(layout=self.layout, backend=opts["backend"])
        # Keras on PyTorch without torch.distributed: one process, whose batch is the global one
        alone = opts["backend"] is not None and not load(opts["backend"]).workers_ready()
        if self.reduction == "segment_mean":
            return (segment_count if alone else distributed.global_segment_count)(segment_ids, **common)
        if self.reduction == "sequence_mean":  # every row of the batch axis counts (API.md 1)
            return int(ops.shape(y_true)[self.layout.replace("C", "").index("N")]) if alone else \
                distributed.global_sequence_count(y_true, **common)
        return (token_count if alone else distributed.global_token_count)(
            y_true, mask=mask, weights=weights, ignore_index=self.ignore_index, class_weights=opts["class_weights"],
            denominator=self.denominator, shift=self.shift, segment_ids=segment_ids, num_classes=self.num_classes,
            validate=opts["validate"], **common)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-token losses (reduction "none"), for code that calls ``Loss.call`` directly."""
        opts = {**self._options(), "reduction": "none", "normalizer": None, "shift": self.shift}
        y_pred = ops.convert_to_tensor(y_pred)
        return sequence_cross_entropy(y_pred, self._float_class_ids(ops.convert_to_tensor(y_true), y_pred), **opts)

    def _float_class_ids(self, y_true: Any, y_pred: Any) -> Any:
        """Class ids that Keras handed over as floats, back to integers; anything else unchanged.

        Keras casts labels to a float type on some paths (under ``MirroredStrategy`` its TensorFlow
        trainer builds the compiled loss on the replicas' MEAN of the first batch: float64 labels;
        a NumPy ``y`` of floats goes through as it is). Floating labels with the tokens' shape (one
        axis fewer than the logits; with ``segments_in_targets`` the (.., 2) pairs) are class ids:
        accepted when every value is an exact integer in the label dtype's range and converted to
        it (never rounded). Otherwise, with concrete values (eager, ``validate=True``), an
        XSeqLossError names the first bad value; traced (inside ``fit``), or with ``validate=False``,
        a bad value becomes an invalid label, so the loss is NaN as for any bad label. xseqloss
        never casts labels to a float type; soft targets (the logits' shape) are not touched."""
        if "float" not in keras.backend.standardize_dtype(y_true.dtype) or _is_ragged(y_true):
            return y_true
        rank, zrank = len(y_true.shape), len(y_pred.shape)
        if rank != (zrank if self.segments_in_targets else zrank - 1):
            return y_true  # soft targets (or a shape error that xseqloss reports)
        from ._dispatch import load
        be = load(self._options()["backend"])
        lo, hi = be.index_limits() or (-(2 ** 63), 2 ** 63 - 1)
        # [lo, end): beyond 2**53 a float64 is not a single integer; `end` is exact in float32 too
        lo, end = max(lo, -(2 ** 53)), min(hi + 1, 2 ** 53)
        whole = ops.logical_and(ops.equal(ops.floor(y_true), y_true),
                                ops.logical_and(ops.greater_equal(y_true, float(lo)), ops.less(y_true, float(end))))
        if self.validate and not be.tracing(y_true) and not _is_symbolic_placeholder(y_true):
            ok = np.asarray(ops.convert_to_numpy(whole))
            if not ok.all():
                at = tuple(int(i) for i in np.argwhere(~ok)[0])
                value = float(np.asarray(ops.convert_to_numpy(y_true))[at])
                note = (" (segments_in_targets: [.., 0] class ids, [.., 1] segment ids)"
                        if self.segments_in_targets else "")
                raise XSeqLossError(
                    f"targets[{', '.join(map(str, at))}] = {value!r} is not an exact integer{note}: floating "
                    f"labels of the tokens' shape (as Keras hands them over, e.g. float64 under "
                    f"MirroredStrategy) are class ids and must be whole numbers in [{lo}, {end}); they are "
                    f"converted to integers, never rounded")
        else:  # traced: a bad value -> a label that is neither a class nor ignored (NaN loss)
            ig = self.ignore_index
            ignored = [] if ig is None else (list(ig) if isinstance(ig, (list, tuple)) else [ig])
            sentinel = min([-1, *ignored]) - 1
            y_true = ops.where(whole, y_true, ops.cast(sentinel, y_true.dtype))
        return be.index_dtype(y_true)

    def _options(self) -> dict[str, Any]:
        backend = _BACKENDS.get(keras.backend.backend())
        if backend is None:
            raise XSeqLossError(f"xseqloss has no backend for the Keras backend {keras.backend.backend()!r}; "
                                f"supported: {sorted(_BACKENDS)}")
        return dict(layout=self.layout, ignore_index=self.ignore_index,
                    class_weights=None if self.class_weights is None else np.asarray(self.class_weights),
                    inputs=self.inputs, label_smoothing=self.label_smoothing, smoothing=self.smoothing,
                    z_loss=self.z_loss, logit_softcap=self.logit_softcap, reduction=self.reduction,
                    denominator=self.denominator, normalizer=self.normalizer, empty=self.empty,
                    num_classes=self.num_classes, validate=self.validate,
                    backend=backend)

    def _token_weights(self, sw: Any, y_true: Any, y_pred: Any, soft: bool) -> Any:
        """sample_weight in the tokens' shape (Keras's rules for per-sample and temporal weights)."""
        if soft:  # tokens: the logits' axes minus C
            k = parse_layout(self.layout).index("C")
            tok_shape = tuple(d for i, d in enumerate(ops.shape(y_pred)) if i != k)
        else:
            tok_shape = tuple(ops.shape(y_true))
        try:
            rank = len(sw.shape)
        except ValueError:  # TF: unknown rank (tf.function relaxes shapes after a retrace)
            return self._token_weights_any_rank(sw, tok_shape)
        if rank == len(tok_shape) + 1 and sw.shape[-1] == 1:  # (N, T, 1): Keras's squeeze rule
            sw = ops.squeeze(sw, -1)
            rank -= 1
        if rank > len(tok_shape):
            raise XSeqLossError(f"sample_weight has shape {fmt_shape(tuple(sw.shape))}, more axes than "
                                f"the tokens' shape {fmt_shape(tuple(y_true.shape))}")
        if rank < len(tok_shape):  # per-sample weights: the same weight for every token of the sample
            for _ in range(len(tok_shape) - rank):
                sw = ops.expand_dims(sw, -1)
        if any(a == 1 and not (isinstance(b, int) and b == 1) for a, b in zip(sw.shape, tok_shape)):
            # e.g. (N, 1) against (N, T): Keras broadcasts it (b may be a dynamic size under tf.function)
            sw = ops.broadcast_to(sw, tok_shape)
        if "float" not in keras.backend.standardize_dtype(sw.dtype):
            sw = ops.cast(sw, self.dtype)
        return sw

    def _token_weights_any_rank(self, sw: Any, tok_shape: tuple[Any, ...]) -> Any:
        """The same rules without knowing sw's rank: (N, ...) -> (N, -1), broadcast over the rest."""
        rest: Any = 1
        for d in tok_shape[1:]:
            rest = rest * d
        sw = ops.broadcast_to(ops.reshape(sw, (tok_shape[0], -1)), (tok_shape[0], rest))
        sw = ops.reshape(sw, tok_shape)
        if "float" not in keras.backend.standardize_dtype(sw.dtype):
            sw = ops.cast(sw, self.dtype)
        return sw

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self._dtype_policy.name, "layout": self.layout,
                "ignore_index": self.ignore_index, "class_weights": self.class_weights, "inputs": self.inputs,
                "label_smoothing": self.label_smoothing, "smoothing": self.smoothing, "z_loss": self.z_loss,
                "logit_softcap": self.logit_softcap, "reduction": self.reduction,
                "denominator": self.denominator, "normalizer": self.normalizer, "empty": self.empty,
                "num_classes": self.num_classes, "validate": self.validate, "shift": self.shift,
                "segments_in_targets": self.segments_in_targets}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SequenceCrossEntropy":
        return cls(**config)


def _is_ragged(x: Any) -> bool:
    from .api import ragged
    return ragged.kind_of(x) == "ragged"


def _class_weights(cw: Any, num_classes: int | None) -> list[float] | None:
    """class_weights as a list of Python floats (JSON-serialisable), checked once here."""
    if cw is None:
        return None
    if hasattr(cw, "numpy") and not isinstance(cw, np.ndarray):
        cw = keras.ops.convert_to_numpy(cw)
    arr = np.asarray(cw)
    if arr.dtype.kind not in "iuf":
        raise XSeqLossTypeError(f"class_weights must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 1 or (num_classes is not None and arr.shape[0] != num_classes):
        want = "(C,)" if num_classes is None else f"(C={num_classes},)"
        raise XSeqLossError(f"class_weights has shape {fmt_shape(arr.shape)} but must be {want}; "
                            f"broadcasting is not allowed")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise XSeqLossError(f"class_weights[{i}] = {arr[i]} is invalid: class weights must be finite and in "
                            f"[0, inf)")
    return [float(v) for v in arr]


def _scale_for_distribution(loss: Any) -> Any:
    """1 / replicas under tf.distribute (Keras's rule for mean losses; a no-op elsewhere)."""
    try:
        from keras.src.losses.loss import scale_loss_for_distribution
    except ImportError:  # pragma: no cover
        return loss
    return scale_loss_for_distribution(loss)
