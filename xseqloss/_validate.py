"""Value checks (eager, ``validate=True``): one backend call computes a flag per kind of problem;
only when one is set, the slow path finds the first offending element and raises the error of the
catalogue with its argument, position, value and valid range. Also the softmax-input probe."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from . import _dispatch
from ._checks import position
from . import _tokens
from ._core import PROBS_SUM_TOL, _numeric, probs_rows, scatter_rows
from ._errors import XSeqLossError
from ._plan import Static
from ._prepare import _Call

def _first(be: Any, bad: Any) -> tuple[int, ...] | None:
    """Index of the first true element (host sync; only when something is wrong)."""
    arr = be.to_numpy(bad)
    if not arr.any():
        return None
    return tuple(int(i) for i in np.argwhere(arr)[0])


def _bad_tokens(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                cw: Any, normalizer: Any, segs: Any = None, rows: Any = None) -> dict[str, Any]:
    """Token-shaped masks (at the logits' positions, the padded batch for ragged rows) of the
    tokens that count and are bad, per kind of problem, and the counted tokens themselves. With
    ``shift`` a label is checked where its step counts (the target at t + shift)."""
    o, C = st.opts, st.C
    k = st.kernel.opts.k if rows is not None else o.k  # ragged rows: (R, C)
    like = y if y is not None else (ops.drop_class(t, o.k) if rows is None else mask)
    y, t, mask, weights, m, _, _ = _tokens.token_facts(ops, st, y, t, mask, lengths, weights, segs, like)
    counted = ops.true_like(like) if m is None else m
    out = {"counted": counted}
    if y is not None:
        out["targets"] = ((y < 0) if C is None else ((y < 0) | (y >= C))) & counted
    if t is not None:
        bad = ops.any((t < 0) | ~ops.isfinite(t), k)
        out["soft"] = (bad if rows is None else scatter_rows(ops, bad, rows, like)) & counted
    if z is not None and o.inputs == "probs":
        outside, sums = probs_rows(ops, st.kernel, z)
        off = ops.abs(sums - 1.0) > PROBS_SUM_TOL
        if rows is not None:
            outside, off = scatter_rows(ops, outside, rows, like), scatter_rows(ops, off, rows, like)
            sums = scatter_rows(ops, sums, rows, like)
        out["probs"] = outside & counted
        out["probs_sum"] = off & counted
        out["sums"] = sums
    return out


def _value_flags(ops: Any, st: Static, z: Any, y: Any, t: Any, mask: Any, lengths: Any, weights: Any,
                 cw: Any, normalizer: Any, segs: Any = None, rows: Any = None) -> dict[str, Any]:
    """One scalar flag per kind of value problem: a single backend call (jitted on JAX) and one
    host read per flag, so validation stays cheap; the details are looked up only on failure."""
    bad = _bad_tokens(ops, st, z, y, t, mask, lengths, weights, cw, normalizer, segs, rows)
    flags = {name: ops.any(v, None) for name, v in bad.items() if name not in ("counted", "sums")}
    if lengths is not None:
        T = ops.dim(bad["counted"], st.opts.tok_layout.index("T"))
        flags["lengths"] = ops.any((lengths < 0) | (lengths > T), None)
    if cw is not None:
        flags["class_weights"] = ops.any(~ops.isfinite_any_dtype(cw) | (cw < 0), None)
    if normalizer is not None:
        flags["normalizer"] = ops.any(~ops.isfinite_any_dtype(normalizer) | (normalizer < 0), None)
    return flags


def _check_values(call: _Call) -> None:
    """Validate values in a call of their own (value_and_grad, token_count): no softmax probe."""
    flags = call.be.run(_value_flags, call.st, *call.arrays)
    if any(call.be.to_numpy(f) for f in flags.values()):
        _raise_value_error(call, call.shape)


def check_concrete_sides(call: _Call) -> None:
    """The value checks of the side arrays when the logits are traced but the side arrays are not
    (``call.check_sides``: jax.grad, jax.vjp or jax.vmap without jit). They run on host copies with
    the NumPy backend, since a backend call inside an outer trace would itself be traced. The
    logits' own checks (inputs="probs") cannot run: those rows are marked NaN as under jit."""
    be = call.be
    host = _dispatch.load("numpy")
    y, t, mask, lengths, weights, cw, normalizer, segs, rows = [None if a is None else be.to_numpy(a)
                                                                 for a in call.arrays[1:]]
    raw = {k: be.to_numpy(v) for k, v in (call.raw or {}).items()}
    sides = _Call(host, call.st, None, y, t, mask, lengths, weights, cw, normalizer, shape=call.shape, raw=raw,
                  segs=segs, rows=rows, tok_shape=call.tok_shape)
    _check_values(sides)


def _numeric_checked(ops: Any, st: Static, *arrays: Any, probe: bool = True) -> tuple[Any, Any]:
    """The loss and the value-check flags (one vector, the softmax probe last when it rides here) in
    one backend call (one jit dispatch on JAX, one traced call on TensorFlow, one host read
    everywhere): on bad input the loss is discarded and the error raised on the host."""
    flags = _value_flags(ops, st, *arrays)
    z, k = arrays[0], st.kernel.opts.k
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
    k = st.kernel.opts.k  # the class axis of z as given (ragged rows: 1)
    return st.opts.inputs == "logits" and bool(shape) and shape[k] is not None and shape[k] >= 2 and 0 not in shape


def _looks_like_probs(ops: Any, z: Any, shape: tuple[Any, ...], k: int) -> Any:
    """True when the first few rows are in [0, 1] and sum to 1 (reads a few rows, not the logits)."""
    rows = ops.cast(z[_sample_index(shape, k, _SAMPLE_ROWS)], ops.acc_dtype(z))
    inside = ops.all((rows >= 0) & (rows <= 1), None) & (ops.size(rows) > 0)  # shapes may be unknown
    return inside & ops.all(ops.abs(ops.sum(rows, k) - 1.0) <= 1e-3, None)


def _looks_like_probs_host(call: _Call) -> bool:
    """The same probe on the host, short-circuiting on the first value outside [0, 1]."""
    k = call.st.kernel.opts.k
    idx = _sample_index(call.shape, k, _SAMPLE_ROWS)
    host = call.be.host_view(call.z)  # the whole array without a copy, or None (then copy the rows)
    rows = call.be.to_numpy(call.z[idx]) if host is None else host[idx]
    with np.errstate(invalid="ignore"):  # NaN is not >= 0: not a probability row
        if rows.size == 0 or not (rows.min() >= 0 and rows.max() <= 1):  # logits: min < 0 at once
            return False
        return bool(np.all(np.abs(rows.astype(np.float64).sum(k) - 1.0) <= 1e-3))


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


def _raise_value_error(call: _Call, shape: tuple[Any, ...]) -> None:
    """The slow path: find the first offending element of the first problem and raise."""
    be, st = call.be, call.st
    o, C = st.opts, st.C
    found = {name: be.to_numpy(v) for name, v in be.run(_bad_tokens, st, *call.arrays).items()}
    T = call.tok_shape[o.tok_layout.index("T")] if "T" in o.tok_layout else None

    def target_pos(pos: tuple[int, ...]) -> tuple[int, ...]:
        """A position at the logits' steps -> the target's own position (shift)."""
        if not st.shift:
            return pos
        p = list(pos)
        p[o.tok_layout.index("T")] += st.shift
        return tuple(p)

    if "targets" in found and found["targets"].any():
        pos = target_pos(tuple(int(i) for i in np.argwhere(found["targets"])[0]))
        value = _raw(call, "targets", call.y)[pos]
        ign = (f"or ignore_index={o.ignore[0] if len(o.ignore) == 1 else list(o.ignore)}"
               if o.ignore else "and ignore_index=None")
        raise XSeqLossError(
            f"targets{position(pos)} = {value} is out of range: valid class ids are [0, {C if C else 'C'}) "
            f"(C = {C}) {ign}" + ("; negative labels never wrap" if value < 0 else ""))
    if call.lengths is not None:
        lens = _raw(call, "lengths", call.lengths)
        bad = (lens < 0) | (lens > T)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise XSeqLossError(f"lengths{position(pos)} = {lens[pos]} is out of range: valid lengths are "
                                f"[0, {T}] (T = {T})")
    if call.cw is not None:
        cw = be.to_numpy(call.cw)
        bad = ~np.isfinite(cw.astype(np.float64)) | (cw < 0)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise XSeqLossError(f"class_weights{position(pos)} = {cw[pos]} is invalid: class weights must be "
                                f"finite and in [0, inf)")
    if call.normalizer is not None:  # every array type: a NumPy scalar or 0-d array too (issue 11)
        v = float(be.to_numpy(call.normalizer))
        if not np.isfinite(v) or v < 0:
            raise XSeqLossError(f"normalizer = {v} is out of range: valid range is [0, inf)")
    if "soft" in found and found["soft"].any():
        tok = tuple(int(i) for i in np.argwhere(found["soft"])[0])
        row, where = _row(call, target_pos(tok), call.t)
        c = int(np.argmax(~np.isfinite(row.astype(np.float64)) | (row < 0)))
        raise XSeqLossError(f"targets{where(c)} = {row[c]} is invalid: soft-target values must be "
                            f"finite and >= 0, i.e. in [0, inf) (they are not renormalised)")
    if "probs" in found and found["probs"].any():
        tok = tuple(int(i) for i in np.argwhere(found["probs"])[0])
        row, where = _row(call, tok, call.z)
        c = int(np.argmax((row < 0) | (row > 1) | ~np.isfinite(row)))
        raise XSeqLossError(f"logits{where(c)} = {row[c]} is not a probability (inputs='probs'): values "
                            f'must be in [0, 1]; if these are raw scores use inputs="logits"')
    if "probs_sum" in found and found["probs_sum"].any():
        tok = tuple(int(i) for i in np.argwhere(found["probs_sum"])[0])
        _, where = _row(call, tok, call.z)
        sums = found["sums"]
        raise XSeqLossError(f"logits{where(None)} sums to {sums[tok]:.9g} in {sums.dtype} "
                            f"(inputs='probs'): probability rows must sum to 1 within 1e-3, i.e. in "
                            f"[0.999, 1.001]; if these are raw scores use inputs='logits'")


def _row(call: _Call, tok: tuple[int, ...], x: Any) -> tuple[np.ndarray, Any]:
    """The class row of ``x`` at token position ``tok`` (padded coordinates for ragged rows), and a
    function giving the message's index of class c (None: the whole row, ':')."""
    be, o = call.be, call.st.opts
    a = be.to_numpy(x)
    if call.rows is not None:  # a ragged row: find which row holds this padded position
        T = call.tok_shape[1]
        r = int(np.argmax(be.to_numpy(call.rows) == tok[0] * T + tok[1]))
        return a[r], (lambda c: f"[{r}, {':' if c is None else c}] (row {r} of the ragged data: sequence "
                                f"{tok[0]}, step {tok[1]})")
    k = o.k
    full = list(tok)
    full.insert(k, slice(None))
    row = a[tuple(full)]

    def where(c: Any) -> str:
        idx = [str(i) for i in tok]
        idx.insert(k, ":" if c is None else str(c))
        return "[" + ", ".join(idx) + "]"
    return row, where


def _raw(call: _Call, name: str, cast: Any) -> np.ndarray:
    """The array as the user gave it (before the index cast), for the message's value."""
    raw = (call.raw or {}).get(name)
    return call.be.to_numpy(cast if raw is None else raw)


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


