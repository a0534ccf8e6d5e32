"""``token_stats``: per-token outputs of the softmax (API.md 11): the log-probability of the target,
the entropy, the logsumexp, the argmax and whether it is right, and log-probabilities at given
ids, at a sampling temperature applied exactly once, differentiable for the logits (and through
``linear_token_stats`` for hidden, weight and bias). docs/token-stats.md has examples.
"""

from __future__ import annotations

from typing import Any

from . import _class_parallel
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.compiled import keep_type_when_compiled
from .api.layer import layer_arrays, with_layer
from .api.stats_call import (check_stats_values, finish_stats_call, prepare_stats_call, reject_ragged, stats_arrays,
                             stats_options)
from .core.linear_stats import chunk_temporaries, linear_stats_core, linear_stats_vjp_core
from .core.sides import framework_of
from .core.stats import DIFFERENTIABLE, compute_stats, compute_stats_vjp
from .plan.options import parse_layout
from .plan.outputs import TokenStats, as_stats

__all__ = ["TokenStats", "token_stats", "token_stats_vjp", "linear_token_stats", "linear_token_stats_vjp"]


@keep_type_when_compiled
def token_stats(logits: Any, targets: Any = None, *, outputs: Any = ("log_prob", "entropy"), temperature: Any = 1.0,
                ids: Any = None, layout: str = "NTC", mask: Any = None, lengths: Any = None,
                ignore_index: Any = -100, shift: int = 0, segment_ids: Any = None, logit_softcap: float | None = None,
                num_classes: int | None = None, validate: bool = True, backend: str | None = None,
                class_parallel: Any = None) -> TokenStats:
    """Per-token log-probabilities, entropy, lse, argmax and correctness of ``softmax(z / T)``.

    With z the logits of one position after ``logit_softcap``, u = z / ``temperature`` and
    p = softmax(u): ``log_prob = log p[y]``, ``entropy = -sum_c p_c log p_c`` (0 log 0 = 0),
    ``lse = logsumexp(u)``, ``argmax`` over z (the lowest index on ties), ``correct = argmax == y``,
    ``ids_log_prob[..., j] = log p[ids[..., j]]``. Positions that do not count (mask, lengths,
    ignore_index, shift, segment_ids as for the loss) give 0 (argmax -1, correct False) with exactly
    0 gradient. Float outputs are float32 (float64 for float64 logits).

    Args:
        logits: floating, axes named by ``layout`` ("NTC" by default).
        targets: integer class ids of the tokens' shape, or None (then "log_prob" and "correct"
            cannot be asked for, and only mask, lengths and segment_ids decide what counts).
        outputs: the names to compute, out of "log_prob", "entropy", "lse", "argmax", "correct",
            "ids_log_prob" (exactly when ``ids`` is given).
        temperature: a number, a 0-d array, an (N,) array per sequence, or an array of the
            tokens' shape per token (describing the target position under ``shift``); finite, > 0.
        ids: integer class ids of the tokens' shape plus a last axis k (``ids_log_prob``).
        class_parallel: classes split across workers (API.md 9.2): this worker's slice of C.

    >>> import numpy as np, xseqloss as xsl
    >>> z = np.log(np.array([[[0.5, 0.25, 0.25]]]))              # (N=1, T=1, C=3)
    >>> s = xsl.token_stats(z, np.array([[0]]), outputs=("log_prob", "entropy", "argmax"))
    >>> round(float(s.log_prob[0, 0]), 6), round(float(s.entropy[0, 0]), 6), int(s.argmax[0, 0])
    (-0.693147, 1.039721, 0)
    """
    kw = dict(outputs=outputs, temperature=temperature, ids=ids, layout=layout, mask=mask, lengths=lengths,
              ignore_index=ignore_index, shift=shift, segment_ids=segment_ids, logit_softcap=logit_softcap,
              num_classes=num_classes, validate=validate, backend=backend)
    call = _prepared(logits, targets, kw, class_parallel)
    return as_stats(call.be.run(compute_stats, call.st, *stats_arrays(call)))


def _prepared(logits: Any, targets: Any, kw: dict, class_parallel: Any) -> Any:
    if type(logits).__name__ == "DTensor":  # the placement says the class split
        logits, kw = _class_parallel.unwrap_dtensor(logits, dict(kw, targets=targets, class_parallel=class_parallel),
                                                    parse_layout(kw["layout"]).index("C"),
                                                    ("targets", "mask", "lengths", "segment_ids", "ids", "temperature"))
        targets, class_parallel = kw.pop("targets"), kw.pop("class_parallel")
    if class_parallel is None:
        call = prepare_stats_call(logits, targets, **kw)
        check_stats_values(call)
        return call
    num_classes = kw.get("num_classes")
    local = dict(kw, num_classes=None)  # the global C is known only after the split
    call = _class_parallel.prepare(lambda: prepare_stats_call(logits, targets, **local), class_parallel, num_classes,
                                   _class_parallel.backend_name(logits, kw.get("backend")), logits)
    _class_parallel.check_with(call, lambda: check_stats_values(call))
    return call


@keep_type_when_compiled
def token_stats_vjp(logits: Any, targets: Any, cotangents: dict, **options: Any) -> Any:
    """d logits of ``sum over outputs of sum(cotangents[name] * output)`` for the differentiable
    outputs ("log_prob", "entropy", "lse", "ids_log_prob"; a missing name counts as zero), in the
    backend's own type: analytic on NumPy, the framework's autodiff elsewhere. ``options``: those
    of ``token_stats`` except ``outputs`` (the cotangents' keys say it).

    >>> import numpy as np, xseqloss as xsl
    >>> g = xsl.token_stats_vjp(np.zeros((1, 1, 2)), np.array([[0]]), {"log_prob": np.ones((1, 1))})
    >>> g.round(3).tolist()   # onehot - softmax
    [[[0.5, -0.5]]]
    """
    cts = _check_cotangents(cotangents)
    options = dict(options, outputs=tuple(cts))
    class_parallel = options.pop("class_parallel", None)
    kw = {k: options.get(k, v) for k, v in _DEFAULTS.items()}
    unknown = set(options) - set(_DEFAULTS)
    if unknown:
        raise XSeqLossTypeError(f"token_stats_vjp() got unexpected keyword arguments {sorted(unknown)}")
    call = _prepared(logits, targets, kw, class_parallel)
    be = call.be
    ct_arrays = {n: be.convert(c, f"cotangents[{n!r}]", like=call.z) if not _native(be, c) else c
                 for n, c in cts.items()}
    return be.stats_vjp(compute_stats, compute_stats_vjp, call.st, stats_arrays(call), ct_arrays)


_DEFAULTS = dict(outputs=("log_prob", "entropy"), temperature=1.0, ids=None, layout="NTC", mask=None, lengths=None,
                 ignore_index=-100, shift=0, segment_ids=None, logit_softcap=None, num_classes=None, validate=True,
                 backend=None)


def _native(be: Any, x: Any) -> bool:
    return framework_of(x) == be.name


def _check_cotangents(cotangents: Any) -> dict:
    if not isinstance(cotangents, dict) or not cotangents:
        raise XSeqLossTypeError(f"cotangents must be a dict from output names to arrays, got {type(cotangents).__name__}")
    for name in cotangents:
        if name not in DIFFERENTIABLE:
            raise XSeqLossError(f"cotangents[{name!r}]: only the differentiable outputs {list(DIFFERENTIABLE)} take a "
                                f"cotangent")
    return dict(cotangents)


# ------------------------------------------------------------------------------- the fused layer

@keep_type_when_compiled
def linear_token_stats(hidden: Any, weight: Any, targets: Any = None, *, bias: Any = None, layout: str = "NTH",
                       weight_layout: str = "CH", chunk_size: int | None = None,
                       outputs: Any = ("log_prob", "entropy"), temperature: Any = 1.0, ids: Any = None,
                       mask: Any = None, lengths: Any = None, ignore_index: Any = -100, shift: int = 0,
                       segment_ids: Any = None, logit_softcap: float | None = None, num_classes: int | None = None,
                       validate: bool = True, backend: str | None = None, class_parallel: Any = None) -> TokenStats:
    """``token_stats(hidden @ weight^T + bias, targets, ...)`` without ever holding the (tokens, C)
    logits (API.md 11.4): the fused output layer's chunk loop (section 8's memory bound), gradients
    for hidden, weight and bias. ``weight``: (C, H) with ``weight_layout="CH"`` (an nn.Linear
    weight, a tied embedding) or (H, C) with "HC" (a Flax / Keras Dense kernel).

    >>> import numpy as np, xseqloss as xsl
    >>> h = np.random.default_rng(0).normal(size=(2, 3, 4)); w = np.random.default_rng(1).normal(size=(5, 4))
    >>> y = np.array([[0, 1, 2], [3, 4, -100]])
    >>> a = xsl.linear_token_stats(h, w, y, temperature=0.7)
    >>> b = xsl.token_stats(h @ w.T, y, temperature=0.7)
    >>> bool(np.allclose(a.log_prob, b.log_prob) and np.allclose(a.entropy, b.entropy))
    True
    """
    kw = dict(bias=bias, layout=layout, weight_layout=weight_layout, chunk_size=chunk_size, outputs=outputs,
              temperature=temperature, ids=ids, mask=mask, lengths=lengths, ignore_index=ignore_index, shift=shift,
              segment_ids=segment_ids, logit_softcap=logit_softcap, num_classes=num_classes, validate=validate,
              backend=backend)
    call, lay = _prepared_layer(hidden, weight, targets, kw, class_parallel)
    out = call.be.run(linear_stats_core, call.st, lay.h, lay.w, lay.b, call.y, call.mask, call.lengths, call.segs,
                      call.ids, call.temp)
    return as_stats(out)


@keep_type_when_compiled
def linear_token_stats_vjp(hidden: Any, weight: Any, targets: Any, cotangents: dict, **options: Any) -> tuple:
    """``(d_hidden, d_weight, d_bias or None)`` of ``sum over outputs of sum(cotangents[name] *
    output)`` of ``linear_token_stats`` (the differentiable outputs; a missing name counts as zero):
    analytic on NumPy (the chunk loop forward, then again), the framework's autodiff elsewhere."""
    cts = _check_cotangents(cotangents)
    class_parallel = options.pop("class_parallel", None)
    unknown = set(options) - set(_LAYER_DEFAULTS)
    if unknown:
        raise XSeqLossTypeError(f"linear_token_stats_vjp() got unexpected keyword arguments {sorted(unknown)}")
    kw = {k: options.get(k, v) for k, v in _LAYER_DEFAULTS.items()}
    kw["outputs"] = tuple(cts)
    call, lay = _prepared_layer(hidden, weight, targets, kw, class_parallel)
    be = call.be
    ct_arrays = {n: c if _native(be, c) else be.convert(c, f"cotangents[{n!r}]", like=lay.h) for n, c in cts.items()}
    arrays = (lay.h, lay.w, lay.b, call.y, call.mask, call.lengths, call.segs, call.ids, call.temp)
    return be.linear_stats_vjp(linear_stats_core, linear_stats_vjp_core, call.st, arrays, ct_arrays)


_LAYER_DEFAULTS = dict(_DEFAULTS, bias=None, layout="NTH", weight_layout="CH", chunk_size=None)


def _prepared_layer(hidden: Any, weight: Any, targets: Any, kw: dict, class_parallel: Any) -> tuple:
    kw = dict(kw)
    reject_ragged(hidden, targets, {k: kw.get(k) for k in ("mask", "segment_ids", "ids", "temperature")},
                  "linear_token_stats")
    lay_kw = {k: kw.pop(k) for k in ("bias", "layout", "weight_layout", "chunk_size", "backend")}

    def local(num_classes: Any) -> tuple:
        lay = layer_arrays(hidden, weight, lay_kw["bias"], lay_kw["layout"], lay_kw["weight_layout"],
                           lay_kw["chunk_size"], lay_kw["backend"])
        o = stats_options(layout=lay.layout, ignore_index=kw["ignore_index"], logit_softcap=kw["logit_softcap"],
                          num_classes=num_classes, validate=kw["validate"], shift=kw["shift"])
        call = finish_stats_call(lay.be, o, None, lay.shape, targets, lay.h, outputs=kw["outputs"],
                                 temperature=kw["temperature"], ids=kw["ids"], mask=kw["mask"], lengths=kw["lengths"],
                                 segment_ids=kw["segment_ids"])
        temporaries = (lambda eng: chunk_temporaries(lay.be, class_parallel, eng.kernel))
        return with_layer(call, lay, plain=False, temporaries=temporaries), lay

    if class_parallel is None:
        call, lay = local(kw["num_classes"])
        check_stats_values(call, lay.h)
        return call, lay
    call, lay = _class_parallel.prepare(lambda: local(None), class_parallel, kw["num_classes"],
                                        _class_parallel.backend_name(hidden, lay_kw["backend"]), hidden)
    _class_parallel.fix_chunks(call, lay_kw["chunk_size"])
    _class_parallel.check_with(call, lambda: check_stats_values(call, lay.h))
    return call, lay
