"""``xseqloss.hf``: xseqloss as the loss of a Hugging Face transformers causal LM, under ``Trainer``
or in a plain loop (docs/porting.md, "Hugging Face transformers").

One object, ``CausalLMLoss``, fits both places transformers lets a loss in:

* ``Trainer(..., compute_loss_func=loss)``: called as ``loss(outputs, labels, num_items_in_batch=n)``;
* the model's hook, ``model.loss_function = loss``: called by the model's forward as
  ``loss(logits=..., labels=..., vocab_size=V, num_items_in_batch=n, **the forward's extra kwargs)``
  (``shift_labels``, the padding-free collator's ``seq_idx`` and ``cu_seq_lens_q``).

``use(model, **options)`` does the second and also lets the packed batch's ``position_ids`` (which
the forward keeps for itself) and ``seq_idx`` reach the loss in both places, which
``compute_loss_func`` alone cannot: they become ``segment_ids``, so no target crosses a document and
``reduction="segment_mean"`` works on ``DataCollatorWithFlattening`` batches.

The rules, the same in both places:

* the shift is built in (transformers' ``ForCausalLMLoss``: the logits at t against ``labels[t + 1]``,
  nothing copied); ``shift_labels=`` (labels shifted already) is used as it is, without a shift;
* ``num_items_in_batch`` (the Trainer's count of shifted labels over the accumulation window and the
  processes) is the ``normalizer`` of ``reduction="mean"``, so gradient accumulation is exact.
  ``Trainer`` treats what ``compute_loss_func`` returns as already scaled for accumulation, so in
  that form, with gradients on, a missing ``num_items_in_batch`` is an error, never an unscaled
  loss (pass ``num_items_in_batch=xseqloss.token_count(labels, shift=1)`` in a loop without
  accumulation). Through the model's hook a missing count is the local mean, transformers' own rule
  (Trainer then divides by the accumulation steps itself);
* ``reduction="segment_mean"`` averages documents: ``num_items_in_batch`` counts tokens, not
  documents, so it is never the divisor. When it equals this batch's own label count (no
  accumulation, one process) the batch's documents are averaged; otherwise give the window's
  document count as ``normalizer=`` (``xseqloss.segment_count`` summed over the micro-batches), or
  it is an error (one host sync per call to compare the counts).

Importing this module imports torch (an explicit request); ``import xseqloss`` alone does not, and
transformers is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch

from ._errors import XSeqLossError, XSeqLossTypeError
from .loss import sequence_cross_entropy, token_count
from .presets import HF_SHIFTED_LABELS

__all__ = ["CausalLMLoss", "use", "segment_ids_from_positions"]

_RESERVED = ("shift", "normalizer", "segment_ids", "layout", "ignore_index", "reduction", "backend")
_REDUCTIONS = ("mean", "segment_mean")


class CausalLMLoss:
    """Sequence cross-entropy for a causal LM, as ``Trainer``'s ``compute_loss_func`` and as a
    model's ``loss_function`` (see the module docstring for the rules).

    Args:
        reduction: "mean" (transformers' token mean; default) or "segment_mean" (every packed
            document weighs the same; needs document boundaries).
        **options: any other option of ``xseqloss.sequence_cross_entropy`` (``label_smoothing``,
            ``z_loss``, ``class_weights``, ...), with transformers' defaults (``presets.HF_FOR_CAUSAL_LM``);
            the shift, normalizer, segments and ignore value come from the call.

    >>> import torch, xseqloss.hf
    >>> loss = xseqloss.hf.CausalLMLoss()
    >>> logits = torch.zeros(1, 4, 5); labels = torch.tensor([[1, 2, 3, -100]])
    >>> round(float(loss(logits=logits, labels=labels, vocab_size=5)), 4)  # log 5: 2 counted targets
    1.6094
    """

    def __init__(self, *, reduction: str = "mean", **options: Any) -> None:
        if reduction not in _REDUCTIONS:
            raise XSeqLossError(f"reduction={reduction!r} is not valid here: one of {list(_REDUCTIONS)}")
        bad = sorted(set(options) & set(_RESERVED))
        if bad:
            raise XSeqLossTypeError(f"CausalLMLoss takes {bad[0]} from each call (the batch, transformers' "
                                    f"arguments), not as an option")
        self.reduction = reduction
        self.options = {**HF_SHIFTED_LABELS, **options}
        self.options.pop("ignore_index", None)
        self.options.pop("reduction", None)
        self._batch: dict[str, Any] = {}  # position_ids / seq_idx of the model's last forward (use())

    def __call__(self, outputs: Any = None, labels: Any = None, num_items_in_batch: Any = None, *,
                 logits: Any = None, vocab_size: int | None = None, ignore_index: int = -100,
                 shift_labels: Any = None, segment_ids: Any = None, seq_idx: Any = None, position_ids: Any = None,
                 cu_seq_lens_q: Any = None, normalizer: Any = None, **_forward_kwargs: Any) -> Any:
        trainer_form = outputs is not None
        if trainer_form:
            if logits is not None:
                raise XSeqLossTypeError("give the model's outputs (Trainer's compute_loss_func) or logits= "
                                        "(the model's loss_function), not both")
            logits = _logits_of(outputs)
        if logits is None:
            raise XSeqLossTypeError("CausalLMLoss needs the logits: outputs (with .logits) or logits=")
        batch, self._batch = self._batch, {}
        if labels is None and shift_labels is None:
            raise XSeqLossError("labels is None: the batch has no 'labels' for the loss (Trainer pops them "
                                "from the batch and passes them here)")
        targets, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
        segs = _segments(targets, segment_ids, seq_idx if seq_idx is not None else batch.get("seq_idx"),
                         cu_seq_lens_q, position_ids if position_ids is not None else batch.get("position_ids"))
        if self.reduction == "segment_mean":
            if segs is None:
                raise XSeqLossError(
                    "reduction='segment_mean' needs document boundaries: segment_ids=, the collator's seq_idx "
                    "(DataCollatorWithFlattening(return_seq_idx=True)), or position_ids that restart at each "
                    "document (xseqloss.hf.use(model) lets them reach the loss)")
            if normalizer is None and num_items_in_batch is not None and \
                    int(num_items_in_batch) != int(token_count(targets, shift=shift, ignore_index=ignore_index)):
                raise XSeqLossError(
                    f"reduction='segment_mean' with num_items_in_batch={int(num_items_in_batch)} while this "
                    f"batch has {int(token_count(targets, shift=shift, ignore_index=ignore_index))} labels: "
                    f"gradient accumulation (or several processes), and num_items_in_batch is a count of "
                    f"tokens, not of documents; give the window's document count as normalizer= "
                    f"(xseqloss.segment_count summed over its micro-batches)")
        elif normalizer is None:
            normalizer = num_items_in_batch
        if trainer_form and normalizer is None and num_items_in_batch is None and torch.is_grad_enabled():
            raise XSeqLossError(
                "num_items_in_batch is None: Trainer treats compute_loss_func's loss as already scaled for "
                "gradient accumulation, so a local mean would be too large by the number of accumulation "
                "steps; pass num_items_in_batch (the shifted label count of the whole window, e.g. "
                "xseqloss.token_count(labels, shift=1) without accumulation) or normalizer=")
        if torch.is_tensor(normalizer):
            normalizer = normalizer.to(logits.device)
        opts = dict(self.options)
        if vocab_size is not None:
            opts.setdefault("num_classes", int(vocab_size))
        return sequence_cross_entropy(logits, targets, shift=shift, segment_ids=segs, normalizer=normalizer,
                                      ignore_index=ignore_index, reduction=self.reduction, **opts)


def use(model: Any, **options: Any) -> CausalLMLoss:
    """``CausalLMLoss(**options)`` installed as ``model.loss_function``, with a forward pre-hook that
    hands the batch's ``position_ids`` and ``seq_idx`` to it (the forward does not pass them to its
    loss, and ``Trainer`` never shows the batch to ``compute_loss_func``). Returns the loss: give the
    same object to ``Trainer(compute_loss_func=...)`` if you use that form."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "loss_function"):
        raise XSeqLossTypeError(f"use() takes a transformers model (an nn.Module with a loss_function), "
                                f"got {type(model).__name__}")
    loss = CausalLMLoss(**options)

    def keep(_module: Any, args: tuple, kwargs: dict) -> None:
        loss._batch = {k: kwargs.get(k) for k in ("position_ids", "seq_idx") if kwargs.get(k) is not None}

    model.register_forward_pre_hook(keep, with_kwargs=True)
    model.loss_function = loss
    return loss


def segment_ids_from_positions(position_ids: Any) -> Any:
    """Document ids of a packed batch from its ``position_ids``: a new document wherever the position
    does not follow the previous one (a reset to the start), numbered from 0 in every row."""
    p = torch.as_tensor(position_ids)
    if p.dtype.is_floating_point or p.dtype == torch.bool or p.ndim == 0:
        raise XSeqLossTypeError(f"position_ids must be integers with a time axis, got {p.dtype} of shape "
                                f"{tuple(p.shape)}")
    starts = torch.ones_like(p, dtype=torch.int64)
    starts[..., 0] = 0
    starts[..., 1:] = (p[..., 1:] != p[..., :-1] + 1).to(torch.int64)
    return starts.cumsum(-1)


def _logits_of(outputs: Any) -> Any:
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" not in outputs:
            raise XSeqLossError(f"the model's outputs have no 'logits' (keys: {sorted(outputs.keys())})")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    if torch.is_tensor(outputs):
        return outputs
    raise XSeqLossTypeError(f"cannot find the logits in outputs of type {type(outputs).__name__}")


def _segments(targets: Any, segment_ids: Any, seq_idx: Any, cu_seq_lens: Any, position_ids: Any) -> Any:
    """segment_ids from the first of: segment_ids, seq_idx, cu_seq_lens_q, position_ids; or None."""
    shape = tuple(targets.shape)
    if segment_ids is not None:
        return segment_ids
    if seq_idx is not None:
        return _fit(torch.as_tensor(seq_idx), shape, "seq_idx")
    if cu_seq_lens is not None:
        cu = torch.as_tensor(cu_seq_lens).to(torch.int64)
        total = int(torch.tensor(shape).prod())
        ids = torch.bucketize(torch.arange(total, device=cu.device), cu[1:], right=True)
        return ids.reshape(shape)
    if position_ids is not None:
        return _fit(segment_ids_from_positions(position_ids), shape, "position_ids")
    return None


def _fit(ids: Any, shape: tuple[int, ...], name: str) -> Any:
    if tuple(ids.shape) == shape:
        return ids
    if (ids.ndim == len(shape) - 1 and tuple(ids.shape) == shape[1:]) or \
            (ids.ndim == len(shape) and ids.shape[0] == 1 and tuple(ids.shape[1:]) == shape[1:]):
        return ids.expand(shape)  # one row of ids for every row (transformers' unexpanded position_ids)
    raise XSeqLossError(f"{name} has shape {tuple(ids.shape)} but the labels have shape {shape}: they mark "
                        f"the labels' tokens")
