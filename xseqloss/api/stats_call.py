"""Preparation of a ``token_stats`` call (API.md 11): the options, the logits, the targets (or
none), the counting side arrays, ``ids`` and ``temperature``, every static check; and the eager
value checks of targets, ids and temperature values with their messages."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import XSeqLossError, XSeqLossTypeError
from ..core import stats as core_stats
from ..core.sides import side
from ..plan.call_plan import StatsPlan
from ..plan.messages import fmt_shape, position, shape_error
from ..plan.options import Options, parse_options, parse_outputs, parse_temperature
from . import ragged as _ragged
from .prepare import Call, logits_shape, prepare_sides


def stats_options(*, layout: Any, ignore_index: Any, logit_softcap: Any, num_classes: Any, validate: Any,
                  shift: Any) -> Options:
    """The options a token_stats call shares with the loss (the others at their neutral values)."""
    return parse_options(layout=layout, ignore_index=ignore_index, inputs="logits", label_smoothing=0.0,
                         smoothing="uniform", z_loss=0.0, logit_softcap=logit_softcap, reduction="none",
                         denominator="weights", empty="zero", num_classes=num_classes, validate=validate,
                         inplace_backward=False, shift=shift)


def stats_plan(o: Options, outputs: Any, temperature: Any, ids_k: int, has_targets: bool,
               temp_array: str = "", metrics: bool = False) -> StatsPlan:
    outs = parse_outputs(outputs, "outputs", has_targets=has_targets, has_ids=ids_k > 0)
    return StatsPlan(outs, parse_temperature(temperature), temp_array, ids_k, metrics)


def metrics_plan(return_stats: Any, inputs: Any) -> StatsPlan:
    """A loss's ``return_stats`` (API.md 11.5): the outputs at temperature 1 as metrics; logits
    inputs only ("log_prob" and "correct" need index targets: checked with the targets)."""
    outs = parse_outputs(return_stats, "return_stats", has_targets=True, has_ids=None)
    if inputs != "logits":
        raise XSeqLossError(f"return_stats gives per-token outputs of the softmax of logits and needs inputs='logits', "
                            f"got inputs={inputs!r}")
    return StatsPlan(outs, 1.0, "", 0, True)


def prepare_stats_call(logits: Any, targets: Any, *, outputs: Any = ("log_prob", "entropy"), temperature: Any = 1.0,
                       ids: Any = None, layout: Any = "NTC", mask: Any = None, lengths: Any = None,
                       ignore_index: Any = -100, shift: Any = 0, segment_ids: Any = None, logit_softcap: Any = None,
                       num_classes: Any = None, validate: Any = True, backend: Any = None) -> Call:
    o = stats_options(layout=layout, ignore_index=ignore_index, logit_softcap=logit_softcap, num_classes=num_classes,
                      validate=validate, shift=shift)
    parse_outputs(outputs, "outputs", has_targets=targets is not None, has_ids=ids is not None)  # early, cheap
    reject_ragged(logits, targets, dict(mask=mask, segment_ids=segment_ids, ids=ids, temperature=temperature))
    be, z = _dispatch.resolve(logits, backend)
    shape = logits_shape(be, o, z)
    return finish_stats_call(be, o, z, shape, targets, z, outputs=outputs, temperature=temperature, ids=ids,
                             mask=mask, lengths=lengths, segment_ids=segment_ids)


def reject_ragged(logits: Any, targets: Any, sides: dict, what: str = "token_stats") -> None:
    """token_stats takes padded arrays (decisions.md 59): a ragged input is an error that says how
    to pad, not a failed conversion."""
    arrays_list = (lambda x: _ragged.is_list(x) and any(hasattr(v, "shape") for v in x))  # a list of sequences
    if not (any(_ragged.kind_of(v) is not None for v in (logits, targets, *sides.values()))
            or arrays_list(logits) or arrays_list(targets)):
        return
    raise XSeqLossTypeError(
        f"{what} takes padded arrays (logits (N, T, C) with mask= or lengths= for the padding, outputs of the "
        f"same padded shape); ragged inputs (a list of per-sequence arrays, a PackedSequence, a nested tensor, "
        f"a tf.RaggedTensor) are not supported here, as they are by sequence_cross_entropy: pad them first, e.g. "
        f"torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True) with lengths=, or ragged.to_tensor()")


def finish_stats_call(be: Any, o: Options, z: Any, shape: tuple, targets: Any, like: Any, *, outputs: Any,
                      temperature: Any, ids: Any, mask: Any, lengths: Any, segment_ids: Any) -> Call:
    """The side arrays of a token_stats call against the logits' ``shape`` (``z`` is None for the
    fused layer, whose logits are never held; ``like``: an array on their device)."""
    tok = o.tok_layout
    tok_shape = tuple(d for d, a in zip(shape, o.layout) if a != "C")
    k = 0
    if ids is not None:
        ids = side(be, ids, "ids", like)
        if be.kind(ids) not in "iu":
            raise XSeqLossTypeError(f"ids has dtype {be.dtype_name(ids)}; ids are class ids: integer (not bool, not "
                                    f"floating: ids are never rounded)")
        ishape = be.shape(ids)
        if len(ishape) != len(tok_shape) + 1 or not all(a is None or b is None or a == b
                                                         for a, b in zip(ishape, tok_shape)):
            raise shape_error("ids", ishape, (*tok_shape, "k"), tok + "k",
                              " (the targets' token shape and a last axis of k ids per token)")
        k = ishape[-1]
        if k is None or k < 1:
            raise XSeqLossError(f"ids has shape {fmt_shape(ishape)}: its last axis holds k >= 1 ids per token, "
                                f"got k = {k}")
    temp_array, temp = "", None
    if parse_temperature(temperature) is None:  # an array: 0-d, per sequence (N,), or per token
        temp = side(be, temperature, "temperature", like)
        if be.kind(temp) != "f":
            raise XSeqLossTypeError(f"temperature has dtype {be.dtype_name(temp)}; it must be floating")
        tshape = be.shape(temp)
        n_shape = (shape[o.layout.index("N")],) if "N" in o.layout else None
        if tshape == ():
            temp_array = "scalar"
        elif n_shape is not None and len(tshape) == 1 and tshape[0] == n_shape[0] and tok_shape != n_shape:
            temp_array = "sequence"
        elif len(tshape) == len(tok_shape) and all(a is None or b is None or a == b for a, b in zip(tshape, tok_shape)):
            temp_array = "tokens"
        else:
            valid = "a number, a 0-d array" + (f", (N={n_shape[0]},) per sequence" if n_shape else "") + \
                f" or {fmt_shape(tok_shape, tok)} per token"
            raise XSeqLossError(f"temperature has shape {fmt_shape(tshape)}; valid: {valid}; broadcasting is not "
                                f"allowed")
    sp = stats_plan(o, outputs, 1.0 if temp_array else temperature, k, targets is not None, temp_array)
    if temp_array:
        sp = replace(sp, temperature=None)
    call = prepare_sides(be, o, z, shape, targets, mask=mask, lengths=lengths, weights=None, class_weights=None,
                         normalizer=None, like=like, segment_ids=segment_ids, stats=sp)
    call.raw = dict(call.raw or {}, **({"ids": ids} if ids is not None else {}))
    call.ids = None if ids is None else be.index_dtype(ids)
    call.temp = temp
    if call.check_sides:
        call.check_sides = not any(be.tracing(a) for a in (call.ids, temp) if a is not None)
    return call


def stats_arrays(call: Call) -> tuple:
    """The arrays of ``core.stats.compute_stats`` (logits, targets, mask, lengths, segments, ids,
    temperature array)."""
    return (call.z, call.y, call.mask, call.lengths, call.segs, call.ids, call.temp)


# ------------------------------------------------------------------------------- value checks

def _flags(ops: Any, st: Any, z: Any, y: Any, mask: Any, lengths: Any, segs: Any, ids: Any, temp: Any) -> dict:
    """Token-shaped masks of the counted tokens whose target, ids or temperature is out of range
    (at the logits' positions), and the lengths' flag."""
    marked = replace(st, mark_nan=True)  # the marks the traced path would make, read here as flags
    like = y if y is not None else ops.drop_class(z, st.opts.k) if z is not None else mask
    r = core_stats.token_side_rules(ops, marked, z if z is not None else like, y, mask, lengths, segs, ids, temp)
    out = {} if r["bad"] is None else {"bad": r["bad"]}
    if lengths is not None:
        T = ops.dim(r["like"], st.opts.tok_layout.index("T"))
        out["lengths"] = ops.any((lengths < 0) | (lengths > T), None)
    return out


def check_stats_values(call: Call, z_for_shape: Any = None) -> None:
    """Eager checks (validate=True): raise the error of the first bad target, id, temperature or
    length, with its position, value and valid range."""
    be, st = call.be, call.st
    if st.mark_nan:
        if call.check_sides:  # jax.grad without jit: traced logits, concrete side arrays
            host = _dispatch.load("numpy")
            np_ = [None if a is None else be.to_numpy(a) for a in (call.y, call.mask, call.lengths, call.segs, call.ids,
                                                                    call.temp)]
            y, mask, lengths, segs, ids, temp = np_
            hc = Call(host, replace(st, mark_nan=False), None, y, None, mask, lengths, None, None, None, segs=segs,
                      tok_shape=call.tok_shape, ids=ids, temp=temp)
            hc.raw = {k: be.to_numpy(v) for k, v in (call.raw or {}).items()}
            shape = [1 if a == "C" else d for a, d in zip(st.opts.layout, call.shape)]
            check_stats_values(hc, np.zeros(shape, np.float32))
        return
    z = call.z if call.z is not None else z_for_shape
    flags = be.run(_flags, st, z, call.y, call.mask, call.lengths, call.segs, call.ids, call.temp)
    bad = be.to_numpy(flags["bad"]) if "bad" in flags else np.zeros(1, bool)
    lengths_bad = bool(be.to_numpy(flags["lengths"])) if "lengths" in flags else False
    if not bad.any() and not lengths_bad:
        return
    o, C = st.opts, st.C
    T = call.tok_shape[o.tok_layout.index("T")] if "T" in o.tok_layout else None
    if lengths_bad:
        lens = be.to_numpy(call.raw.get("lengths", call.lengths))
        i = int(np.argmax((lens < 0) | (lens > T)))
        raise XSeqLossError(f"lengths[{i}] = {lens[i]} is out of range: valid lengths are [0, {T}] (T = {T})")
    pos = [int(i) for i in np.argwhere(bad)[0]]
    if st.shift:
        pos[o.tok_layout.index("T")] += st.shift  # the target position the arrays describe
    pos = tuple(pos)
    if call.y is not None:
        v = be.to_numpy(call.raw["targets"])[pos]
        if not 0 <= v < C:
            ign = f"or ignore_index={o.ignore[0] if len(o.ignore) == 1 else list(o.ignore)}" if o.ignore else \
                "and ignore_index=None"
            raise XSeqLossError(f"targets{position(pos)} = {v} is out of range: valid class ids are [0, {C}) "
                                f"(C = {C}) {ign}" + ("; negative labels never wrap" if v < 0 else ""))
    if call.ids is not None:
        row = be.to_numpy(call.raw["ids"])[pos]
        j = [i for i, v in enumerate(np.atleast_1d(row)) if not 0 <= v < C]
        if j:
            raise XSeqLossError(f"ids{position(pos + (j[0],))} = {row[j[0]]} is out of range: valid class ids are "
                                f"[0, {C}) (C = {C}); ids are class ids at every position (ignore_index does not "
                                f"apply to them)")
    temp = be.to_numpy(call.temp)
    v = temp if st.stats.temp_array == "scalar" else temp[pos[o.tok_layout.index("N")]] \
        if st.stats.temp_array == "sequence" else temp[pos]
    where = "" if st.stats.temp_array == "scalar" else position(
        (pos[o.tok_layout.index("N")],) if st.stats.temp_array == "sequence" else pos)
    raise XSeqLossError(f"temperature{where} = {v} is out of range: a temperature must be finite and > 0, valid "
                        f"range (0, inf)")
