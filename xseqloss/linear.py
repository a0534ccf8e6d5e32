"""``linear_cross_entropy``: the fused output layer (API.md section 8).

It means exactly ``sequence_cross_entropy(hidden @ weight^T + bias, targets, ...)`` and never holds
the (tokens, C) logits: the tokens go through in chunks, and a chunk's logits go to the same
per-token formula as every other path (``_token_loss.token_loss``, or a backend's lean kernel for
plain cross-entropy) with the reduction's coefficient known before the loss (``_core.token_plan``),
so the gradients are formed in the forward pass, Liger-Kernel's way:

    z_c  = h_c @ W^T + b                      (float32 or wider, whatever the inputs' dtype)
    g_c  = d loss / d z_c  (times the coefficient)
    dh_c = g_c @ W ;  dW += g_c^T @ h_c (float32) ;  db += sum(g_c)

A backend contributes only its matmul and its chunk loop (``linear_token_loss``); the backward
returns the gradients formed in the forward when the upstream gradient is the one expected,
rescales them when it is a uniform multiple of it (a scaled loss, GradScaler), and runs the chunks
again with the upstream gradient otherwise (``reduction="none"`` with a cotangent: Liger-Kernel
issue 968 got those wrong).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import _checks, _dispatch, _engine
from ._checks import fmt_shape
from ._core import token_plan
from ._errors import XSeqLossError, XSeqLossTypeError, keep_type_when_compiled
from ._plan import Static, _static
from ._prepare import _Call, _prepare_sides
from ._token_loss import token_loss
from ._validate import _check_values, check_concrete_sides

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


def _checked(call: _Call) -> None:
    if call.st.class_parallel is not None:
        from . import class_parallel
        class_parallel.check(call)
    elif not call.st.mark_bad:
        _check_values(call)
    elif call.check_sides:
        check_concrete_sides(call)


# ----------------------------------------------------------------------------------- preparation

def _prepare_linear(hidden: Any, weight: Any, targets: Any, *, class_parallel: Any = None, **kw: Any
                    ) -> tuple[_Call, Any, Any, Any]:
    """(the call's token arrays and plan, prepared as for sequence_cross_entropy of the logits it
    means, with no logits; hidden; weight; bias), every static check done. With ``class_parallel``
    the weight (and bias, soft targets, class weights) are this worker's slice of C."""
    if class_parallel is None:
        return _prepare_local(hidden, weight, targets, **kw)
    from . import class_parallel as cpm
    num_classes, user_chunk = kw.get("num_classes"), kw.get("chunk_size")
    kw["num_classes"] = None  # the global C is known only after the split
    out = cpm.prepare(lambda: _prepare_local(hidden, weight, targets, **kw), class_parallel, num_classes,
                      cpm.backend_name(hidden, kw.get("backend")), hidden)
    call = out[0]
    split = call.st.class_parallel
    hpos, wl, chunk = call.st.linear
    if user_chunk is None and split.sizes:  # every worker runs the same chunks (their collectives pair up)
        chunk = max(1, min(getattr(call.be, "linear_chunk_bytes", CHUNK_BYTES) // (16 * max(split.sizes)),
                           _tokens_of(call)))
    call.st = replace(call.st, linear=(hpos, wl, chunk))
    return out


def _tokens_of(call: _Call) -> int:
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
                    unsupported: dict | None = None) -> tuple[_Call, Any, Any, Any]:
    """_prepare_linear on one worker (the weight's C is the C of the call)."""
    for name in (unsupported or {}):
        if name in ("inputs", "inplace_backward"):
            raise XSeqLossError(f"{name} is not an option of linear_cross_entropy: it computes logits from "
                                f"hidden states itself (inputs='logits'), and its gradients are formed chunk by "
                                f"chunk, never in a logits-sized buffer; use sequence_cross_entropy for {name}")
        raise XSeqLossTypeError(f"linear_cross_entropy() got an unexpected keyword argument {name!r}")
    hl = _checks.parse_layout(layout, "layout", letters="NTH", required="H")
    wl = _checks.choice(weight_layout, "weight_layout", WEIGHT_LAYOUTS)
    if chunk_size is not None:
        chunk_size = int(_checks.number(chunk_size, "chunk_size", 1, integer=True))
    L = hl.replace("H", "C")
    o = _checks.parse_options(layout=L, ignore_index=ignore_index, inputs="logits", label_smoothing=label_smoothing,
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
    w = _dispatch.side(be, weight, "weight", h)
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
        b = _dispatch.side(be, bias, "bias", h)
        if be.kind(b) != "f" or be.dtype_name(b) != be.dtype_name(h):
            raise XSeqLossTypeError(f"bias has dtype {be.dtype_name(b)} but hidden has {be.dtype_name(h)}: hidden, "
                                    f"weight and bias share one floating dtype (never cast for you)")
        if tuple(be.shape(b)) != (C,):
            raise XSeqLossError(f"bias has shape {fmt_shape(be.shape(b))} but must be (C={C},) "
                                f"(weight {fmt_shape(ws, wl)})")
    shape = tuple(C if a == "H" else d for a, d in zip(hl, hshape))  # the logits it means
    call = _prepare_sides(be, o, None, shape, targets, mask=mask, lengths=lengths, weights=weights,
                          class_weights=class_weights, normalizer=normalizer, like=h, segment_ids=segment_ids)
    tokens = 1
    for a, d in zip(hl, hshape):
        if a != "H" and d is not None:
            tokens *= d
    if chunk_size is None:
        cap_bytes = getattr(be, "linear_chunk_bytes", CHUNK_BYTES)
        if call.st.plain:  # a backend that forms the gradient in the logits' buffer holds one chunk, not two
            cap_bytes *= getattr(be, "linear_plain_chunk_factor", lambda: 1)()
        cap = cap_bytes // (4 * max(int(ws[1 - hpos]), 1))
        if not call.st.plain:  # the general formula keeps a few chunk-sized temporaries
            cap //= 4
        chunk_size = max(1, min(cap, tokens))
    st = _static(o, call.st.C, call.st.soft, call.st.mark_bad, call.st.has_mask, call.st.has_lengths,
                 call.st.has_weights, call.st.has_cw, call.st.has_normalizer,
                 limits=None if getattr(be, "index_limits", None) is None else be.index_limits(),
                 engine=_engine.DEFAULT if call.tracing and be.name == "torch" else _engine.current(be.name),
                 has_segments=call.st.has_segments, linear=(hl.index("H"), wl, chunk_size),
                 store=not (call.tracing and be.name == "torch"))
    call.st = st
    # jax.grad without jit: the hidden states are traced, the labels concrete (decisions.md 24)
    call.check_sides = bool(o.validate and call.tracing and not any(
        be.tracing(a) for a in call.arrays[1:] if a is not None))
    return call, h, w, b


# ----------------------------------------------------------------------------------- the core

def linear_core(ops: Any, st: Static, h: Any, w: Any, b: Any, y: Any, t: Any, mask: Any, lengths: Any,
                weights: Any, cw: Any, normalizer: Any, segs: Any = None, want_grad: bool = False) -> Any:
    """The loss of the fused layer; with ``want_grad`` (NumPy) also (d hidden, d weight, d bias).
    The plan (which tokens count, the coefficient, the reduction) is the core's; the per-token losses
    come from the backend's chunk loop over the flattened tokens."""
    hpos, wl, chunk = st.linear
    acc = ops.acc_dtype(h)
    like = y if y is not None else ops.drop_class(t, st.opts.k)
    p = token_plan(ops, st, like, acc, y, t, mask, lengths, weights, cw, normalizer, segs)
    hr = ops.moveaxis(h, hpos, -1) if hpos != ops.ndim(h) - 1 else h
    h2 = ops.reshape_rows(hr)  # (tokens, H), in the token arrays' order
    flat = (lambda x: None if x is None else ops.flat(x))
    t2 = None if p.t is None else ops.reshape_rows(ops.moveaxis(p.t, st.opts.k, -1))
    scale = p.cotangent if want_grad else p.expected_dl
    res = ops.linear_token_loss(st.kernel, h2, w, b, flat(p.y), t2, flat(p.counted), p.cw, acc,
                                lambda: flat(scale()), chunk, wl, want_grad, st.class_parallel)
    l2 = res[0] if want_grad else res
    out = p.combine(ops.reshape_like(l2, like))
    result = p.finish(out)
    if not want_grad:
        return result
    dh2, dw, db = res[1]
    dh = ops.reshape_like(dh2, hr)
    if hpos != ops.ndim(h) - 1:
        dh = ops.moveaxis(dh, -1, hpos)
    return result, (dh, dw, db)


def even_chunk(R: int, chunk: int) -> int:
    """A chunk size <= ``chunk`` that divides R when one is near (at most twice as many chunks):
    whole chunks need no padded copy of the hidden states and no sliced copy of d hidden, each
    a d-hidden-sized temporary that grows with the tokens."""
    n0 = max(1, -(-R // max(chunk, 1)))
    for n in range(n0, min(2 * n0, R) + 1):
        if R % n == 0:
            return R // n
    return chunk


def counted_rows(ops: Any, h: Any, keep: Any) -> Any:
    """A chunk's (rows, H) hidden states with the rows that do not count zeroed: garbage there
    (NaN, inf) reaches neither the logits nor d weight (decision 55), and the core needs no masked
    copy of those rows' logits (``token_loss(rows_clean=True)``)."""
    return h if keep is None else ops.where(ops.expand(keep, 1), h, 0.0)


def chunk_grad(ops: Any, kst: Static, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any, scale: Any,
               rows_clean: bool = False) -> tuple[Any, Any]:
    """A chunk's per-token losses and d/d z times ``scale`` (per row), from its float32 logits."""
    lean = getattr(ops, "plain_chunk_grad", None)
    if lean is not None and kst.plain:
        return lean(z, y, keep, scale)
    l, g = token_loss(ops, kst, z, y, t, keep, cw, acc, want_grad=True, k=1, rows_clean=rows_clean)
    return l, g * ops.expand(scale, 1)
