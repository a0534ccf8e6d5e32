"""The public functions ``sequence_cross_entropy``, ``value_and_grad`` and ``token_count``.

Pipeline of one call (docs/semantics.md states each rule with examples):

1. static checks of the options (``options.parse_options``), the backend and the logits, and the
   side arrays moved to the logits' framework and device with their shapes and dtypes checked
   (``api/prepare.py``);
2. eager value checks (``validate=True`` and not tracing): targets, lengths, class weights, probs
   (``api/validate.py``, flags from ``core/checks.py``), in the same backend call as the loss where possible;
3. the core ``core.compute.compute`` (pure; JAX runs it through a cached ``jax.jit``).
"""

from __future__ import annotations

from typing import Any

from . import _class_parallel, _dispatch
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.compiled import keep_type_when_compiled
from .api import ragged as _ragged
from .api.prepare import Call, plain_call, prepare_call, prepare_plain, prepare_sides
from .api.stats_call import metrics_plan
from .api.validate import act_on_flags, check_concrete_sides, check_values, probe_softmax_input, raise_value_error
from .core import reduction, tokens
from .core.checks import compute_checked, compute_flagged
from .core.compute import compute
from .plan.call_plan import CallPlan, make_plan
from .plan.messages import fmt_shape
from .plan.options import parse_layout, parse_options
from .plan.outputs import as_stats

__all__ = ["sequence_cross_entropy", "value_and_grad", "token_count", "segment_count"]


@keep_type_when_compiled
def sequence_cross_entropy(logits: Any, targets: Any, *, layout: str = "NTC", mask: Any = None,
                           lengths: Any = None, ignore_index: Any = -100, weights: Any = None,
                           class_weights: Any = None, inputs: str = "logits", label_smoothing: float = 0.0,
                           smoothing: str = "uniform", z_loss: float = 0.0, logit_softcap: float | None = None,
                           reduction: str = "mean", denominator: str = "weights", normalizer: Any = None,
                           empty: str = "zero", num_classes: int | None = None, validate: bool = True,
                           backend: str | None = None, inplace_backward: bool = False, shift: int = 0,
                           segment_ids: Any = None, class_parallel: Any = None, return_stats: Any = None) -> Any:
    """Cross-entropy of a sequence model's outputs, with one meaning on NumPy, PyTorch, TensorFlow and JAX.

    Per counted token (after ``logit_softcap``), with lse = logsumexp(z), eps = ``label_smoothing`` and
    class weights cw: ``l = (1 - eps) cw[y] (lse - z[y]) + (eps / C) sum_c cw[c] (lse - z[c])
    + z_loss cw[y] lse^2``, multiplied by ``weights``, reduced by ``reduction`` over ``denominator``.
    docs/semantics.md has every rule.

    Args:
        logits: array with axes named by ``layout`` (default "NTC"); floating point. Also a PyTorch
            PackedSequence or nested jagged tensor, or a TensorFlow RaggedTensor (API.md 7.1).
        targets: integer class ids (logits' axes minus C), or floating probabilities with logits' shape;
            or a list of per-sequence arrays, or the logits' own ragged structure.
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
        shift: score the logits at step t against the target at t + shift (next-token prediction: 1).
        segment_ids: packed documents (targets' token shape; a negative id is padding).
        class_parallel: classes split across workers (API.md 9.2): a torch ProcessGroup or a JAX
            mesh axis name; logits, soft targets and class_weights are this worker's slice of C.
        return_stats: names of per-token outputs of ``token_stats`` ("log_prob", "entropy", "lse",
            "argmax", "correct") to return beside the loss, at temperature 1 after the softcap,
            from the same pass over the logits, as metrics (no gradient); logits inputs only.

    Returns:
        The loss in the backend's array type on the logits' device (float32 for float16/bfloat16 input);
        with ``return_stats``, ``(loss, xsl.TokenStats)``.

    >>> import numpy as np, xseqloss as xsl
    >>> logits = np.zeros((1, 2, 4)); targets = np.array([[1, -100]])
    >>> round(float(xsl.sequence_cross_entropy(logits, targets)), 6)  # log(4), the ignored token excluded
    1.386294
    """
    if (mask is None and lengths is None and weights is None and class_weights is None and normalizer is None
            and segment_ids is None and class_parallel is None and return_stats is None and inplace_backward is False):
        # the common call: its static part from the per-signature cache (api/prepare.plain_call)
        call = plain_call(logits, targets, (layout, ignore_index, inputs, label_smoothing, smoothing, z_loss,
                                            logit_softcap, reduction, denominator, empty, num_classes, validate,
                                            backend, shift))
        if call is not None:
            return _loss_of(call)
    kw = dict(layout=layout, mask=mask, lengths=lengths, ignore_index=ignore_index, weights=weights,
              class_weights=class_weights, inputs=inputs, label_smoothing=label_smoothing, smoothing=smoothing,
              z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction, denominator=denominator,
              normalizer=normalizer, empty=empty, num_classes=num_classes, validate=validate, backend=backend,
              inplace_backward=inplace_backward, shift=shift, segment_ids=segment_ids)
    if class_parallel is not None:
        kw["class_parallel"] = class_parallel
    if return_stats is not None:
        kw["stats"] = metrics_plan(return_stats, inputs)
    if type(logits).__name__ == "DTensor":  # torch.distributed.tensor: the placement says the class split
        logits, kw = _class_parallel.unwrap_dtensor(logits, dict(kw, targets=targets), parse_layout(layout).index("C"),
                                                    ("targets", "mask", "lengths", "weights", "class_weights",
                                                     "normalizer", "segment_ids"))
        targets = kw.pop("targets")
        mask, weights, segment_ids = kw["mask"], kw["weights"], kw["segment_ids"]
    sides = dict(mask=mask, weights=weights, segment_ids=segment_ids)
    if _ragged.is_ragged(logits, targets, sides):
        cv = _ragged.convert(logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction,
                             backend=backend)
        kw.update(cv.sides, layout=cv.layout, rows=cv.rows, padded=cv.padded)
        out = _loss(cv.logits, cv.targets, kw)
        return (cv.restore(out[0]), out[1]) if return_stats is not None else cv.restore(out)
    return _loss(logits, targets, kw)


def _loss(logits: Any, targets: Any, kw: dict) -> Any:
    if kw.get("class_parallel") is not None:
        return _class_parallel_loss(logits, targets, kw, grad=False)
    return _loss_of(prepare_plain(logits, targets, kw))


def _loss_of(call: Call) -> Any:
    if call.st.default_call and not call.tracing and call.be.default_token_loss is not None:
        result = _default_call(call)
        if result is not None:
            return result
    if call.st.mark_nan:
        if call.check_sides:
            check_concrete_sides(call)
        return _with_stats(call, call.be.run(compute, call.st, *call.arrays))
    result, flags = call.be.run(compute_checked, call.st, *call.arrays)
    act_on_flags(call, flags)
    return _with_stats(call, result)


def _with_stats(call: Call, result: Any) -> Any:
    """(loss, TokenStats) for a call with return_stats, else the loss as it is."""
    return result if call.st.stats is None else (result[0], as_stats(result[1]))


def _default_call(call: Call) -> Any:
    """The default call (``CallPlan.default_call``) through the backend's leanest per-token kernel
    (``Backend.default_token_loss``) and the core's reduction, or None.

    Eager calls only. The kernel gives the per-token losses only when every label is in [0, C) or
    is the ignore value (the backend checks that as part of its kernel); otherwise, and where it
    does not apply (size, dtype, device), it gives None and the general path runs, which raises the
    error (validate=True) or marks the bad tokens NaN (validate=False). decisions.md item 21.
    """
    out = call.be.default_token_loss(call.st, call.z, call.y)
    if out is None:
        return None
    result = call.be.run(_default_reduce, call.st, out[0], out[1])
    if not call.st.mark_nan:
        probe_softmax_input(call)
    return result


def _default_reduce(ops: Any, st: CallPlan, l: Any, n: int) -> Any:
    return reduction.default(ops, st, l, n)


@keep_type_when_compiled
def value_and_grad(logits: Any, targets: Any, **options: Any) -> tuple[Any, Any]:
    """``(loss, d loss / d logits)`` in the backend's own types; NumPy's gradient is analytic.

    For a non-scalar reduction the gradient is that of the sum of the output. Ragged logits give
    their gradient in their own structure.

    >>> import numpy as np, xseqloss as xsl
    >>> loss, grad = xsl.value_and_grad(np.zeros((1, 1, 2)), np.array([[0]]))
    >>> grad.round(3).tolist()  # (softmax - onehot) / 1
    [[[-0.5, 0.5]]]
    """
    sides = {k: options.get(k) for k in _ragged.SIDES}
    if _ragged.is_ragged(logits, targets, sides):
        cv = _ragged.convert(logits, targets, layout=options.get("layout", "NTC"), lengths=options.get("lengths"),
                             sides=sides, reduction=options.get("reduction", "mean"), backend=options.get("backend"))
        opts = dict(options, **cv.sides, layout=cv.layout, rows=cv.rows, padded=cv.padded)
        value, grad = _value_and_grad(cv.logits, cv.targets, opts)
        return cv.restore(value), cv.restore_grad(grad)
    return _value_and_grad(logits, targets, options)


def _class_parallel_loss(logits: Any, targets: Any, kw: dict, grad: bool) -> Any:
    """Classes split across workers (_class_parallel.py): the split agreed on, the values checked on
    every rank together (eager), then the core with its class sums combined over the workers."""
    kw = dict(kw)
    cp, num_classes = kw.pop("class_parallel"), kw.get("num_classes")
    kw["num_classes"] = None  # the global C is known only after the split
    call = _class_parallel.prepare(lambda: prepare_call(logits, targets, **kw), cp, num_classes,
                                  _class_parallel.backend_name(logits, kw.get("backend")), logits)
    _class_parallel.check(call)
    if grad:
        return call.be.value_and_grad(compute, call.st, *call.arrays)
    return _with_stats(call, call.be.run(compute, call.st, *call.arrays))


def _value_and_grad(logits: Any, targets: Any, options: dict) -> tuple[Any, Any]:
    if options.get("class_parallel") is not None:
        return _class_parallel_loss(logits, targets, options, grad=True)
    call = prepare_plain(logits, targets, options)
    be = call.be
    if call.st.default_call and not call.tracing and be.default_token_loss is not None:
        out = be.default_token_loss(call.st, call.z, call.y, want_grad=True)
        if out is not None:  # a backend without autodiff: loss and gradient from its leanest kernel
            return be.run(_default_reduce, call.st, out[0], out[1]), out[2]
    if not call.st.mark_nan:
        joint = be.value_and_grad_flagged  # JAX: the checks ride in the same program
        if joint is None:
            check_values(call)
        else:
            result, grad, flags = joint(compute_flagged, call.st, *call.arrays)
            if flags is not None and any(be.to_numpy(flags).tolist()):
                raise_value_error(call, call.shape)
            return result, grad
    elif call.check_sides:
        check_concrete_sides(call)
    return be.value_and_grad(compute, call.st, *call.arrays)


def _token_call(targets: Any, *, layout: str, mask: Any, lengths: Any, ignore_index: Any, weights: Any,
                class_weights: Any, denominator: str, num_classes: int | None, validate: bool, backend: Any,
                shift: int, segment_ids: Any, reduction: str) -> Call:
    """A prepared call on the targets alone (token_count, segment_count, global counts)."""
    o = parse_options(layout=layout, ignore_index=ignore_index, inputs="logits", label_smoothing=0.0,
                              smoothing="uniform", z_loss=0.0, logit_softcap=None, reduction=reduction,
                              denominator=denominator, empty="zero", num_classes=num_classes,
                              validate=validate, inplace_backward=False, shift=shift)
    sides = dict(mask=mask, weights=weights, segment_ids=segment_ids)
    if _ragged.is_ragged(None, targets, sides) or _ragged.kind_of(targets) is not None:
        targets, lengths, sides = _ragged.padded_targets(targets, layout=o.layout, lengths=lengths, sides=sides,
                                                         backend=backend)
        mask, weights, segment_ids = sides["mask"], sides["weights"], sides["segment_ids"]
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
    call = prepare_sides(be, o, None, shape, y, mask=mask, lengths=lengths, weights=weights,
                          class_weights=class_weights, normalizer=None, like=y, segment_ids=segment_ids)
    if not call.st.mark_nan:
        check_values(call)
    return call


@keep_type_when_compiled
def token_count(targets: Any, *, layout: str = "NTC", mask: Any = None, lengths: Any = None,
                ignore_index: Any = -100, weights: Any = None, class_weights: Any = None,
                denominator: str = "weights", num_classes: int | None = None, validate: bool = True,
                backend: str | None = None, shift: int = 0, segment_ids: Any = None) -> Any:
    """The denominator D that ``reduction="mean"`` divides by, for summing across workers or micro-batches.

    Pass the sum over micro-batches back as ``normalizer=`` and the accumulated loss equals the
    full-batch mean exactly. With ``shift`` it counts the shifted tokens (Hugging Face's
    num_items_in_batch counted the unshifted labels, transformers PR 46204).

    >>> import numpy as np, xseqloss as xsl
    >>> int(xsl.token_count(np.array([[3, 1, -100]])))
    2
    >>> int(xsl.token_count(np.array([[3, 1, 4, -100]]), shift=1))  # targets 1 and 4 are scored
    2
    """
    call = _token_call(targets, layout=layout, mask=mask, lengths=lengths, ignore_index=ignore_index,
                       weights=weights, class_weights=class_weights, denominator=denominator,
                       num_classes=num_classes, validate=validate, backend=backend, shift=shift,
                       segment_ids=segment_ids, reduction="mean")
    return call.be.run(_count_core, call.st, *call.arrays)


@keep_type_when_compiled
def segment_count(segment_ids: Any, *, layout: str = "NTC", backend: str | None = None) -> Any:
    """The number of documents per sequence (shape (N,), or () without N): a document is a maximal
    run of equal non-negative ids along T; a negative id is padding. The sum over workers is the
    ``normalizer`` of ``reduction="segment_mean"``.

    >>> import numpy as np, xseqloss as xsl
    >>> xsl.segment_count(np.array([[0, 0, 1, 1, 1, -1], [5, 5, 5, 2, 5, -1]])).tolist()
    [2, 3]
    """
    layout = parse_layout(layout)
    if "T" not in layout:
        raise XSeqLossError(f"segment_ids mark documents along the time axis (T), but layout={layout!r} has none")
    be, segs = _dispatch.resolve(segment_ids, backend)
    tok = layout.replace("C", "")
    if be.kind(segs) not in "iu":
        raise XSeqLossTypeError(f"segment_ids has dtype {be.dtype_name(segs)}; it must be integer (not bool, "
                                f"not floating: ids are never rounded)")
    if len(be.shape(segs)) != len(tok):
        raise XSeqLossError(f"segment_ids has shape {fmt_shape(be.shape(segs))} but layout={layout!r} needs "
                            f"{len(tok)} axes ({tok}: the targets' shape)")
    st = _static_for_tokens(layout)
    return be.run(_segment_count_core, st, be.index_dtype(segs))


def _static_for_tokens(layout: str) -> CallPlan:
    o = parse_options(layout=layout, ignore_index=None, inputs="logits", label_smoothing=0.0,
                              smoothing="uniform", z_loss=0.0, logit_softcap=None, reduction="sum",
                              denominator="weights", empty="zero", num_classes=None, validate=True,
                              inplace_backward=False)
    return make_plan(o, None, False, False, False, False, False, False, False)


def _segment_count_core(ops: Any, st: CallPlan, segs: Any) -> Any:
    return tokens.documents(ops, st, segs)[1]


def _count_core(ops: Any, st: CallPlan, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                cw: Any, normalizer: Any, segs: Any = None, rows: Any = None) -> Any:
    """The D of "mean": an integer count, or the sum of W when weights enter it (token weights, or
    class weights of index targets; soft targets keep class weights out of W, decisions.md 7)."""
    like = y if y is not None else ops.drop_class(t, st.opts.k)
    y, t, mask, weights, counted, _, pos = tokens.token_facts(ops, st, y, t, mask, lengths, weights, segs, like)
    d = st.opts.denominator
    if not (d == "weights" and (weights is not None or (cw is not None and not st.soft))):
        flags = pos if d == "positions" else counted
        if flags is None:
            return ops.size(like)
        return ops.count(flags, None)
    acc = ops.acc_dtype(weights if weights is not None else cw)
    if y is not None and cw is not None:  # only class weights need the labels (C is then known)
        y = ops.where((y >= 0) & (y < st.C), y, 0)
    w = None if weights is None else ops.cast(weights, acc)
    cwc = None if cw is None else ops.cast(cw, acc)
    return ops.sum(reduction.denominator_weights(ops, st, y, counted, w, cwc), None)
