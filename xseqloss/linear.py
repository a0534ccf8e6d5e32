"""``linear_cross_entropy``: the fused output layer (API.md section 8), the public functions and
their preparation. It means exactly ``sequence_cross_entropy(hidden @ weight^T + bias, targets,
...)`` and never holds the (tokens, C) logits; the chunk loop is ``core/linear.py`` and each
backend's native part of it is ``backends/<framework>/linear.py``.
"""

from __future__ import annotations

from typing import Any

from . import _class_parallel
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.compiled import keep_type_when_compiled
from .api.layer import layer_arrays, with_layer
from .api.prepare import Call, prepare_sides
from .api.stats_call import metrics_plan
from .api.validate import check_concrete_sides, check_values
from .core.linear import linear_core
from .plan.options import parse_options
from .plan.outputs import as_stats

__all__ = ["linear_cross_entropy", "linear_value_and_grad"]



@keep_type_when_compiled
def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, layout: str = "NTH",
                         weight_layout: str = "CH", chunk_size: int | None = None, mask: Any = None,
                         lengths: Any = None, ignore_index: Any = -100, weights: Any = None,
                         class_weights: Any = None, label_smoothing: float = 0.0, smoothing: str = "uniform",
                         z_loss: float = 0.0, logit_softcap: float | None = None, reduction: str = "mean",
                         denominator: str = "weights", normalizer: Any = None, empty: str = "zero",
                         num_classes: int | None = None, validate: bool = True, backend: str | None = None,
                         shift: int = 0, segment_ids: Any = None, class_parallel: Any = None,
                         return_stats: Any = None, **unsupported: Any) -> Any:
    """Cross-entropy of ``hidden @ weight^T + bias`` without materialising the logits.

    Args:
        hidden: floating, axes named by ``layout`` ("NTH", "TNH", "NH", "H": N and T optional).
        weight: (C, H) with ``weight_layout="CH"`` (``nn.Linear.weight``, a tied embedding) or
            (H, C) with "HC" (a Flax / Keras Dense kernel); hidden's dtype.
        targets: as in ``sequence_cross_entropy`` for the logits' layout (H -> C).
        bias: (C,) or None. chunk_size: tokens per chunk (None: one chunk's float32 logits take at
            most 64 MiB, or all of them when that is smaller; 128 MiB for TensorFlow's plain
            chunks outside XLA, which form their gradient in the logits' buffer: decision 58).
        class_parallel: classes split across workers (xseqloss.distributed).
        return_stats: per-token outputs beside the loss, as in ``sequence_cross_entropy``: from
            the same chunk loop (no second pass), without gradient; returns ``(loss, TokenStats)``.
        Every other option: as in ``sequence_cross_entropy`` (docs/semantics.md).

    >>> import numpy as np, xseqloss as xsl
    >>> h = np.random.default_rng(0).normal(size=(2, 3, 4)); w = np.random.default_rng(1).normal(size=(5, 4))
    >>> y = np.array([[0, 1, 2], [3, 4, -100]])
    >>> bool(np.isclose(xsl.linear_cross_entropy(h, w, y), xsl.sequence_cross_entropy(h @ w.T, y)))
    True
    """
    call, h, w, b = _prepare_linear(hidden, weight, targets, bias=bias, layout=layout, weight_layout=weight_layout,
                           chunk_size=chunk_size, mask=mask, lengths=lengths, ignore_index=ignore_index,
                           weights=weights, class_weights=class_weights, label_smoothing=label_smoothing,
                           smoothing=smoothing, z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction,
                           denominator=denominator, normalizer=normalizer, empty=empty, num_classes=num_classes,
                           validate=validate, backend=backend, shift=shift, segment_ids=segment_ids,
                           class_parallel=class_parallel, unsupported=unsupported,
                           stats=None if return_stats is None else metrics_plan(return_stats, "logits"))
    _checked(call)
    out = call.be.run(linear_core, call.st, h, w, b, *call.arrays[1:-1])
    return out if return_stats is None else (out[0], as_stats(out[1]))


@keep_type_when_compiled
def linear_value_and_grad(hidden: Any, weight: Any, targets: Any, **options: Any) -> tuple[Any, Any]:
    """``(loss, (d_hidden, d_weight, d_bias or None))`` in the backend's own types: the gradients of
    the sum of the output. NumPy's are analytic (formed chunk by chunk); the frameworks use their
    own autodiff of ``linear_cross_entropy``.

    >>> import numpy as np, xseqloss as xsl
    >>> h = np.ones((1, 2, 3)); w = np.zeros((4, 3)); y = np.array([[1, 2]])
    >>> loss, (dh, dw, db) = xsl.linear_value_and_grad(h, w, y)
    >>> round(float(loss), 6), dh.shape, dw.shape, db
    (1.386294, (1, 2, 3), (4, 3), None)
    """
    call, h, w, b = _prepare_linear(hidden, weight, targets,
                                    unsupported={k: v for k, v in options.items() if k not in _OPTIONS},
                                    **{k: v for k, v in options.items() if k in _OPTIONS})
    _checked(call)
    return call.be.linear_value_and_grad(linear_core, call.st, h, w, b, *call.arrays[1:-1])


_OPTIONS = ("bias", "layout", "weight_layout", "chunk_size", "mask", "lengths", "ignore_index", "weights",
            "class_weights", "label_smoothing", "smoothing", "z_loss", "logit_softcap", "reduction", "denominator",
            "normalizer", "empty", "num_classes", "validate", "backend", "shift", "segment_ids", "class_parallel")


def _checked(call: Call) -> None:
    if call.st.class_parallel is not None:
        _class_parallel.check(call)
    elif not call.st.mark_nan:
        check_values(call)
    elif call.check_sides:
        check_concrete_sides(call)


# ----------------------------------------------------------------------------------- preparation

def _prepare_linear(hidden: Any, weight: Any, targets: Any, *, class_parallel: Any = None, **kw: Any
                    ) -> tuple[Call, Any, Any, Any]:
    """(the call's token arrays and plan, prepared as for sequence_cross_entropy of the logits it
    means, with no logits; hidden; weight; bias), every static check done. With ``class_parallel``
    the weight (and bias, soft targets, class weights) are this worker's slice of C."""
    if class_parallel is None:
        return _prepare_local(hidden, weight, targets, **kw)
    num_classes, user_chunk = kw.get("num_classes"), kw.get("chunk_size")
    kw["num_classes"] = None  # the global C is known only after the split
    out = _class_parallel.prepare(lambda: _prepare_local(hidden, weight, targets, **kw), class_parallel, num_classes,
                                  _class_parallel.backend_name(hidden, kw.get("backend")), hidden)
    _class_parallel.fix_chunks(out[0], user_chunk)
    return out


def _prepare_local(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, layout: Any = "NTH",
                   weight_layout: Any = "CH", chunk_size: Any = None, mask: Any = None, lengths: Any = None,
                   ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
                   label_smoothing: Any = 0.0, smoothing: Any = "uniform", z_loss: Any = 0.0,
                   logit_softcap: Any = None, reduction: Any = "mean", denominator: Any = "weights",
                   normalizer: Any = None, empty: Any = "zero", num_classes: Any = None, validate: Any = True,
                   backend: Any = None, shift: Any = 0, segment_ids: Any = None,
                   unsupported: dict | None = None, stats: Any = None) -> tuple[Call, Any, Any, Any]:
    """_prepare_linear on one worker (the weight's C is the C of the call)."""
    for name in (unsupported or {}):
        if name in ("inputs", "inplace_backward"):
            raise XSeqLossError(f"{name} is not an option of linear_cross_entropy: it computes logits from "
                                f"hidden states itself (inputs='logits'), and its gradients are formed chunk by "
                                f"chunk, never in a logits-sized buffer; use sequence_cross_entropy for {name}")
        raise XSeqLossTypeError(f"linear_cross_entropy() got an unexpected keyword argument {name!r}")
    lay = layer_arrays(hidden, weight, bias, layout, weight_layout, chunk_size, backend)
    o = parse_options(layout=lay.layout, ignore_index=ignore_index, inputs="logits", label_smoothing=label_smoothing,
                      smoothing=smoothing, z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction,
                      denominator=denominator, empty=empty, num_classes=num_classes, validate=validate,
                      inplace_backward=False, shift=shift)
    call = prepare_sides(lay.be, o, None, lay.shape, targets, mask=mask, lengths=lengths, weights=weights,
                         class_weights=class_weights, normalizer=normalizer, like=lay.h, segment_ids=segment_ids,
                         stats=stats)
    return with_layer(call, lay, plain=call.st.plain), lay.h, lay.w, lay.b
