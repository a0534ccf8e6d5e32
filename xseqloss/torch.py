"""``SequenceCrossEntropyLoss``: ``xseqloss.sequence_cross_entropy`` as a PyTorch ``nn.Module``.

>>> import torch
>>> from xseqloss.torch import SequenceCrossEntropyLoss
>>> loss_fn = SequenceCrossEntropyLoss(label_smoothing=0.1)
>>> logits = torch.zeros(2, 3, 5, requires_grad=True)          # (N, T, C)
>>> targets = torch.tensor([[1, 2, -100], [4, 0, 3]])
>>> loss = loss_fn(logits, targets, lengths=torch.tensor([3, 2]))
>>> round(loss.item(), 6)                                       # log(5): uniform logits, 4 tokens count
1.609438
>>> loss.backward()

Importing this module imports PyTorch (an explicit request); ``import xseqloss`` alone does not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _dispatch
from ._errors import XSeqLossError, XSeqLossTypeError
from .loss import sequence_cross_entropy
from .plan.messages import fmt_shape
from .plan.options import choice, normalizer_reduction, number, parse_layout, parse_options, plain_ignore

__all__ = ["SequenceCrossEntropyLoss", "LinearCrossEntropyLoss", "empty_cache"]

# Options whose value is shown by ``repr`` when it differs from the function's default.
_DEFAULTS = dict(layout="NTC", ignore_index=-100, inputs="logits", label_smoothing=0.0, smoothing="uniform",
                 z_loss=0.0, logit_softcap=None, reduction="mean", denominator="weights", normalizer=None,
                 empty="zero", num_classes=None, validate=True, inplace_backward=False, shift=0,
                 class_parallel=None)


def empty_cache() -> None:
    """Release the reusable CPU gradient buffer (it is reallocated on the next large backward)."""
    _dispatch.load("torch").empty_cache()


class SequenceCrossEntropyLoss(nn.Module):
    """Sequence cross-entropy as an ``nn.Module``; every option of ``sequence_cross_entropy``.

    The options (all keyword-only) are fixed at construction and checked there, so a typo fails
    when the model is built, not at the first batch. The arrays that change with every batch go to
    ``forward``: ``mask``, ``lengths``, ``weights``, ``segment_ids`` (packed documents) and, for
    gradient accumulation or data-parallel training, ``normalizer`` (the global token count; it
    overrides the one given here). ``shift=1`` makes it a next-token loss (API.md 7.2). Logits and
    targets may be ragged (a PackedSequence, nested jagged tensors, a list of target tensors).

    ``class_weights`` is a registered buffer: ``.to(device)`` / ``.to(dtype)`` move it with the model
    and it is saved in ``state_dict`` (as ``nn.CrossEntropyLoss`` does with ``weight``).

    Under ``torch.compile(fullgraph=True)`` there is no graph break: value checks that would read
    tensor contents (out-of-range labels, bad lengths) are skipped while compiling, and a bad value
    gives NaN at the affected tokens instead of an exception (API.md section 2).

    Note the layout: the default is "NTC" (batch-first model outputs), not PyTorch's class-at-dim-1
    convention; pass ``layout="NCT"`` for logits shaped like ``nn.CrossEntropyLoss`` expects.

    Args:
        layout, ignore_index, class_weights, inputs, label_smoothing, smoothing, z_loss,
        logit_softcap, reduction, denominator, normalizer, empty, num_classes, validate,
        inplace_backward: as in ``xseqloss.sequence_cross_entropy`` (docs/semantics.md).
    """

    class_weights: torch.Tensor | None

    def __init__(self, *, layout: str = "NTC", ignore_index: Any = -100, class_weights: Any = None,
                 inputs: str = "logits", label_smoothing: float = 0.0, smoothing: str = "uniform",
                 z_loss: float = 0.0, logit_softcap: float | None = None, reduction: str = "mean",
                 denominator: str = "weights", normalizer: float | None = None, empty: str = "zero",
                 num_classes: int | None = None, validate: bool = True, inplace_backward: bool = False,
                 shift: int = 0, class_parallel: Any = None) -> None:
        super().__init__()
        # the same checks (and messages) as the function's, once, at construction
        opts = parse_options(layout=layout, ignore_index=ignore_index, inputs=inputs,
                                     label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss,
                                     logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
                                     empty=empty, num_classes=num_classes, validate=validate,
                                     inplace_backward=inplace_backward, shift=shift)
        if normalizer is not None:
            normalizer_reduction(opts.reduction)
            if not isinstance(normalizer, torch.Tensor):
                number(normalizer, "normalizer", 0.0)
        self.layout = layout
        self.ignore_index = plain_ignore(ignore_index)
        self.inputs = inputs
        self.label_smoothing = float(label_smoothing)
        self.smoothing = smoothing
        self.z_loss = float(z_loss)
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        self.reduction = reduction
        self.denominator = denominator
        self.normalizer = normalizer
        self.empty = empty
        self.num_classes = opts.num_classes
        self.validate = validate
        self.inplace_backward = inplace_backward
        self.shift = opts.shift
        self.class_parallel = class_parallel  # class_weights are then this worker's slice (API.md 9.2)
        self.register_buffer("class_weights", _class_weights(class_weights,
                                                             opts.num_classes if class_parallel is None else None))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: Any = None, lengths: Any = None,
                weights: Any = None, segment_ids: Any = None, *, normalizer: Any = None) -> torch.Tensor:
        """The loss of one batch; the arrays as in ``sequence_cross_entropy``."""
        return sequence_cross_entropy(
            logits, targets, layout=self.layout, mask=mask, lengths=lengths, ignore_index=self.ignore_index,
            weights=weights, class_weights=self.class_weights, inputs=self.inputs,
            label_smoothing=self.label_smoothing, smoothing=self.smoothing, z_loss=self.z_loss,
            logit_softcap=self.logit_softcap, reduction=self.reduction, denominator=self.denominator,
            normalizer=self.normalizer if normalizer is None else normalizer, empty=self.empty,
            num_classes=self.num_classes, validate=self.validate, backend="torch",
            inplace_backward=self.inplace_backward, shift=self.shift, segment_ids=segment_ids,
            class_parallel=self.class_parallel)

    def extra_repr(self) -> str:
        parts = [f"{k}={getattr(self, k)!r}" for k, d in _DEFAULTS.items() if getattr(self, k) != d]
        if self.class_weights is not None:
            parts.append(f"class_weights=<{tuple(self.class_weights.shape)} buffer>")
        return ", ".join(parts)


def _class_weights(cw: Any, num_classes: int | None) -> torch.Tensor | None:
    """class_weights as a floating 1-D tensor, checked once here (finite, >= 0, length C)."""
    if cw is None:
        return None
    if isinstance(cw, torch.Tensor):
        t = cw.detach().clone()
    else:
        try:
            arr = np.asarray(cw)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise XSeqLossTypeError(f"class_weights could not be converted to a tensor: {exc}") from exc
        if arr.dtype.kind not in "iuf":
            raise XSeqLossTypeError(f"class_weights must be numeric, got dtype {arr.dtype}")
        t = torch.as_tensor(arr)
    if t.dtype == torch.bool or t.is_complex():
        raise XSeqLossTypeError(f"class_weights must be real numbers, got {str(t.dtype).replace('torch.', '')}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())  # a buffer that .to(dtype) follows, like nn.CrossEntropyLoss.weight
    if t.ndim != 1 or (num_classes is not None and t.shape[0] != num_classes):
        want = "(C,)" if num_classes is None else f"(C={num_classes},)"
        raise XSeqLossError(f"class_weights has shape {fmt_shape(tuple(t.shape))} but must be {want}; "
                            f"broadcasting is not allowed")
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        v = float(t[i])
        raise XSeqLossError(f"class_weights[{i}] = {v if math.isfinite(v) else v!r} is invalid: class weights "
                            f"must be finite and in [0, inf)")
    return t


class LinearCrossEntropyLoss(nn.Module):
    """``xseqloss.linear_cross_entropy`` as an ``nn.Module``: the output projection and the loss
    fused, the (tokens, C) logits never held.

    ``forward(hidden, weight, targets, bias=None, mask=None, lengths=None, weights=None,
    segment_ids=None, *, normalizer=None)``; the weight is passed per call (``model.lm_head.weight``,
    a tied embedding) so the module holds no parameters of its own. Options (every option of
    ``linear_cross_entropy``) are fixed at construction and checked there. Works under
    ``torch.compile(fullgraph=True)`` (the chunk loop is one custom op).

    >>> import torch
    >>> from xseqloss.torch import LinearCrossEntropyLoss
    >>> head = torch.nn.Linear(4, 10)
    >>> loss = LinearCrossEntropyLoss(label_smoothing=0.1)(torch.randn(2, 3, 4), head.weight,
    ...                                                   torch.randint(0, 10, (2, 3)), bias=head.bias)
    >>> loss.backward(); head.weight.grad.shape
    torch.Size([10, 4])
    """

    def __init__(self, *, layout: str = "NTH", weight_layout: str = "CH", chunk_size: int | None = None,
                 ignore_index: Any = -100, class_weights: Any = None, label_smoothing: float = 0.0,
                 smoothing: str = "uniform", z_loss: float = 0.0, logit_softcap: float | None = None,
                 reduction: str = "mean", denominator: str = "weights", normalizer: float | None = None,
                 empty: str = "zero", num_classes: int | None = None, validate: bool = True, shift: int = 0,
                 class_parallel: Any = None) -> None:
        super().__init__()
        opts = parse_options(layout=parse_layout(layout, "layout", "NTH", "H").replace("H", "C"),
                                     ignore_index=ignore_index, inputs="logits", label_smoothing=label_smoothing,
                                     smoothing=smoothing, z_loss=z_loss, logit_softcap=logit_softcap,
                                     reduction=reduction, denominator=denominator, empty=empty,
                                     num_classes=num_classes, validate=validate, inplace_backward=False, shift=shift)
        choice(weight_layout, "weight_layout", ("CH", "HC"))
        if chunk_size is not None:
            number(chunk_size, "chunk_size", 1, integer=True)
        if normalizer is not None:
            normalizer_reduction(opts.reduction)
            if not isinstance(normalizer, torch.Tensor):
                number(normalizer, "normalizer", 0.0)
        self.options = dict(layout=layout, weight_layout=weight_layout, chunk_size=chunk_size,
                            ignore_index=plain_ignore(ignore_index), label_smoothing=float(label_smoothing),
                            smoothing=smoothing, z_loss=float(z_loss),
                            logit_softcap=None if logit_softcap is None else float(logit_softcap),
                            reduction=reduction, denominator=denominator, empty=empty, num_classes=opts.num_classes,
                            validate=validate, shift=opts.shift, class_parallel=class_parallel)
        self.normalizer = normalizer
        self.register_buffer("class_weights", _class_weights(class_weights,
                                                             opts.num_classes if class_parallel is None else None))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: Any, bias: Any = None, mask: Any = None,
                lengths: Any = None, weights: Any = None, segment_ids: Any = None, *,
                normalizer: Any = None) -> torch.Tensor:
        from .linear import linear_cross_entropy
        return linear_cross_entropy(hidden, weight, targets, bias=bias, mask=mask, lengths=lengths, weights=weights,
                                    segment_ids=segment_ids, class_weights=self.class_weights,
                                    normalizer=self.normalizer if normalizer is None else normalizer,
                                    backend="torch", **self.options)

    def extra_repr(self) -> str:
        defaults = dict(layout="NTH", weight_layout="CH", chunk_size=None, ignore_index=-100, label_smoothing=0.0,
                        smoothing="uniform", z_loss=0.0, logit_softcap=None, reduction="mean",
                        denominator="weights", empty="zero", num_classes=None, validate=True, shift=0,
                        class_parallel=None)
        parts = [f"{k}={v!r}" for k, v in self.options.items() if v != defaults[k]]
        if self.class_weights is not None:
            parts.append(f"class_weights=<{tuple(self.class_weights.shape)} buffer>")
        return ", ".join(parts)
