"""Per-token outputs of the softmax (API.md 11), written once: log-probabilities, entropy, lse,
argmax, correctness and log-probabilities at given ids, and their gradient (``stats_rows`` forward,
``stats_vjp`` backward). Every backend runs these two functions, under its own custom gradient
(the backend's ``token_stats_rows``), whole or a chunk of rows at a time; the fused layer runs them
per chunk of its loop (core/linear.py).

For the logits z of one position after ``logit_softcap``, u = z / T (T applied exactly once),
m = max u, e = exp(u - m), s = sum e, p = e / s:

    lse = m + log s              log_prob = u[y] - lse           ids_log_prob[j] = u[ids_j] - lse
    entropy = log s - Ē,  Ē = sum_c p_c (u_c - m)   (= E[u] - m; a class with e_c = 0 adds exactly 0)

and for cotangents a (log_prob), b (entropy), c (lse), d_j (ids_log_prob), the gradient with
respect to u is

    g_c = p_c (c - a - sum_j d_j - b ((u_c - m) - Ē)) + a [c == y] + sum_j d_j [c == ids_j]

(dH/du_c = -p_c (log p_c + H), written with u_c - E[u] in the max-shifted frame: exact where
p -> 1, 0 at a -inf logit, never NaN); then du/dz = 1 / T and the softcap's 1 - tanh^2. The
forward saves (m, log s, Ē) per token, so the backward forms p = exp(u - m - log s) in one pass.

Classes split across workers (``rp.class_parallel``): z is this worker's slice; the max, the sums
(s, sum e (u - m)), the target's and the ids' logits (from the worker that holds each) are combined
over the workers in one max and one stacked sum all-reduce, and the argmax is the lowest global
index among the workers' maxima; every worker gets the same outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..plan.call_plan import CallPlan
from . import common, tokens
from .token_loss import argmax_of

NAMES = ("log_prob", "entropy", "lse", "argmax", "correct", "ids_log_prob")
DIFFERENTIABLE = ("log_prob", "entropy", "lse", "ids_log_prob")


# The shifted logits are clamped here from below: exp gives exactly 0 (as at -inf, in float32 and
# wider: the accumulation dtype), and the products 0 * u_c stay 0 where -inf would give NaN.
_LOWEST = -1e30


def _transform(ops: Any, rp: CallPlan, z: Any, keep: Any, temp: Any, acc: Any, k: int) -> tuple[Any, Any, Any]:
    """(x: z after the softcap, u = x / T, tanh or None), in ``acc``; rows that do not count are
    zeroed first, so garbage there never reaches exp or log (nor a gradient)."""
    x = ops.cast(z, acc)
    if keep is not None:
        x = ops.where(ops.expand(keep, k), x, 0.0)
    tanh = None
    cap = rp.opts.cap
    if cap is not None:
        tanh = ops.tanh(x / cap)
        x = tanh * cap
    if temp is None:
        u = x
    elif isinstance(temp, float):
        u = x if temp == 1.0 else x / temp
    else:
        u = x / ops.expand(ops.cast(temp, acc), k)
    return x, u, tanh


def _valid(ops: Any, red: Any, x: Any, k: int) -> Any:
    """JAX's padded vocabulary (API.md 9.2): the columns past C are no classes at all."""
    return None if red is None or not red.split.padded else red.valid(x, k)


def stats_rows(ops: Any, rp: CallPlan, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any,
               k: int | None = None) -> tuple[dict, tuple]:
    """The requested outputs per token (dict by name; no ``counted``) and what the backward needs,
    (m, log s, Ē) per token. ``y`` and ``ids`` are already clamped into [0, C) (global classes);
    ``keep`` the rows that count (None: all); ``temp`` None, a Python float or a token-shaped
    array. Outputs of rows that do not count are 0 (argmax -1, correct False); the caller applies
    the NaN marks of bad tokens."""
    want = rp.stats.outputs
    k = rp.opts.k if k is None else k
    red = None if rp.class_parallel is None else ops.reducer(rp.class_parallel)
    x, u, _ = _transform(ops, rp, z, keep, temp, acc, k)
    x, u = ops.stop_gradient(x), ops.stop_gradient(u)  # the gradient is stats_vjp's (a custom one)
    valid = _valid(ops, red, u, k)
    if valid is not None:
        x = ops.where(valid, x, -np.inf)
        u = ops.where(valid, u, -np.inf)
    m = ops.max(u, k)
    if red is not None:
        m = red.max(m)
    m = ops.where(m == -np.inf, 0.0, m)  # a row of -inf: as the loss's logsumexp
    us = u - ops.expand(m, k)
    uf = ops.maximum(us, _LOWEST)  # a -inf logit (p = 0) as a finite one with p = 0: 0 log 0 = 0 in one pass
    e = ops.exp(uf)
    sums = [ops.sum(e, k), ops.sum(e * uf, k)]
    yk, own = y, None
    if red is not None and y is not None:
        yk, own = red.labels(y)
    picks = []
    if y is not None and ("log_prob" in want):
        uy = ops.take_class(us, yk, k)
        picks.append(uy if own is None else ops.where(own, uy, 0.0))
    idk, ids_own = ids, None
    if ids is not None:
        if red is not None:
            idk, ids_own = red.labels(ids)
        ui = ops.gather_along(us if k == ops.ndim(us) - 1 else ops.moveaxis(us, k, -1), idk, ops.ndim(us) - 1)
        picks.append(ui if ids_own is None else ops.where(ids_own, ui, 0.0))
    if red is not None:
        combined = red.sums(sums + picks)
        sums, picks = combined[:2], combined[2:]
    s, eus = sums
    ls = ops.log(s)
    eb = eus / s
    out: dict = {}
    pk = iter(picks)
    if y is not None and "log_prob" in want:
        out["log_prob"] = next(pk) - ls
    if ids is not None:
        out["ids_log_prob"] = next(pk) - ops.expand(ls, ops.ndim(ls))
    if "entropy" in want:
        out["entropy"] = ls - eb
    if "lse" in want:
        out["lse"] = ls + m
    if "argmax" in want or "correct" in want:
        am = argmax_of(ops, red, x, k)
        if "argmax" in want:
            out["argmax"] = am
        if "correct" in want:
            out["correct"] = am == y
    out = {n: out[n] for n in NAMES if n in out}  # in the order of NAMES
    if keep is not None:
        for name, v in out.items():
            if name == "argmax":
                out[name] = ops.where(keep, v, -1)
            elif name == "correct":
                out[name] = v & keep
            elif name == "ids_log_prob":
                out[name] = ops.where(ops.expand(keep, ops.ndim(keep)), v, 0.0)
            else:
                out[name] = ops.where(keep, v, 0.0)
    return out, (m, ls, eb)


def stats_vjp(ops: Any, rp: CallPlan, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any, saved: tuple,
              cts: dict, k: int | None = None) -> Any:
    """d/dz of sum over outputs of sum(cotangent * output), in ``acc`` (z's shape): the analytic
    gradient of the module docstring; ``cts`` maps differentiable output names to cotangents of
    their shapes (a missing name is zero); exactly 0 on rows that do not count."""
    k = rp.opts.k if k is None else k
    red = None if rp.class_parallel is None else ops.reducer(rp.class_parallel)
    m, ls, eb = saved
    _, u, tanh = _transform(ops, rp, z, keep, temp, acc, k)
    valid = _valid(ops, red, u, k)
    if valid is not None:
        u = ops.where(valid, u, -np.inf)
    us = ops.maximum(u - ops.expand(m, k), _LOWEST)  # p_c = 0 at a -inf logit, and u_c - E[u] finite there
    p = ops.exp(us - ops.expand(ls, k))
    a, b, c, d = (cts.get(n) for n in ("log_prob", "entropy", "lse", "ids_log_prob"))
    coef = None
    for term, sign in ((c, 1.0), (a, -1.0)):
        if term is not None:
            t = ops.cast(term, acc)
            coef = t * sign if coef is None else coef + t * sign
    if d is not None:
        dsum = ops.sum(ops.cast(d, acc), ops.ndim(d) - 1)
        coef = -dsum if coef is None else coef - dsum
    g = None if coef is None else p * ops.expand(coef, k)
    if b is not None:
        gb = -(p * (us - ops.expand(eb, k))) * ops.expand(ops.cast(b, acc), k)  # p_c (u_c - E[u]): 0 where p_c = 0
        g = gb if g is None else g + gb
    if g is None:
        g = ops.zeros_like(u)
    if a is not None and y is not None:
        yk, own = (y, None) if red is None else red.labels(y)
        va = ops.cast(a, acc)
        g = ops.add_class(g, yk, va if own is None else ops.where(own, va, 0.0), k)
    if d is not None and ids is not None:
        ik, own = (ids, None) if red is None else red.labels(ids)
        dd = ops.cast(d, acc)
        for j in range(ops.dim(ids, ops.ndim(ids) - 1)):
            vj = dd[..., j]
            g = ops.add_class(g, ik[..., j], vj if own is None else ops.where(own[..., j], vj, 0.0), k)
    if temp is not None:
        if isinstance(temp, float):
            g = g if temp == 1.0 else g / temp
        else:
            g = g / ops.expand(ops.cast(temp, acc), k)
    if tanh is not None:
        g = g * (1.0 - tanh * tanh)
    if keep is not None:
        g = ops.where(ops.expand(keep, k), g, 0.0)
    if valid is not None:
        g = ops.where(valid, g, 0.0)
    return g


# ------------------------------------------------------------------------------- the whole call

def token_side_rules(ops: Any, st: CallPlan, z: Any, y: Any, mask: Any, lengths: Any, segs: Any, ids: Any,
                     temp: Any) -> dict:
    """The token side of a token_stats call, once: the arrays at the logits' positions (``shift``:
    targets, mask, ids and a per-token temperature describe the target position t + k), which
    positions count, the bad ones (a label, an id or a temperature value out of range at a counted
    position, marked when values are not checked), labels and ids clamped into [0, C), and the
    temperature as the row kernel takes it (a Python float, or an array broadcast to the tokens)."""
    o, sp = st.opts, st.stats
    like = y if y is not None else ops.drop_class(z, o.k)
    y, _, mask, _, counted, bad, _ = tokens.token_facts(ops, st, y, None, mask, lengths, None, segs, like)
    tok = o.tok_layout
    if st.shift:
        ta = tok.index("T")
        ids = None if ids is None else common.shift(ops, ids, st.shift, ta, 0)
        if sp.temp_array == "tokens":
            temp = common.shift(ops, temp, st.shift, ta, 1.0)
    if sp.temp_array == "sequence":
        for a in range(len(tok)):
            if tok[a] != "N":
                temp = ops.expand(temp, a)  # (N,) -> broadcast over the other token axes
    C = st.C
    marks = []
    if st.mark_nan:
        if y is not None:
            marks.append((y < 0) | (y >= C))
        if ids is not None:
            marks.append(ops.any((ids < 0) | (ids >= C), ops.ndim(ids) - 1))
        if temp is not None and not isinstance(temp, float) and sp.temperature is None:
            marks.append((ops.cast(temp, ops.acc_dtype(z)) <= 0) | ~ops.isfinite(temp))
    for mk in marks:
        mk = mk & ops.true_like(like)  # to the token shape
        mk = mk if counted is None else (mk & counted)
        bad = mk if bad is None else (bad | mk)
    if y is not None:
        y = ops.where((y >= 0) & (y < C), y, 0)
    if ids is not None:
        ids = ops.where((ids >= 0) & (ids < C), ids, 0)
    if sp.temperature is not None:
        temp = sp.temperature
    elif not isinstance(temp, float):
        # a bad value is marked NaN (bad), never divided by: the row stays finite in the kernel; the
        # where also broadcasts a 0-d or per-sequence temperature to the tokens
        temp = ops.where(ops.true_like(like) & ops.isfinite(temp) & (temp > 0), temp, 1.0)
    return dict(y=y, ids=ids, counted=counted, bad=bad, temp=temp, like=like)


def apply_marks(ops: Any, out: dict, bad: Any, counted: Any, like: Any) -> dict:
    """NaN in every float output of a bad token (its gradient rows NaN through the product),
    correct False there, and ``counted``."""
    if bad is not None:
        nan = ops.where(bad, float("nan"), 1.0)
        for name, v in out.items():
            if name in ("argmax",):
                continue
            if name == "correct":
                out[name] = v & ~bad
            elif name == "ids_log_prob":
                out[name] = v * ops.expand(ops.cast(nan, ops.dtype(v)), ops.ndim(v) - 1)
            else:
                out[name] = v * ops.cast(nan, ops.dtype(v))
    out["counted"] = ops.true_like(like) if counted is None else counted
    return out


def compute_stats(ops: Any, st: CallPlan, z: Any, y: Any, mask: Any, lengths: Any, segs: Any, ids: Any,
                  temp: Any) -> dict:
    """token_stats (API.md 11): the outputs asked for and ``counted``, differentiable through the
    backend's custom gradient around ``stats_rows`` / ``stats_vjp`` (``Backend.token_stats_rows``)."""
    r = token_side_rules(ops, st, z, y, mask, lengths, segs, ids, temp)
    out = ops.token_stats_rows(st, z, r["y"], r["ids"], r["counted"], r["temp"], ops.acc_dtype(z))
    return apply_marks(ops, dict(out), r["bad"], r["counted"], r["like"])


def compute_stats_vjp(ops: Any, st: CallPlan, z: Any, y: Any, mask: Any, lengths: Any, segs: Any, ids: Any,
                      temp: Any, cts: dict, grad_rows: Any = None) -> Any:
    """d logits of sum over outputs of sum(cotangent * output), analytically (token_stats_vjp on a
    backend without autodiff): NaN rows at bad tokens, 0 where a position does not count.
    ``grad_rows``: the backend's way to run ``grad_of_rows`` (NumPy: a chunk of rows at a time)."""
    r = token_side_rules(ops, st, z, y, mask, lengths, segs, ids, temp)
    if r["bad"] is not None:
        nan = ops.where(r["bad"], float("nan"), 1.0)
        cts = {n: (c * ops.expand(nan, ops.ndim(c) - 1) if n == "ids_log_prob" else c * nan) for n, c in cts.items()}
    return (grad_rows or grad_of_rows)(ops, st, z, r["y"], r["ids"], r["counted"], r["temp"], ops.acc_dtype(z), cts)


def grad_of_rows(ops: Any, rp: CallPlan, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any, cts: dict) -> Any:
    """The forward and the gradient of whole arrays at once (``stats_rows`` then ``stats_vjp``)."""
    _, saved = stats_rows(ops, rp, z, y, ids, keep, temp, acc)
    return stats_vjp(ops, rp, z, y, ids, keep, temp, acc, saved, cts)
