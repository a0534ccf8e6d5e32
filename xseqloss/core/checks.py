"""The eager value checks as arrays (``validate=True``): one backend call computes a flag per kind
of problem (``value_flags``), and the loss rides in the same call where it can
(``compute_checked``); the messages that name the first offending element are api/validate.py.
Also the softmax-input probe that rides in the core on JAX and TensorFlow."""

from __future__ import annotations

import functools
from typing import Any

from ..plan.call_plan import CallPlan
from . import tokens
from .compute import compute, probs_rows, scatter_rows


def bad_tokens(ops: Any, st: CallPlan, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                cw: Any, normalizer: Any, segs: Any = None, rows: Any = None) -> dict[str, Any]:
    """Token-shaped masks (at the logits' positions, the padded batch for ragged rows) of the
    tokens that count and are bad, per kind of problem, and the counted tokens themselves. With
    ``shift`` a label is checked where its step counts (the target at t + shift)."""
    o, C = st.opts, st.C
    k = st.row_plan.opts.k if rows is not None else o.k  # ragged rows: (R, C)
    like = y if y is not None else (ops.drop_class(t, o.k) if rows is None else mask)
    y, t, mask, weights, m, _, _ = tokens.token_facts(ops, st, y, t, mask, lengths, weights, segs, like)
    counted = ops.true_like(like) if m is None else m
    out = {"counted": counted}
    if y is not None:
        out["targets"] = ((y < 0) if C is None else ((y < 0) | (y >= C))) & counted
    if t is not None:
        bad = ops.any((t < 0) | ~ops.isfinite(t), k)
        out["soft"] = (bad if rows is None else scatter_rows(ops, bad, rows, like)) & counted
    if z is not None and o.inputs == "probs":
        outside, sums, off = probs_rows(ops, st.row_plan, z)
        if rows is not None:
            outside, off = scatter_rows(ops, outside, rows, like), scatter_rows(ops, off, rows, like)
            sums = scatter_rows(ops, sums, rows, like)
        out["probs"] = outside & counted
        out["probs_sum"] = off & counted
        out["sums"] = sums
    return out


def value_flags(ops: Any, st: CallPlan, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                 cw: Any, normalizer: Any, segs: Any = None, rows: Any = None) -> dict[str, Any]:
    """One scalar flag per kind of value problem: a single backend call (jitted on JAX) and one
    host read per flag, so validation stays cheap; the details are looked up only on failure."""
    bad = bad_tokens(ops, st, z, y, t, mask, lengths, weights, cw, normalizer, segs, rows)
    flags = {name: ops.any(v, None) for name, v in bad.items() if name not in ("counted", "sums")}
    if lengths is not None:
        T = ops.dim(bad["counted"], st.opts.tok_layout.index("T"))
        flags["lengths"] = ops.any((lengths < 0) | (lengths > T), None)
    if cw is not None:
        flags["class_weights"] = ops.any(~ops.isfinite_any_dtype(cw) | (cw < 0), None)
    if normalizer is not None:
        flags["normalizer"] = ops.any(~ops.isfinite_any_dtype(normalizer) | (normalizer < 0), None)
    return flags


def compute_checked(ops: Any, st: CallPlan, *arrays: Any, probe: bool = True) -> tuple[Any, Any]:
    """The loss and the value-check flags (one vector, the softmax probe last when it rides here) in
    one backend call (one jit dispatch on JAX, one traced call on TensorFlow, one host read
    everywhere): on bad input the loss is discarded and the error raised on the host."""
    flags = value_flags(ops, st, *arrays)
    z, k = arrays[0], st.row_plan.opts.k
    shape = ops.shape(z) if z is not None else ()
    if probe and probe_in_core(ops, st, shape):
        flags["looks_like_probs"] = looks_like_probs(ops, z, shape, k)
    return compute(ops, st, *arrays), (ops.stack(list(flags.values())) if flags else None)


def compute_flagged(ops: Any, st: CallPlan, *arrays: Any) -> tuple[Any, Any]:
    """compute_checked without the softmax probe: value_and_grad's checks, in the program that
    computes the loss when a backend offers ``value_and_grad_flagged``."""
    return compute_checked(ops, st, *arrays, probe=False)


def probe_in_core(ops: Any, st: CallPlan, shape: tuple[Any, ...]) -> bool:
    """The softmax-input probe rides in the core on JAX and TensorFlow (one program); eager NumPy
    and PyTorch read a few rows on the host instead (ops there cost a dispatch each)."""
    return not ops.host_probe and probe_applies(st, shape)


def probe_applies(st: CallPlan, shape: tuple[Any, ...]) -> bool:
    k = st.row_plan.opts.k  # the class axis of z as given (ragged rows: 1)
    return st.opts.inputs == "logits" and bool(shape) and shape[k] is not None and shape[k] >= 2 and 0 not in shape


def looks_like_probs(ops: Any, z: Any, shape: tuple[Any, ...], k: int) -> Any:
    """True when the first few rows are in [0, 1] and sum to 1 (reads a few rows, not the logits)."""
    rows = ops.cast(z[sample_index(shape, k, SAMPLE_ROWS)], ops.acc_dtype(z))
    inside = ops.all((rows >= 0) & (rows <= 1), None) & (ops.size(rows) > 0)  # shapes may be unknown
    return inside & ops.all(ops.abs(ops.sum(rows, k) - 1.0) <= 1e-3, None)


SAMPLE_ROWS = 4


@functools.lru_cache(maxsize=256)
def sample_index(shape: tuple[Any, ...], k: int, n: int) -> tuple[slice, ...]:
    """CallPlan slices selecting at most n class rows at the start of the array (a small view)."""
    idx = [slice(0, 1)] * len(shape)
    idx[k] = slice(None)
    others = [a for a in range(len(shape)) if a != k]
    if others:
        idx[others[-1]] = slice(0, n)
    return tuple(idx)
