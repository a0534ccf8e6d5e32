"""The semantics of ``sequence_cross_entropy``, written once over a small set of backend ops.

Pipeline of one call (docs/semantics.md states each rule with examples):

1. static checks of the options (``_checks.parse_options``), the backend and the logits;
2. side arrays moved to the logits' framework and device, their shapes and dtypes checked;
3. eager value checks (``validate=True`` and not tracing): targets, lengths, class weights, probs;
4. the numeric core ``_numeric`` (pure; JAX runs it through a cached ``jax.jit``):
   which tokens count -> per-token loss l (the backend's native kernel along its own class axis)
   -> token weights -> reduction over the chosen denominator.

Under tracing or ``validate=False`` the value problems that step 3 would have raised instead mark
"bad" tokens: their loss is multiplied by NaN, which makes the loss and the gradient row NaN there
and nowhere else. Labels are clamped into [0, C) before any gather, so nothing reads out of bounds.
"""

from __future__ import annotations

import warnings
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks, _dispatch
from ._checks import Options, fmt_shape, position, shape_error
from ._errors import XSeqLossError, XSeqLossTypeError

__all__ = ["sequence_cross_entropy", "value_and_grad", "token_count"]


# ------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Static:
    """Everything the numeric core needs besides arrays; hashable (a jax.jit static argument)."""
    opts: Options
    C: int | None           # None only in token_count without class weights
    soft: bool
    eps: float              # uniform-convention smoothing ("others" converted)
    mark_bad: bool          # compute bad-token NaNs (tracing or validate=False)
    has_mask: bool
    has_lengths: bool
    has_weights: bool
    has_cw: bool
    has_normalizer: bool

    @property
    def native_default(self) -> bool:
        """The default call (plain logits, at most one ignore value, no mask, lengths, weights or
        normalizer, mean over tokens, sum or none): exactly a framework's own
        ``cross_entropy(ignore_index=...)``, which an eager backend may run directly
        (``native_default_loss``, see ``_native_default``) when that is the fastest way."""
        o = self.opts
        return (self.plain and not (self.has_mask or self.has_lengths or self.has_weights or self.has_normalizer)
                and len(o.ignore) <= 1 and o.reduction in ("mean", "sum", "none")
                and o.denominator != "positions")

    @property
    def plain(self) -> bool:
        """Plain index cross-entropy on logits: the backend's fused native kernel applies."""
        o = self.opts
        return (not self.soft and o.inputs == "logits" and self.eps == 0.0 and not self.has_cw
                and o.z_loss == 0.0 and o.cap is None)


_STATIC_CACHE: dict[tuple, Static] = {}


def _static(o: Options, C: int | None, soft: bool, mark_bad: bool, *has: bool) -> Static:
    """The call's Static, cached: most calls repeat their options and shapes."""
    key = (o, C, soft, mark_bad, has)
    st = _STATIC_CACHE.get(key)
    if st is None:
        st = Static(o, C, soft, 0.0 if C is None else _uniform_eps(o, C), mark_bad, *has)
        if len(_STATIC_CACHE) < 1024:
            _STATIC_CACHE[key] = st
    return st


def _uniform_eps(opts: Options, C: int) -> float:
    if opts.smoothing == "others":
        return opts.eps * C / (C - 1) if C > 1 else 0.0
    return opts.eps


# ------------------------------------------------------------------------- per-token kernel (generic)

def token_loss(ops: Any, st: Static, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               want_grad: bool = False, k: int | None = None) -> tuple[Any, Any]:
    """Per-token loss l (acc dtype, token shape) and, if ``want_grad``, dl/dz (acc dtype, logits' shape).

    l = sum(q) * lse - q . x + z_loss * lse^2, with x the transformed inputs (softcap; log of clamped
    probabilities), lse = logsumexp(x) for logits (0 for log_probs/probs), and the target
    distribution q = (1 - eps) * cw[y] * onehot(y) + (eps / C) * cw (index targets, never built as a
    one-hot) or q = cw * ((1 - eps) * t + eps / C) (soft targets). Rows where ``keep`` is false give
    exactly 0 loss and exactly 0 gradient whatever their contents. ``k`` overrides the class axis
    (a backend's chunked kernel passes flattened (rows, C) chunks).
    """
    o, C, eps = st.opts, st.C, st.eps
    k = o.k if k is None else k
    if st.plain and not want_grad:
        return ops.nll(z, y, keep, k, acc), None
    keep_c = None if keep is None else ops.expand(keep, k)
    x = ops.cast(z, acc)
    if keep_c is not None:
        x = ops.where(keep_c, x, 0.0)  # NaN-safe: garbage rows never reach exp/log (nor their gradient)
    tanh = None
    if o.cap is not None:
        tanh = ops.tanh(x / o.cap)
        x = tanh * o.cap
    probs = None
    if o.inputs == "probs":
        probs = x
        x = ops.log(ops.maximum(x, _checks.PROB_EPS))
    lse = e = s = None
    if o.inputs == "logits":
        if want_grad:  # softmax as e / s from the max-shift: exp(x - lse) loses ulp(lse) in float32
            m = ops.stop_gradient(ops.max(x, k))
            m = ops.where(m == -np.inf, 0.0, m)
            e = ops.exp(x - ops.expand(m, k))
            s = ops.sum(e, k)
            lse = ops.log(s) + m
        else:
            lse = ops.logsumexp(x, k)
    cw_b = None if cw is None else ops.reshape_class(cw, k, ops.ndim(x))
    if st.soft:
        q = ops.cast(t, acc)
        if keep_c is not None:
            q = ops.where(keep_c, q, 0.0)
        if eps:
            q = q * (1.0 - eps) + eps / C
        if cw_b is not None:
            q = q * cw_b
        sumq = ops.sum(q, k)
        l = -ops.sum(q * x, k)
    else:
        a = (1.0 - eps) * (ops.take(cw, y) if cw is not None else 1.0)
        l = -a * ops.take_class(x, y, k)
        sumq = a
        if eps:
            b = eps / C
            sumq = sumq + b * (ops.sum(cw, 0) if cw is not None else float(C))
            l = l - b * (ops.classdot(x, cw, k) if cw is not None else ops.sum(x, k))
    if lse is not None:
        l = l + sumq * lse
        if o.z_loss:
            l = l + o.z_loss * lse * lse
    if keep is not None:
        l = ops.where(keep, l, 0.0)
    if not want_grad:
        return l, None
    # dl/dx = (sum(q) + 2 z_loss lse) softmax(x) - q, then the chain rule through softcap / log-clamp.
    if lse is not None:
        coef = sumq + 2.0 * o.z_loss * lse if o.z_loss else sumq
        if not isinstance(coef, float):
            coef = ops.expand(coef, k)
        g = e / ops.expand(s, k) * coef
    else:
        g = ops.zeros_like(x)
    if st.soft:
        g = g - q
    else:
        if eps:
            g = g - (eps / C) * (cw_b if cw_b is not None else 1.0)
        g = ops.add_class(g, y, -a if not isinstance(a, float) else ops.full_tokens(y, -a, acc), k)
    if tanh is not None:
        g = g * (1.0 - tanh * tanh)
    if probs is not None:
        g = ops.where(probs > _checks.PROB_EPS, g / ops.where(probs > _checks.PROB_EPS, probs, 1.0), 0.0)
    if keep_c is not None:
        g = ops.where(keep_c, g, 0.0)
    return l, g


# ------------------------------------------------------------------------------ the numeric core

def _axes(tok: str, letters: str) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(tok) if a in letters)


def _sum(ops: Any, x: Any, axes: tuple[int, ...] | None) -> Any:
    """Sum over ``axes`` (None: all, giving a scalar; (): none, the identity)."""
    return x if axes == () else ops.sum(x, axes)


def _inverse(ops: Any, den: Any) -> tuple[Any, Any]:
    """(1/den, or 0 where den == 0; den == 0): the gradient through an empty denominator is exactly 0."""
    zero = den == 0
    return ops.where(zero, 0.0, 1.0 / ops.where(zero, 1.0, den)), zero


def _divide(ops: Any, num: Any, inv: Any, zero: Any, empty: str) -> Any:
    """num / den from ``_inverse``'s output, with the empty rule where den == 0."""
    out = num * inv
    return ops.where(zero, float("nan"), out) if empty == "nan" else out


def _counted(ops: Any, st: Static, y: Any, mask: Any, lengths: Any, like: Any) -> tuple[Any, Any]:
    """Which tokens count (bool, token shape, or None for all) and which counted ones are bad (or None).

    A sequence with a bad length (negative or > T, only possible when values are not validated) is
    counted whole, so that every one of its tokens shows the NaN.
    """
    o, tok = st.opts, st.opts.tok_layout
    counted = None if mask is None else ops.nonzero(mask)
    bad = None
    if lengths is not None:
        na, ta = tok.index("N"), tok.index("T")
        T = ops.dim(like, ta)
        steps = ops.expand(ops.arange(T, like=lengths), na)
        inside = steps < ops.expand(lengths, ta)
        if st.mark_bad:
            seq_bad = ops.expand((lengths < 0) | (lengths > T), ta) & (steps >= 0)  # broadcast to tokens
            inside = inside | seq_bad
            bad = seq_bad
        counted = inside if counted is None else (counted & inside)
    if not st.soft and o.ignore:
        if len(o.ignore) == 1:
            kept = y != o.ignore[0]
        else:
            ignored = None
            for v in o.ignore:
                hit = y == v
                ignored = hit if ignored is None else (ignored | hit)
            kept = ~ignored
        counted = kept if counted is None else (counted & kept)
    if bad is not None and counted is not None:
        bad = bad & counted
    return counted, bad


def _or(a: Any, b: Any) -> Any:
    return b if a is None else (a | b)


def _den(ops: Any, st: Static, W: Any, counted: Any, like: Any, axes: tuple[int, ...] | None, acc: Any) -> Any:
    """The denominator summed over ``axes`` of the token array (None: all; (): per token).

    "weights": sum of W; "tokens": number of counted tokens; "positions": number of positions.
    Counts are integers, cast to the accumulation dtype only for the division.
    """
    d = st.opts.denominator
    if d == "weights" and W is not None:
        return _sum(ops, W, axes)
    flags = counted if (d != "positions" and counted is not None) else ops.true_like(like)
    if axes == ():
        return ops.cast(flags, acc)
    return ops.cast(ops.count(flags, axes), acc)


def _denominator_weights(ops: Any, st: Static, y: Any, counted: Any, w: Any, cw: Any) -> Any:
    """W[n, t]: weights * cw[y] at counted tokens (soft targets: weights only); None = all ones."""
    if st.opts.denominator != "weights":
        return None
    W = w
    if cw is not None and not st.soft:
        cwy = ops.take(cw, y)
        W = cwy if W is None else W * cwy
    if W is not None and counted is not None:
        W = ops.where(counted, W, 0.0)
    return W


def _numeric(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
             cw: Any, normalizer: Any, want_grad: bool = False) -> Any:
    o = st.opts
    tok = o.tok_layout
    acc = ops.acc_dtype(z)
    like = y if y is not None else ops.drop_class(z, o.k)
    counted, bad = _counted(ops, st, y, mask, lengths, like)
    if st.mark_bad and not st.soft:
        lab_bad = (y < 0) | (y >= st.C)
        bad = _or(bad, lab_bad if counted is None else (lab_bad & counted))
    if y is not None:
        y = ops.where((y >= 0) & (y < st.C), y, 0)  # clamp before any gather: never out of bounds, never wraps
    if cw is not None:
        cw = ops.cast(cw, acc)
        if st.mark_bad:
            cw = ops.where((cw >= 0) & ops.isfinite(cw), cw, float("nan"))
    if st.mark_bad and st.soft:
        rb = ops.any((t < 0) | ~ops.isfinite(t), o.k)
        bad = _or(bad, rb if counted is None else (rb & counted))
    if st.mark_bad and o.inputs == "probs":
        zz = ops.cast(z, acc)
        rb = ops.any((zz < 0) | (zz > 1) | ~ops.isfinite(zz), o.k) | (ops.abs(ops.sum(zz, o.k) - 1.0) > 1e-3)
        bad = _or(bad, rb if counted is None else (rb & counted))

    if st.mark_bad and o.inputs == "probs" and bad is not None:
        # clamps and wheres would drop the NaN from parts of the row's gradient: poison the input row
        z = z * ops.expand(ops.cast(ops.where(bad, float("nan"), 1.0), ops.dtype(z)), o.k)
    # token weights W (for the denominator) and the multiplier of each token's loss
    w = None if weights is None else ops.cast(weights, acc)
    if counted is not None and w is not None:
        w = ops.where(counted, w, 0.0)
    mult = w
    if bad is not None:
        nan_or_1 = ops.cast(ops.where(bad, float("nan"), 1.0), acc)
        mult = nan_or_1 if mult is None else mult * nan_or_1

    # the denominators never depend on the losses: coef = d result / d (weighted token loss), known
    # before the loss is computed, so a fused kernel can fold it into the gradient it forms in its
    # forward pass (see expected_dl below)
    red = o.reduction
    coef = 1.0  # (no annotation: autograph cannot convert an annotated name a closure reads)
    inv = zero = inv2 = zero2 = axes = None
    if red not in ("none", "sum"):
        W = _denominator_weights(ops, st, y, counted, w, cw)
        if red == "mean":
            D = ops.cast(normalizer, acc) if normalizer is not None else _den(ops, st, W, counted, like, None, acc)
            inv, zero = _inverse(ops, D)
            coef = inv
        else:
            over = "T" if red in ("per_sequence", "sequence_mean") else "N"
            axes = _axes(tok, over)
            inv, zero = _inverse(ops, _den(ops, st, W, counted, like, axes, acc))
            coef = ops.expand(inv, tok.index(over)) if axes else inv
            if red == "sequence_mean":
                n_seq = ops.cast(normalizer if normalizer is not None else ops.dim(like, tok.index("N")), acc)
                inv2, zero2 = _inverse(ops, n_seq)
                coef = coef * inv2

    def expected_dl() -> Any:
        """d result / d l per token when result's own upstream gradient is 1 (bad-token NaNs left
        out): what a fused kernel's backward receives in the common case."""
        ct = ops.full_tokens(like, 1.0, acc) * coef  # coef may be a Python float or a 0-d array
        if w is None:
            return ct
        ct = ct * w
        return ct if counted is None else ops.where(counted, ct, 0.0)  # as ``out`` below

    def cotangent() -> Any:
        """d result / d l per token, bad-token NaNs included: the gradient's per-row factor."""
        ct = ops.full_tokens(like, 1.0, acc) * coef
        if mult is not None:
            ct = ct * mult
        return ct if counted is None else ops.where(counted, ct, 0.0)

    l = g = grad = None
    if want_grad:  # without autodiff (NumPy): a backend's kernel forms the scaled gradient itself
        fused_vg = getattr(ops, "fused_value_and_grad", None)
        if fused_vg is not None:
            l, grad = fused_vg(st, z, y, t, counted, cw, acc, cotangent())
    else:
        fused = getattr(ops, "fused_token_loss", None)  # a backend's own forward+backward kernel, if any
        l = None if fused is None else fused(st, z, y, t, counted, cw, acc, expected_dl)
    if l is None:
        l, g = token_loss(ops, st, z, y, t, counted, cw, acc, want_grad)

    out = l if mult is None else l * mult
    if counted is not None and mult is not None:
        out = ops.where(counted, out, 0.0)
    if red == "none":
        result = out
    elif red == "sum":
        result = ops.sum(out, None)
    elif red == "mean":
        result = _divide(ops, ops.sum(out, None), inv, zero, o.empty)
    else:
        result = _divide(ops, _sum(ops, out, axes), inv, zero, o.empty)
        if red == "sequence_mean":
            result = _divide(ops, ops.sum(result, None), inv2, zero2, o.empty)
    if not want_grad:
        return result
    if grad is None:
        grad = g * ops.expand(cotangent(), o.k)
    return result, grad


# ---------------------------------------------------------------------------------- preparation

@dataclass
class _Call:
    """One prepared call. ``shape`` is the logits' shape; values are checked when ``st.mark_bad``
    is false (eager with validate=True)."""
    be: Any
    st: Static
    z: Any
    y: Any
    t: Any
    mask: Any
    lengths: Any
    weights: Any
    cw: Any
    normalizer: Any
    shape: tuple[Any, ...] = ()
    tracing: bool = False

    @property
    def arrays(self) -> tuple[Any, ...]:
        return (self.z, self.y, self.t, self.mask, self.lengths, self.weights, self.cw, self.normalizer)


def _prepare(logits: Any, targets: Any, *, layout: Any = "NTC", mask: Any = None, lengths: Any = None,
             ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
             inputs: Any = "logits", label_smoothing: Any = 0.0, smoothing: Any = "uniform",
             z_loss: Any = 0.0, logit_softcap: Any = None, reduction: Any = "mean",
             denominator: Any = "weights", normalizer: Any = None, empty: Any = "zero",
             num_classes: Any = None, validate: Any = True, backend: Any = None,
             inplace_backward: Any = False) -> _Call:
    o = _checks.parse_options(layout=layout, ignore_index=ignore_index, inputs=inputs,
                              label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss,
                              logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
                              empty=empty, num_classes=num_classes, validate=validate,
                              inplace_backward=inplace_backward)
    be, z = _dispatch.resolve(logits, backend)
    if o.inplace and be.name != "torch":
        raise XSeqLossError(f"inplace_backward=True is PyTorch only; backend {be.name!r} does not support it")
    kind = be.kind(z)
    if kind != "f":
        raise XSeqLossTypeError(f"logits must have a floating dtype, got {be.dtype_name(z)}; "
                                f"integer logits are never cast for you")
    shape = be.shape(z)
    L = o.layout
    if len(shape) != len(L):
        raise XSeqLossError(f"logits have {len(shape)} axes, shape {fmt_shape(shape)}, but layout={L!r} names "
                            f"{len(L)}; give one letter per axis")
    C = shape[o.k]
    if C is None:
        raise XSeqLossError(f"the class axis of logits (axis {o.k}, 'C' in layout={L!r}) must have a static size")
    if C == 0:
        raise XSeqLossError(f"logits have C = 0 classes (axis {o.k}, shape {fmt_shape(shape, L)}): "
                            f"at least one class is required, valid range [1, inf)")
    return _prepare_sides(be, o, z, shape, targets, mask=mask, lengths=lengths, weights=weights,
                          class_weights=class_weights, normalizer=normalizer)


def _prepare_sides(be: Any, o: Options, z: Any, shape: tuple[Any, ...], targets: Any, *, mask: Any,
                   lengths: Any, weights: Any, class_weights: Any, normalizer: Any,
                   like: Any = None) -> _Call:
    """Targets and side arrays against the logits' ``shape`` (``z`` is None for token_count)."""
    like = z if like is None else like
    L = o.layout
    C = shape[o.k]
    tok_shape = tuple(d for d, a in zip(shape, L) if a != "C")
    tok = o.tok_layout
    if o.num_classes is not None and C is not None and C != o.num_classes:
        fits = _checks.layouts_with_classes(shape, L, o.num_classes)
        raise XSeqLossError(
            f"logits have C = {C} along axis {o.k} ('C' in layout={L!r}, shape {fmt_shape(shape, L)}) but "
            f"num_classes={o.num_classes}; a swapped layout is invisible in the shapes when T == C, which is "
            f"what num_classes catches{_checks.suggest(fits)}")

    # targets: index (integer, tokens' shape) or soft (floating, logits' shape)
    y = _dispatch.side(be, targets, "targets", like)
    tkind = be.kind(y)
    tshape = be.shape(y)
    if tkind == "b":
        raise XSeqLossTypeError("targets have dtype bool; targets must be integer class ids (or floating "
                                "probabilities with logits' shape); bool is never cast for you")
    if tkind not in "fiu":
        raise XSeqLossTypeError(f"targets must be integer class ids or floating probabilities, got {be.dtype_name(y)}")
    soft = tkind == "f"
    if soft and not _checks.same_shape(tshape, shape):
        if _checks.same_shape(tshape, tok_shape):
            raise XSeqLossTypeError(
                f"targets have a floating dtype ({be.dtype_name(y)}) and the tokens' shape {fmt_shape(tshape)}: "
                f"class ids must be integers (floats are never truncated); use an integer dtype, or give soft "
                f"targets with logits' shape {fmt_shape(shape, L)}")
        raise shape_error("targets", tshape, shape, L, " (soft targets have logits' shape)"
                          + _checks.suggest(_checks.fitting_layouts(shape, L, tshape, True)))
    if not soft and not _checks.same_shape(tshape, tok_shape):
        extra = ""
        if len(tshape) == len(tok_shape) + 1 and tshape[-1] == 1 and _checks.same_shape(tshape[:-1], tok_shape):
            extra = " - squeeze the trailing axis of size 1 (targets[..., 0])"
        extra += _checks.suggest(_checks.fitting_layouts(shape, L, tshape, False))
        raise shape_error("targets", tshape, tok_shape, tok, extra)
    t = y if soft else None
    y = None if soft else be.index_dtype(y)

    def token_side(x: Any, name: str, kinds: str) -> Any:
        x = _dispatch.side(be, x, name, like)
        if x is None:
            return None
        if be.kind(x) not in kinds:
            raise XSeqLossTypeError(f"{name} has dtype {be.dtype_name(x)}; it must be "
                                    + ("bool or numeric" if "b" in kinds else "numeric (not bool)"))
        if not _checks.same_shape(be.shape(x), tok_shape):
            raise shape_error(name, be.shape(x), tok_shape, tok)
        return x

    mask = token_side(mask, "mask", "biuf")
    weights = token_side(weights, "weights", "iuf")
    if lengths is not None:
        if "N" not in L or "T" not in L:
            raise XSeqLossError(f"lengths needs both N and T in the layout, got layout={L!r}")
        lengths = _dispatch.side(be, lengths, "lengths", like)
        if be.kind(lengths) not in "iu":
            raise XSeqLossTypeError(f"lengths must have an integer dtype, got {be.dtype_name(lengths)}; "
                                    f"non-integer lengths are never rounded for you")
        n_shape = (shape[L.index("N")],)
        if not _checks.same_shape(be.shape(lengths), n_shape):
            raise shape_error("lengths", be.shape(lengths), n_shape, "N")
        lengths = be.index_dtype(lengths)
    cw = None
    if class_weights is not None:
        cw = _dispatch.side(be, class_weights, "class_weights", like)
        if be.kind(cw) not in "iuf":
            raise XSeqLossTypeError(f"class_weights must be numeric, got {be.dtype_name(cw)}")
        if C is None:
            C = be.shape(cw)[0]
        if not _checks.same_shape(be.shape(cw), (C,)):
            raise shape_error("class_weights", be.shape(cw), (C,), "C")
    if normalizer is not None:
        _checks.normalizer_reduction(o.reduction)
        if _dispatch.framework_of(normalizer) is None and np.ndim(normalizer) == 0 and not hasattr(normalizer, "dtype"):
            _checks.number(normalizer, "normalizer", 0.0)
        normalizer = _dispatch.side(be, normalizer, "normalizer", like)
        if be.shape(normalizer) != ():
            raise XSeqLossError(f"normalizer must be a scalar, got shape {fmt_shape(be.shape(normalizer))}")
    tracing = be.tracing(like)
    check_values = o.validate and not tracing
    st = _static(o, None if C is None else int(C), soft, not check_values, mask is not None, lengths is not None,
                 weights is not None, cw is not None, normalizer is not None)
    call = _Call(be, st, z, y, t, mask, lengths, weights, cw, normalizer)
    call.shape = shape
    call.tracing = tracing
    return call


# -------------------------------------------------------------------------------- value checks

def _first(be: Any, bad: Any) -> tuple[int, ...] | None:
    """Index of the first true element (host sync; only when something is wrong)."""
    arr = be.to_numpy(bad)
    if not arr.any():
        return None
    return tuple(int(i) for i in np.argwhere(arr)[0])


def _value_flags(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                 cw: Any, normalizer: Any) -> dict[str, Any]:
    """One scalar flag per kind of value problem: a single backend call (jitted on JAX) and one
    host read per flag, so validation stays cheap; the details are looked up only on failure."""
    o, C = st.opts, st.C
    m = _counted(ops, st, y, mask, lengths, y if y is not None else ops.drop_class(t, o.k))[0]
    flags = {}
    if y is not None:
        bad = (y < 0) if C is None else ((y < 0) | (y >= C))
        flags["targets"] = ops.any(bad if m is None else (bad & m), None)
    if lengths is not None:
        T = ops.dim(y if y is not None else ops.drop_class(t, o.k), o.tok_layout.index("T"))
        flags["lengths"] = ops.any((lengths < 0) | (lengths > T), None)
    if cw is not None:
        flags["class_weights"] = ops.any(~ops.isfinite_any_dtype(cw) | (cw < 0), None)
    if normalizer is not None:
        flags["normalizer"] = ops.any(~ops.isfinite_any_dtype(normalizer) | (normalizer < 0), None)
    if t is not None:
        bad = ops.any((t < 0) | ~ops.isfinite(t), o.k)
        flags["soft"] = ops.any(bad if m is None else (bad & m), None)
    if z is not None and o.inputs == "probs":
        p = ops.cast(z, ops.acc_dtype(z))
        bad = ops.any((p < 0) | (p > 1) | ~ops.isfinite(p), o.k) | (ops.abs(ops.sum(p, o.k) - 1.0) > 1e-3)
        flags["probs"] = ops.any(bad if m is None else (bad & m), None)
    return flags


def _check_values(call: _Call) -> None:
    """Validate values in a call of their own (value_and_grad, token_count): no softmax probe."""
    flags = call.be.run(_value_flags, call.st, *call.arrays)
    if any(call.be.to_numpy(f) for f in flags.values()):
        _raise_value_error(call, call.shape)


def _numeric_checked(ops: Any, st: Static, *arrays: Any, probe: bool = True) -> tuple[Any, Any]:
    """The loss and the value-check flags (one vector, the softmax probe last when it rides here) in
    one backend call (one jit dispatch on JAX, one traced call on TensorFlow, one host read
    everywhere): on bad input the loss is discarded and the error raised on the host."""
    flags = _value_flags(ops, st, *arrays)
    z, k = arrays[0], st.opts.k
    shape = ops.shape(z) if z is not None else ()
    if probe and _probe_in_core(ops, st, shape):
        flags["looks_like_probs"] = _looks_like_probs(ops, z, shape, k)
    return _numeric(ops, st, *arrays), (ops.stack(list(flags.values())) if flags else None)


def _numeric_flagged(ops: Any, st: Static, *arrays: Any) -> tuple[Any, Any]:
    """_numeric_checked without the softmax probe: value_and_grad's checks, in the program that
    computes the loss when a backend offers ``value_and_grad_flagged``."""
    return _numeric_checked(ops, st, *arrays, probe=False)


def _probe_in_core(ops: Any, st: Static, shape: tuple[Any, ...]) -> bool:
    """The softmax-input probe rides in the core on JAX and TensorFlow (one program); eager NumPy
    and PyTorch read a few rows on the host instead (ops there cost a dispatch each)."""
    return not getattr(ops, "host_probe", False) and _probe_applies(st, shape)


def _probe_applies(st: Static, shape: tuple[Any, ...]) -> bool:
    k = st.opts.k
    return st.opts.inputs == "logits" and bool(shape) and shape[k] is not None and shape[k] >= 2 and 0 not in shape


def _looks_like_probs(ops: Any, z: Any, shape: tuple[Any, ...], k: int) -> Any:
    """True when the first few rows are in [0, 1] and sum to 1 (reads a few rows, not the logits)."""
    rows = ops.cast(z[_sample_index(shape, k, _SAMPLE_ROWS)], ops.acc_dtype(z))
    inside = ops.all((rows >= 0) & (rows <= 1), None) & (ops.size(rows) > 0)  # shapes may be unknown
    return inside & ops.all(ops.abs(ops.sum(rows, k) - 1.0) <= 1e-3, None)


def _looks_like_probs_host(call: _Call) -> bool:
    """The same probe on the host, short-circuiting on the first value outside [0, 1]."""
    idx = _sample_index(call.shape, call.st.opts.k, _SAMPLE_ROWS)
    host = call.be.host_view(call.z)  # the whole array without a copy, or None (then copy the rows)
    rows = call.be.to_numpy(call.z[idx]) if host is None else host[idx]
    with np.errstate(invalid="ignore"):  # NaN is not >= 0: not a probability row
        if rows.size == 0 or not (rows.min() >= 0 and rows.max() <= 1):  # logits: min < 0 at once
            return False
        return bool(np.all(np.abs(rows.astype(np.float64).sum(call.st.opts.k) - 1.0) <= 1e-3))


def _act_on_flags(call: _Call, flagvec: Any) -> None:
    be = call.be
    values = [] if flagvec is None else be.to_numpy(flagvec).tolist()
    probs_like = values.pop() if call.z is not None and _probe_in_core(be, call.st, call.shape) else None
    if any(values):  # which check fired is found again on the slow path, with its position and value
        _raise_value_error(call, call.shape)
    if probs_like is None and call.z is not None and getattr(be, "host_probe", False) \
            and _probe_applies(call.st, call.shape):
        probs_like = _looks_like_probs_host(call)
    if probs_like:
        warnings.warn("xseqloss: the logits look like probability rows (in [0, 1], summing to 1): did you "
                      'pass softmax outputs? Use inputs="probs" for probabilities, or pass raw logits.',
                      UserWarning, stacklevel=4)


def _counted_tokens(ops: Any, st: Static, y: Any, t: Any, mask: Any, lengths: Any) -> Any:
    like = y if y is not None else ops.drop_class(t, st.opts.k)
    counted = _counted(ops, st, y, mask, lengths, like)[0]
    return ops.true_like(like) if counted is None else counted


def _raise_value_error(call: _Call, shape: tuple[Any, ...]) -> None:
    """The slow path: find the first offending element of the first problem and raise."""
    be, st = call.be, call.st
    o, C = st.opts, st.C
    counted = None
    if call.y is not None or call.t is not None:
        counted = be.run(_counted_tokens, st, call.y, call.t, call.mask, call.lengths)
    if call.y is not None:
        y = call.y
        bad = (y < 0) if C is None else ((y < 0) | (y >= C))
        bad = bad & counted
        if be.any_true(bad):
            pos = _first(be, bad)
            if pos is not None:
                value = be.to_numpy(y)[pos]
                ign = (f"or ignore_index={o.ignore[0] if len(o.ignore) == 1 else list(o.ignore)}"
                       if o.ignore else "and ignore_index=None")
                raise XSeqLossError(
                    f"targets{position(pos)} = {value} is out of range: valid class ids are [0, {C if C else 'C'}) "
                    f"(C = {C}) {ign}" + ("; negative labels never wrap" if value < 0 else ""))
    if call.lengths is not None:
        T = shape[o.layout.index("T")]
        lens = call.lengths
        bad = (lens < 0) | (lens > T)
        if be.any_true(bad):
            pos = _first(be, bad)
            value = be.to_numpy(lens)[pos]
            raise XSeqLossError(f"lengths{position(pos)} = {value} is out of range: valid lengths are "
                                f"[0, {T}] (T = {T})")
    if call.cw is not None:
        cw = call.cw
        bad = ~be.isfinite_any_dtype(cw) | (cw < 0)
        if be.any_true(bad):
            pos = _first(be, bad)
            value = be.to_numpy(cw)[pos]
            raise XSeqLossError(f"class_weights{position(pos)} = {value} is invalid: class weights must be "
                                f"finite and in [0, inf)")
    if call.normalizer is not None and _dispatch.framework_of(call.normalizer) is not None:
        v = float(be.to_numpy(call.normalizer))
        if not np.isfinite(v) or v < 0:
            raise XSeqLossError(f"normalizer = {v} is out of range: valid range is [0, inf)")
    if call.t is not None:
        # soft targets: entries must be finite and >= 0 at tokens that count
        tt = be.to_numpy(call.t)
        bad = ~np.isfinite(tt.astype(np.float64)) | (tt.astype(np.float64) < 0)
        bad &= np.expand_dims(be.to_numpy(counted), o.k)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise XSeqLossError(f"targets{position(pos)} = {tt[pos]} is invalid: soft-target probabilities "
                                f"must be finite and in [0, 1]")
    if call.z is not None and o.inputs == "probs":
        _check_probs(call, be.to_numpy(counted))


def _check_probs(call: _Call, keep: np.ndarray) -> None:
    be, o = call.be, call.st.opts
    p = be.to_numpy(call.z).astype(np.float64)
    p = np.moveaxis(p, o.k, -1)
    out = ((p < 0) | (p > 1) | ~np.isfinite(p)) & keep[..., None]
    if out.any():
        idx = tuple(int(i) for i in np.argwhere(out)[0])
        full = list(idx[:-1])
        full.insert(o.k, idx[-1])
        raise XSeqLossError(f"logits{position(full)} = {p[idx]} is not a probability (inputs='probs'): values "
                            f'must be in [0, 1]; if these are raw scores use inputs="logits"')
    sums = p.sum(-1)
    off = (np.abs(sums - 1.0) > 1e-3) & keep
    if off.any():
        idx = tuple(int(i) for i in np.argwhere(off)[0])
        row = ", ".join([str(i) for i in idx[:o.k]] + [":"] + [str(i) for i in idx[o.k:]])
        raise XSeqLossError(f"logits[{row}] sums to {sums[idx]:.6g} (inputs='probs'): probability rows must "
                            f"sum to 1 within 1e-3, i.e. in [0.999, 1.001]; if these are raw scores use "
                            f"inputs='logits'")


_SAMPLE_ROWS = 4


@functools.lru_cache(maxsize=256)
def _sample_index(shape: tuple[Any, ...], k: int, n: int) -> tuple[slice, ...]:
    """Static slices selecting at most n class rows at the start of the array (a small view)."""
    idx = [slice(0, 1)] * len(shape)
    idx[k] = slice(None)
    others = [a for a in range(len(shape)) if a != k]
    if others:
        idx[others[-1]] = slice(0, n)
    return tuple(idx)


# ------------------------------------------------------------------------------------ public API

def sequence_cross_entropy(logits: Any, targets: Any, *, layout: str = "NTC", mask: Any = None,
                           lengths: Any = None, ignore_index: Any = -100, weights: Any = None,
                           class_weights: Any = None, inputs: str = "logits", label_smoothing: float = 0.0,
                           smoothing: str = "uniform", z_loss: float = 0.0, logit_softcap: float | None = None,
                           reduction: str = "mean", denominator: str = "weights", normalizer: Any = None,
                           empty: str = "zero", num_classes: int | None = None, validate: bool = True,
                           backend: str | None = None, inplace_backward: bool = False) -> Any:
    """Cross-entropy of a sequence model's outputs, with one meaning on NumPy, PyTorch, TensorFlow and JAX.

    Per counted token (after ``logit_softcap``), with lse = logsumexp(z), eps = ``label_smoothing`` and
    class weights cw: ``l = (1 - eps) cw[y] (lse - z[y]) + (eps / C) sum_c cw[c] (lse - z[c]) + z_loss lse^2``,
    multiplied by ``weights``, reduced by ``reduction`` over ``denominator``. docs/semantics.md has every rule.

    Args:
        logits: array with axes named by ``layout`` (default "NTC"); floating point.
        targets: integer class ids (logits' axes minus C), or floating probabilities with logits' shape.
        layout: order of the axes N (batch), T (time), C (classes); C required.
        mask, lengths, ignore_index: which tokens count (all must hold).
        weights, class_weights: per-token and per-class weights.
        inputs: "logits", "log_probs" or "probs".
        label_smoothing, smoothing: eps and its convention ("uniform" or "others").
        z_loss, logit_softcap: PaLM-style z-loss and Gemma-style softcap.
        reduction, denominator, normalizer, empty: how the per-token losses are reduced.
        num_classes: the expected size of the C axis.
        validate: check values in eager mode (raise) instead of marking bad tokens NaN.
        backend: "numpy", "torch", "tensorflow" or "jax"; default from the logits' type.
        inplace_backward: PyTorch only: write the gradient into the logits' storage.

    Returns:
        The loss in the backend's array type on the logits' device (float32 for float16/bfloat16 input).

    >>> import numpy as np, xseqloss as xsl
    >>> logits = np.zeros((1, 2, 4)); targets = np.array([[1, -100]])
    >>> round(float(xsl.sequence_cross_entropy(logits, targets)), 6)  # log(4), the ignored token excluded
    1.386294
    """
    call = _prepare(logits, targets, layout=layout, mask=mask, lengths=lengths, ignore_index=ignore_index,
                    weights=weights, class_weights=class_weights, inputs=inputs,
                    label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss,
                    logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
                    normalizer=normalizer, empty=empty, num_classes=num_classes, validate=validate,
                    backend=backend, inplace_backward=inplace_backward)
    if call.st.native_default and not call.tracing:
        result = _native_default(call)
        if result is not None:
            return result
    if call.st.mark_bad:
        return call.be.run(_numeric, call.st, *call.arrays)
    result, flags = call.be.run(_numeric_checked, call.st, *call.arrays)
    _act_on_flags(call, flags)
    return result


def _native_default(call: _Call) -> Any:
    """The default call (``Static.native_default``) through the backend's own small kernel, or None.

    Eager calls only. ``native_default_loss(st, z, y)`` returns the loss only when every label is in [0, C) or is the
    ignore value (the backend checks that as part of its kernel); otherwise, and where it does not
    apply (size, dtype, device, tracing), it returns None and the general path runs, which raises the
    error (validate=True) or marks the bad tokens NaN (validate=False). decisions.md item 21.
    """
    native = getattr(call.be, "native_default_loss", None)
    result = None if native is None else native(call.st, call.z, call.y)
    if result is not None and not call.st.mark_bad:
        _act_on_flags(call, None)  # the softmax probe
    return result


def value_and_grad(logits: Any, targets: Any, **options: Any) -> tuple[Any, Any]:
    """``(loss, d loss / d logits)`` in the backend's own types; NumPy's gradient is analytic.

    For a non-scalar reduction the gradient is that of the sum of the output.

    >>> import numpy as np, xseqloss as xsl
    >>> loss, grad = xsl.value_and_grad(np.zeros((1, 1, 2)), np.array([[0]]))
    >>> grad.round(3).tolist()  # (softmax - onehot) / 1
    [[[-0.5, 0.5]]]
    """
    call = _prepare(logits, targets, **options)
    be = call.be
    if not call.st.mark_bad:
        joint = getattr(be, "value_and_grad_flagged", None)  # JAX: the checks ride in the same program
        if joint is None:
            _check_values(call)
        else:
            result, grad, flags = joint(_numeric_flagged, call.st, *call.arrays)
            if flags is not None and any(be.to_numpy(flags).tolist()):
                _raise_value_error(call, call.shape)
            return result, grad
    return be.value_and_grad(_numeric, call.st, *call.arrays)


def token_count(targets: Any, *, layout: str = "NTC", mask: Any = None, lengths: Any = None,
                ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
                denominator: str = "weights", num_classes: int | None = None, validate: bool = True,
                backend: str | None = None) -> Any:
    """The denominator D that ``reduction="mean"`` divides by, for summing across workers or micro-batches.

    Pass the sum over micro-batches back as ``normalizer=`` and the accumulated loss equals the
    full-batch mean exactly.

    >>> import numpy as np, xseqloss as xsl
    >>> int(xsl.token_count(np.array([[3, 1, -100]])))
    2
    """
    o = _checks.parse_options(layout=layout, ignore_index=ignore_index, inputs="logits", label_smoothing=0.0,
                              smoothing="uniform", z_loss=0.0, logit_softcap=None, reduction="mean",
                              denominator=denominator, empty="zero", num_classes=num_classes,
                              validate=validate, inplace_backward=False)
    be, y = _dispatch.resolve(targets, backend)
    tshape = be.shape(y)
    if be.kind(y) == "f" and len(tshape) == len(o.layout):
        shape = tshape  # soft targets: logits' shape
    else:
        shape_l = list(tshape)
        if len(shape_l) != len(o.layout) - 1:
            raise XSeqLossError(f"targets have shape {fmt_shape(tshape)} but layout={o.layout!r} needs "
                                f"{len(o.layout) - 1} axes (logits' axes minus C)")
        shape_l.insert(o.k, num_classes)
        shape = tuple(shape_l)
    call = _prepare_sides(be, o, None, shape, y, mask=mask, lengths=lengths, weights=weights,
                          class_weights=class_weights, normalizer=None, like=y)
    if not call.st.mark_bad:
        _check_values(call)
    return be.run(_count_core, call.st, *call.arrays)


def _count_core(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                cw: Any, normalizer: Any) -> Any:
    like = y if y is not None else ops.drop_class(t, st.opts.k)
    counted, _ = _counted(ops, st, y, mask, lengths, like)
    d = st.opts.denominator
    if d == "positions" or counted is None and (d == "tokens" or (weights is None and cw is None)):
        return ops.size(like)
    if d == "tokens" or (weights is None and cw is None):
        return ops.count(counted, None)
    acc = ops.acc_dtype(weights if weights is not None else cw)
    if y is not None and cw is not None:  # only class weights need the labels (C is then known)
        y = ops.where((y >= 0) & (y < st.C), y, 0)
    w = None if weights is None else ops.cast(weights, acc)
    cwc = None if cw is None else ops.cast(cw, acc)
    return ops.sum(_denominator_weights(ops, st, y, counted, w, cwc), None)
