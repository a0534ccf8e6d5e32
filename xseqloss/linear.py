"""``linear_cross_entropy``: the fused output layer (API.md section 8), the public functions and
their preparation. It means exactly ``sequence_cross_entropy(hidden @ weight^T + bias, targets,
...)`` and never holds the (tokens, C) logits; the chunk loop is ``core/linear.py`` and each
backend's native part of it is ``backends/<framework>/linear.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import _class_parallel, _dispatch
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.compiled import keep_type_when_compiled
from .api.prepare import Call, prepare_sides
from .api.validate import check_concrete_sides, check_values
from .core.linear import linear_core
from .core.sides import side
from .plan import engine
from .plan.call_plan import LinearLayout, make_plan
from .plan.messages import fmt_shape
from .plan.options import choice, number, parse_layout, parse_options

__all__ = ["linear_cross_entropy", "linear_value_and_grad"]

CHUNK_BYTES = 64 << 20  # one chunk's float32 logits take at most this by default (API.md 8)
WEIGHT_LAYOUTS = ("CH", "HC")


@keep_type_when_compiled
def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, layout: str = "NTH",
                         weight_layout: str = "CH", chunk_size: int | None = None, mask: Any = None,
                         lengths: Any = None, ignore_index: Any = -100, weights: Any = None,
                         class_weights: Any = None, label_smoothing: float = 0.0, smoothing: str = "uniform",
                         z_loss: float = 0.0, logit_softcap: float | None = None, reduction: str = "mean",
                         denominator: str = "weights", normalizer: Any = None, empty: str = "zero",
                         num_classes: int | None = None, validate: bool = True, backend: str | None = None,
                         shift: int = 0, segment_ids: Any = None, class_parallel: Any = None,
                         **unsupported: Any) -> Any:
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
                           class_parallel=class_parallel, unsupported=unsupported)
    _checked(call)
    return call.be.run(linear_core, call.st, h, w, b, *call.arrays[1:-1])


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
    call = out[0]
    split = call.st.class_parallel
    lay = call.st.linear
    if user_chunk is None and split.sizes:  # every worker runs the same chunks (their collectives pair up)
        chunk = max(1, min(call.be.linear_chunk_bytes // (16 * max(split.sizes)), _tokens_of(call)))
        call.st = replace(call.st, linear=replace(lay, chunk=chunk))
    return out


def _tokens_of(call: Call) -> int:
    n = 1
    for d in call.tok_shape:
        n *= int(d)
    return max(n, 1)


def _prepare_local(hidden: Any, weight: Any, targets: Any, *, bias: Any = None, layout: Any = "NTH",
                    weight_layout: Any = "CH", chunk_size: Any = None, mask: Any = None, lengths: Any = None,
                    ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
                    label_smoothing: Any = 0.0, smoothing: Any = "uniform", z_loss: Any = 0.0,
                    logit_softcap: Any = None, reduction: Any = "mean", denominator: Any = "weights",
                    normalizer: Any = None, empty: Any = "zero", num_classes: Any = None, validate: Any = True,
                    backend: Any = None, shift: Any = 0, segment_ids: Any = None,
                    unsupported: dict | None = None) -> tuple[Call, Any, Any, Any]:
    """_prepare_linear on one worker (the weight's C is the C of the call)."""
    for name in (unsupported or {}):
        if name in ("inputs", "inplace_backward"):
            raise XSeqLossError(f"{name} is not an option of linear_cross_entropy: it computes logits from "
                                f"hidden states itself (inputs='logits'), and its gradients are formed chunk by "
                                f"chunk, never in a logits-sized buffer; use sequence_cross_entropy for {name}")
        raise XSeqLossTypeError(f"linear_cross_entropy() got an unexpected keyword argument {name!r}")
    hl = parse_layout(layout, "layout", letters="NTH", required="H")
    wl = choice(weight_layout, "weight_layout", WEIGHT_LAYOUTS)
    if chunk_size is not None:
        chunk_size = int(number(chunk_size, "chunk_size", 1, integer=True))
    L = hl.replace("H", "C")
    o = parse_options(layout=L, ignore_index=ignore_index, inputs="logits", label_smoothing=label_smoothing,
                              smoothing=smoothing, z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction,
                              denominator=denominator, empty=empty, num_classes=num_classes, validate=validate,
                              inplace_backward=False, shift=shift)
    be, h = _dispatch.resolve(hidden, backend)
    if be.kind(h) != "f":
        raise XSeqLossTypeError(f"hidden must have a floating dtype, got {be.dtype_name(h)}; integer hidden "
                                f"states are never cast for you")
    hshape = be.shape(h)
    if len(hshape) != len(hl):
        raise XSeqLossError(f"hidden has {len(hshape)} axes, shape {fmt_shape(hshape)}, but layout={hl!r} names "
                            f"{len(hl)}; give one letter per axis")
    H = hshape[hl.index("H")]
    w = side(be, weight, "weight", h)
    if be.kind(w) != "f" or be.dtype_name(w) != be.dtype_name(h):
        raise XSeqLossTypeError(f"weight has dtype {be.dtype_name(w)} but hidden has {be.dtype_name(h)}: hidden, "
                                f"weight and bias share one floating dtype (never cast for you)")
    ws = be.shape(w)
    if len(ws) != 2:
        raise XSeqLossError(f"weight has shape {fmt_shape(ws)}: it must be (C, H) with weight_layout='CH' or "
                            f"(H, C) with 'HC'")
    hpos = 1 if wl == "CH" else 0
    if ws[hpos] != H:
        other = "HC" if wl == "CH" else "CH"
        hint = (f" - did you mean weight_layout={other!r}? (a {'Flax / Keras Dense kernel' if other == 'HC' else 'torch nn.Linear weight'} "
                f"is {'(H, C)' if other == 'HC' else '(C, H)'})" if ws[1 - hpos] == H else "")
        raise XSeqLossError(f"weight has shape {fmt_shape(ws, wl)} but hidden has H = {H} (shape "
                            f"{fmt_shape(hshape, hl)}): with weight_layout={wl!r} the weight is "
                            f"{'(C, H)' if wl == 'CH' else '(H, C)'}{hint}")
    C = ws[1 - hpos]
    if C == 0:
        raise XSeqLossError(f"weight has C = 0 classes (shape {fmt_shape(ws, wl)}): at least one class is "
                            f"required, valid range [1, inf)")
    b = None
    if bias is not None:
        b = side(be, bias, "bias", h)
        if be.kind(b) != "f" or be.dtype_name(b) != be.dtype_name(h):
            raise XSeqLossTypeError(f"bias has dtype {be.dtype_name(b)} but hidden has {be.dtype_name(h)}: hidden, "
                                    f"weight and bias share one floating dtype (never cast for you)")
        if tuple(be.shape(b)) != (C,):
            raise XSeqLossError(f"bias has shape {fmt_shape(be.shape(b))} but must be (C={C},) "
                                f"(weight {fmt_shape(ws, wl)})")
    shape = tuple(C if a == "H" else d for a, d in zip(hl, hshape))  # the logits it means
    call = prepare_sides(be, o, None, shape, targets, mask=mask, lengths=lengths, weights=weights,
                          class_weights=class_weights, normalizer=normalizer, like=h, segment_ids=segment_ids)
    tokens = 1
    for a, d in zip(hl, hshape):
        if a != "H" and d is not None:
            tokens *= d
    if chunk_size is None:
        cap_bytes = be.linear_chunk_bytes
        if call.st.plain:  # a backend that forms the gradient in the logits' buffer holds one chunk, not two
            cap_bytes *= be.linear_plain_chunk_factor()
        cap = cap_bytes // (4 * max(int(ws[1 - hpos]), 1))
        if not call.st.plain:  # the general formula keeps a few chunk-sized temporaries
            cap //= 4
        chunk_size = max(1, min(cap, tokens))
    st = make_plan(o, call.st.C, call.st.soft, call.st.mark_nan, call.st.has_mask, call.st.has_lengths,
                 call.st.has_weights, call.st.has_cw, call.st.has_normalizer,
                 limits=be.index_limits(),
                 engine=engine.DEFAULT if call.tracing and be.name == "torch" else engine.current(be.name),
                 has_segments=call.st.has_segments, linear=LinearLayout(hl.index("H"), wl, chunk_size),
                 store=not (call.tracing and be.name == "torch"))
    call.st = st
    # jax.grad without jit: the hidden states are traced, the labels concrete (decisions.md 24)
    call.check_sides = bool(o.validate and call.tracing and not any(
        be.tracing(a) for a in call.arrays[1:] if a is not None))
    return call, h, w, b
