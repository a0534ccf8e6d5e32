"""Value checks (eager, ``validate=True``): one backend call computes a flag per kind of problem
(core/checks.py); only when one is set, the slow path here finds the first offending element and
raises the error of the catalogue with its argument, position, value and valid range. Also the
softmax-input probe on the host (NumPy and PyTorch read a few rows)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import XSeqLossError
from ..core.checks import SAMPLE_ROWS, bad_tokens, probe_applies, probe_in_core, sample_index, value_flags
from ..plan.messages import position
from .prepare import Call

def _first(be: Any, bad: Any) -> tuple[int, ...] | None:
    """Index of the first true element (host sync; only when something is wrong)."""
    arr = be.to_numpy(bad)
    if not arr.any():
        return None
    return tuple(int(i) for i in np.argwhere(arr)[0])


def check_values(call: Call) -> None:
    """Validate values in a call of their own (value_and_grad, token_count): no softmax probe."""
    flags = call.be.run(value_flags, call.st, *call.arrays)
    if any(call.be.to_numpy(f) for f in flags.values()):
        raise_value_error(call, call.shape)


def check_concrete_sides(call: Call) -> None:
    """The value checks of the side arrays when the logits are traced but the side arrays are not
    (``call.check_sides``: jax.grad, jax.vjp or jax.vmap without jit). They run on host copies with
    the NumPy backend, since a backend call inside an outer trace would itself be traced. The
    logits' own checks (inputs="probs") cannot run: those rows are marked NaN as under jit."""
    be = call.be
    host = _dispatch.load("numpy")
    y, t, mask, lengths, weights, cw, normalizer, segs, rows = [None if a is None else be.to_numpy(a)
                                                                 for a in call.arrays[1:]]
    raw = {k: be.to_numpy(v) for k, v in (call.raw or {}).items()}
    sides = Call(host, call.st, None, y, t, mask, lengths, weights, cw, normalizer, shape=call.shape, raw=raw,
                  segs=segs, rows=rows, tok_shape=call.tok_shape)
    check_values(sides)


def _looks_like_probs_host(call: Call) -> bool:
    """The same probe on the host: a few sampled values first (logits show one outside [0, 1] at
    once), then the sampled rows."""
    k = call.st.row_plan.opts.k
    idx = sample_index(call.shape, k, SAMPLE_ROWS)
    host = call.be.host_view(call.z)  # the whole array without a copy, or None (then copy the rows)
    rows = call.be.to_numpy(call.z[idx]) if host is None else host[idx]
    if rows.size == 0 or not all(0 <= v <= 1 for v in rows.flat[:8].tolist()):  # NaN fails too
        return False
    with np.errstate(invalid="ignore"):  # NaN is not >= 0: not a probability row
        if not (rows.min() >= 0 and rows.max() <= 1):
            return False
        return bool(np.all(np.abs(rows.astype(np.float64).sum(k) - 1.0) <= 1e-3))


def probe_softmax_input(call: Call) -> None:
    """The softmax-input probe of an eager call whose checks found nothing (the default call)."""
    if call.be.host_probe and call.z is not None and probe_applies(call.st, call.shape) \
            and _looks_like_probs_host(call):
        warn_probs()


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_probs() -> None:
    """The probe's warning, attributed to the caller's line (the first frame outside the package),
    whichever path inside the package raised it."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_probs's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        level, frame = level + 1, frame.f_back
    warnings.warn("xseqloss: the logits look like probability rows (in [0, 1], summing to 1): did you "
                  'pass softmax outputs? Use inputs="probs" for probabilities, or pass raw logits.',
                  UserWarning, stacklevel=level)


def act_on_flags(call: Call, flagvec: Any) -> None:
    be = call.be
    values = [] if flagvec is None else be.to_numpy(flagvec).tolist()
    probs_like = values.pop() if call.z is not None and probe_in_core(be, call.st, call.shape) else None
    if any(values):  # which check fired is found again on the slow path, with its position and value
        raise_value_error(call, call.shape)
    if probs_like is None and call.z is not None and be.host_probe \
            and probe_applies(call.st, call.shape):
        probs_like = _looks_like_probs_host(call)
    if probs_like:
        warn_probs()


def raise_value_error(call: Call, shape: tuple[Any, ...]) -> None:
    """The slow path: find the first offending element of the first problem and raise."""
    be, st = call.be, call.st
    o, C = st.opts, st.C
    found = {name: be.to_numpy(v) for name, v in be.run(bad_tokens, st, *call.arrays).items()}
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


def _row(call: Call, tok: tuple[int, ...], x: Any) -> tuple[np.ndarray, Any]:
    """The class row of ``x`` at token position ``tok`` (padded coordinates for ragged rows), and a
    function giving the message's index of class c (None: the whole row, ':')."""
    be, o = call.be, call.st.opts
    a = be.to_numpy(x)
    if call.rows is not None:  # a ragged row: find which row holds this padded position
        T = call.tok_shape[1]
        if T is None:  # TensorFlow's RaggedTensor: the padded T is the mask's (it is always given)
            T = int(be.shape(call.mask)[1])
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


def _raw(call: Call, name: str, cast: Any) -> np.ndarray:
    """The array as the user gave it (before the index cast), for the message's value."""
    raw = (call.raw or {}).get(name)
    return call.be.to_numpy(cast if raw is None else raw)


