"""Preparation of one call: options, backend, shapes and dtypes of the logits and every side
array, all static checks (``prepare_call`` -> ``Call``)."""

from __future__ import annotations

import operator
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from .. import _dispatch
from . import ragged as _ragged
from .._errors import XSeqLossError, XSeqLossTypeError
from ..core import sides
from ..plan import engine, messages, options
from ..plan.call_plan import CallPlan, make_plan
from ..plan.messages import fmt_shape, shape_error
from ..plan.options import Options


# True while a class-split call prepares its local slice (_class_parallel.prepare): a worker may
# hold 0 classes then (the workers together must hold at least one)
CLASS_SLICE: ContextVar[bool] = ContextVar("xseqloss_class_slice", default=False)


@dataclass
class Call:
    """One prepared call. ``shape`` is the logits' shape; values are checked when ``st.mark_nan``
    is false (eager with validate=True)."""
    be: Any
    st: CallPlan
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
    raw: dict | None = None        # labels / lengths before their index cast, for messages
    check_sides: bool = False      # traced logits but concrete side arrays: check those (JAX grad)
    segs: Any = None               # segment_ids
    rows: Any = None               # ragged rows: z is (R, C), the token arrays padded (ragged.py)
    tok_shape: tuple[Any, ...] = ()  # the token arrays' shape (padded for rows)
    ids: Any = None                # token_stats: ids (the targets' token shape + k), and
    temp: Any = None               # a temperature array (api/stats_call.py)
    hidden_size: Any = None        # the fused layer's H (api/layer.py), which class-split workers agree on

    @property
    def arrays(self) -> tuple[Any, ...]:
        return (self.z, self.y, self.t, self.mask, self.lengths, self.weights, self.cw, self.normalizer,
                self.segs, self.rows)


def prepare_call(logits: Any, targets: Any, *, layout: Any = "NTC", mask: Any = None, lengths: Any = None,
             ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
             inputs: Any = "logits", label_smoothing: Any = 0.0, smoothing: Any = "uniform",
             z_loss: Any = 0.0, logit_softcap: Any = None, reduction: Any = "mean",
             denominator: Any = "weights", normalizer: Any = None, empty: Any = "zero",
             num_classes: Any = None, validate: Any = True, backend: Any = None,
             inplace_backward: Any = False, shift: Any = 0, segment_ids: Any = None, rows: Any = None,
             padded: tuple[int, int] | None = None, stats: Any = None) -> Call:
    """``rows`` / ``padded`` come from the ragged edge (ragged.py): logits are (R, C) rows of the
    padded (N, T) batch ``padded``, rows[r] the flat index of row r; the layout is then "NTC"."""
    o = options.parse_options(layout=layout, ignore_index=ignore_index, inputs=inputs,
                              label_smoothing=label_smoothing, smoothing=smoothing, z_loss=z_loss,
                              logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
                              empty=empty, num_classes=num_classes, validate=validate,
                              inplace_backward=inplace_backward, shift=shift)
    be, z = _dispatch.resolve(logits, backend)
    if o.inplace and be.name != "torch":
        raise XSeqLossError(f"inplace_backward=True is PyTorch only; backend {be.name!r} does not support it")
    if o.inplace:
        be.check_inplace(z)
    shape = logits_shape(be, o, z, padded if rows is not None else None)
    return prepare_sides(be, o, z, shape, targets, mask=mask, lengths=lengths, weights=weights,
                         class_weights=class_weights, normalizer=normalizer, segment_ids=segment_ids,
                         rows=rows, stats=stats)


_PLAIN_OPTIONS = ("layout", "ignore_index", "inputs", "label_smoothing", "smoothing", "z_loss", "logit_softcap",
                  "reduction", "denominator", "empty", "num_classes", "validate", "backend", "shift")
_BACKEND = _PLAIN_OPTIONS.index("backend")
_PLAIN_SIDES = ("mask", "lengths", "weights", "class_weights", "normalizer", "segment_ids", "rows", "padded",
                "stats", "class_parallel")
_UNSET = object()
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), object})  # Python values only: a value is its key
_plain: dict = {}   # signature -> the fields of the Call that prepare_call made for it
_PLAIN_MAX = 512


def prepare_plain(logits: Any, targets: Any, kw: dict) -> Call:
    """``prepare_call(logits, targets, **kw)``, through ``plain_call`` where the call has no side array."""
    values = None
    if not (any(map(operator.is_not, map(kw.get, _PLAIN_SIDES), repeat(None)))
            or kw.get("inplace_backward", False) is not False):
        values = tuple(map(kw.get, _PLAIN_OPTIONS, repeat(_UNSET)))
    call = None if values is None else plain_call(logits, targets, values)
    return prepare_call(logits, targets, **kw) if call is None else call


def plain_call(logits: Any, targets: Any, values: tuple) -> Call | None:
    """The prepared call with no side arrays (``values``: the options in ``_PLAIN_OPTIONS``' order,
    ``_UNSET`` for those not given), or None where it does not apply (the caller takes the general
    path). The static part of such a call (options, plan, shapes) depends only on the arrays' types,
    dtypes and shapes and the options' values, so it is computed once per signature and reused (a
    small call would otherwise pay it on every training step, issue 25): every first call of a
    signature goes through ``prepare_call`` itself, so its checks and errors are the same code."""
    types = tuple(map(type, values))
    if not _PLAIN_TYPES.issuperset(types):  # e.g. a list of ignore values, an array: the general path
        return None
    pair = (type(logits), type(targets))
    owner = _PAIRS.get(pair)
    if owner is None:
        owner = _PAIRS[pair] = _plain_owner(logits, targets)
    backend = values[_BACKEND]
    if (not owner or (backend is not _UNSET and backend is not None and backend != owner)
            or (owner == "torch" and (logits.is_nested or targets.is_nested))
            or (owner == "numpy" and (backend is _UNSET or backend is None) and _dispatch.default_backend() != "numpy")):
        return None
    be = _dispatch.load(owner)
    if be.tracing(logits):
        return None
    y = be.to_device(targets, logits)
    key = (pair, logits.dtype, be.shape(logits), y.dtype, be.shape(y), engine.current(owner), be.index_limits(),
           values, types)
    fields = _plain.get(key)
    if fields is None:
        call = prepare_call(logits, targets, **{k: v for k, v in zip(_PLAIN_OPTIONS, values) if v is not _UNSET})
        if not call.tracing and len(_plain) < _PLAIN_MAX:
            _plain[key] = {k: v for k, v in vars(call).items() if k not in ("z", "y", "t", "raw")}
        return call
    call = Call.__new__(Call)
    vars(call).update(fields)
    call.z = logits
    if fields["st"].soft:
        call.y, call.t, call.raw = None, y, None
    else:
        call.y, call.t, call.raw = be.index_dtype(y), None, {"targets": y}
    return call


_PAIRS: dict = {}  # (type of logits, type of targets) -> the backend whose plain arrays both are, or ""


def _plain_owner(logits: Any, targets: Any) -> str:
    """The backend whose plain arrays (not ragged, not a DTensor) logits and targets both are, or
    "" (a fact of the two types, but for torch's nested tensors, checked per call)."""
    owner = sides.framework_of(logits)
    if owner is None:
        owner = "numpy" if type(logits) is np.ndarray else ""
    t_owner = sides.framework_of(targets)
    if t_owner is None:
        t_owner = "numpy" if type(targets) is np.ndarray else ""
    if (owner != t_owner or type(logits).__name__ == "DTensor" or type(targets).__name__ == "DTensor"
            or _ragged.kind_of(logits) not in (None, "nested") or _ragged.kind_of(targets) not in (None, "nested")):
        return ""
    return owner


def logits_shape(be: Any, o: Options, z: Any, padded: tuple | None = None) -> tuple[Any, ...]:
    """The logits' shape (``padded``: (N, T) of ragged rows, whose data is (R, C)), checked: a
    floating dtype, one axis per layout letter, a static C of at least 1."""
    if be.kind(z) != "f":
        raise XSeqLossTypeError(f"logits must have a floating dtype, got {be.dtype_name(z)}; "
                                f"integer logits are never cast for you")
    shape = be.shape(z)
    L = o.layout
    if padded is not None:  # (R, C) rows of the padded (N, T, C) batch
        shape = (*padded, shape[1])
    if len(shape) != len(L):
        raise XSeqLossError(f"logits have {len(shape)} axes, shape {fmt_shape(shape)}, but layout={L!r} names "
                            f"{len(L)}; give one letter per axis")
    C = shape[o.k]
    if C is None:
        raise XSeqLossError(f"the class axis of logits (axis {o.k}, 'C' in layout={L!r}) must have a static size")
    if C == 0 and not CLASS_SLICE.get():
        raise XSeqLossError(f"logits have C = 0 classes (axis {o.k}, shape {fmt_shape(shape, L)}): "
                            f"at least one class is required, valid range [1, inf)")
    return shape


def prepare_sides(be: Any, o: Options, z: Any, shape: tuple[Any, ...], targets: Any, *, mask: Any,
                   lengths: Any, weights: Any, class_weights: Any, normalizer: Any,
                   like: Any = None, segment_ids: Any = None, rows: Any = None, stats: Any = None) -> Call:
    """Targets and side arrays against the logits' ``shape`` (``z`` is None for token_count;
    ``targets`` may be None for token_stats, which passes its ``StatsPlan`` as ``stats``)."""
    like = z if like is None else like
    L = o.layout
    C = shape[o.k]
    tok_shape = tuple(d for d, a in zip(shape, L) if a != "C")
    tok = o.tok_layout
    if o.num_classes is not None and C is not None and C != o.num_classes:
        fits = messages.layouts_with_classes(shape, L, o.num_classes)
        raise XSeqLossError(
            f"logits have C = {C} along axis {o.k} ('C' in layout={L!r}, shape {fmt_shape(shape, L)}) but "
            f"num_classes={o.num_classes}; a swapped layout is invisible in the shapes when T == C, which is "
            f"what num_classes catches{messages.suggest(fits)}")

    # targets: index (integer, tokens' shape) or soft (floating, logits' shape)
    y = sides.side(be, targets, "targets", like)
    tkind = "i" if y is None else be.kind(y)
    tshape = tok_shape if y is None else be.shape(y)
    if stats is not None and tkind == "f" and not stats.metrics:
        raise XSeqLossTypeError(f"targets have a floating dtype ({be.dtype_name(y)}): token_stats takes class ids "
                                f"(integers of the tokens' shape {fmt_shape(tok_shape, tok)}), not soft targets")
    if stats is not None and tkind == "f" and ({"log_prob", "correct"} & set(stats.outputs)):
        raise XSeqLossError(f"return_stats={stats.outputs!r}: 'log_prob' and 'correct' need index targets (class ids), "
                            f"but the targets are soft (probabilities)")
    if tkind == "b":
        raise XSeqLossTypeError("targets have dtype bool; targets must be integer class ids (or floating "
                                "probabilities with logits' shape); bool is never cast for you")
    if tkind not in "fiu":
        raise XSeqLossTypeError(f"targets must be integer class ids or floating probabilities, got {be.dtype_name(y)}")
    soft = tkind == "f"
    if soft and rows is not None:
        if not messages.same_shape(tshape, be.shape(z)):
            raise shape_error("targets", tshape, be.shape(z), "RC", " (soft targets of ragged logits are their rows)")
    elif soft and not messages.same_shape(tshape, shape):
        if messages.same_shape(tshape, tok_shape):
            raise XSeqLossTypeError(
                f"targets have a floating dtype ({be.dtype_name(y)}) and the tokens' shape {fmt_shape(tshape)}: "
                f"class ids must be integers (floats are never truncated); use an integer dtype, or give soft "
                f"targets with logits' shape {fmt_shape(shape, L)}")
        raise shape_error("targets", tshape, shape, L, " (soft targets have logits' shape)"
                          + messages.suggest(messages.fitting_layouts(shape, L, tshape, True)))
    if not soft and not messages.same_shape(tshape, tok_shape):
        extra = ""
        if len(tshape) == len(tok_shape) + 1 and tshape[-1] == 1 and messages.same_shape(tshape[:-1], tok_shape):
            extra = " - squeeze the trailing axis of size 1 (targets[..., 0])"
        extra += messages.suggest(messages.fitting_layouts(shape, L, tshape, False))
        raise shape_error("targets", tshape, tok_shape, tok, extra)
    t = y if soft else None
    raw = None if soft or y is None else {"targets": y}  # the message shows the value as given, not as cast
    y = None if soft or y is None else be.index_dtype(y)

    def token_side(x: Any, name: str, kinds: str) -> Any:
        x = sides.side(be, x, name, like)
        if x is None:
            return None
        if be.kind(x) not in kinds:
            raise XSeqLossTypeError(f"{name} has dtype {be.dtype_name(x)}; it must be "
                                    + ("bool or numeric" if "b" in kinds else "numeric (not bool)" if "f" in kinds
                                       else "integer (not bool, not floating: ids are never rounded)"))
        if not messages.same_shape(be.shape(x), tok_shape):
            raise shape_error(name, be.shape(x), tok_shape, tok)
        return x

    mask = token_side(mask, "mask", "biuf")
    weights = token_side(weights, "weights", "iuf")
    segs = token_side(segment_ids, "segment_ids", "iu")
    if segs is not None:
        if "T" not in L:
            raise XSeqLossError(f"segment_ids mark documents along the time axis (T), but layout={L!r} has none")
        segs = be.index_dtype(segs)
    if o.reduction in ("per_segment", "segment_mean") and segs is None:
        raise XSeqLossError(f"reduction={o.reduction!r} averages over documents and needs segment_ids "
                            f"(the targets' shape, integers; a negative id marks padding)")
    if lengths is not None:
        if "N" not in L or "T" not in L:
            raise XSeqLossError(f"lengths needs both N and T in the layout, got layout={L!r}")
        lengths = sides.side(be, lengths, "lengths", like)
        if be.kind(lengths) not in "iu":
            raise XSeqLossTypeError(f"lengths must have an integer dtype, got {be.dtype_name(lengths)}; "
                                    f"non-integer lengths are never rounded for you")
        n_shape = (shape[L.index("N")],)
        if not messages.same_shape(be.shape(lengths), n_shape):
            raise shape_error("lengths", be.shape(lengths), n_shape, "N")
        raw = dict(raw or {}, lengths=lengths)
        lengths = be.index_dtype(lengths)
    cw = None
    if class_weights is not None:
        cw = sides.side(be, class_weights, "class_weights", like)
        if be.kind(cw) not in "iuf":
            raise XSeqLossTypeError(f"class_weights must be numeric, got {be.dtype_name(cw)}")
        if C is None:
            C = be.shape(cw)[0]
        if not messages.same_shape(be.shape(cw), (C,)):
            raise shape_error("class_weights", be.shape(cw), (C,), "C")
    if normalizer is not None:
        options.normalizer_reduction(o.reduction)
        # a Python number first (np.float64 is a float subclass: not one): np.ndim of a traced
        # constant breaks torch.compile's full graph
        if type(normalizer) in (int, float) or (sides.framework_of(normalizer) is None and not hasattr(
                normalizer, "dtype") and np.ndim(normalizer) == 0):
            options.number(normalizer, "normalizer", 0.0)
        normalizer = sides.side(be, normalizer, "normalizer", like)
        if be.shape(normalizer) != ():
            raise XSeqLossError(f"normalizer must be a scalar, got shape {fmt_shape(be.shape(normalizer))}")
    tracing = be.tracing(like)
    check_values = o.validate and not tracing
    limits = be.index_limits()
    st = make_plan(o, None if C is None else int(C), soft, not check_values, mask is not None, lengths is not None,
                 weights is not None, cw is not None, normalizer is not None,
                 has_segments=segs is not None, rows=rows is not None,
                 limits=limits,
                 # under torch.compile inductor fuses the generic core whatever the kernel (and
                 # dynamo cannot trace the ContextVar of engine.use)
                 engine=engine.DEFAULT if tracing and be.name == "torch" else engine.current(be.name),
                 store=not (tracing and be.name == "torch"), stats=stats)
    call = Call(be, st, z, y, t, mask, lengths, weights, cw, normalizer, segs=segs, rows=rows,
                 tok_shape=tok_shape)
    call.shape = shape if rows is None else be.shape(z)
    call.tracing = tracing
    call.raw = raw
    # jax.grad / jax.vjp / jax.vmap without jit trace the logits while targets and the other side
    # arrays stay concrete: those are checked (and raise) as in eager mode (decisions.md item 24)
    call.check_sides = (o.validate and tracing and z is not None
                        and not any(be.tracing(a) for a in (y, t, mask, lengths, cw, normalizer, segs)
                                    if a is not None))
    return call


