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

(dH/du_c = -p_c (log p_c + H)): the backward forms l_c = log p_c = u_c - m - log s (clamped
from below, so p_c = exp(l_c) is exactly 0 at a -inf logit and the product finite) and then

    g_c = p_c (A - b l_c) + a [c == y] + sum_j d_j [c == ids_j],    A = c - a - sum_j d_j - b H

with every per-token factor (A, b, a, d_j) divided by T before it meets the (tokens, C) arrays: du/dz
= 1 / T costs no pass of its own; then the softcap's 1 - tanh^2. The forward saves (m, log s, Ē) per
token (H = log s - Ē), so the backward reads the logits once and makes four passes over a chunk.

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


# The shifted logits (and the log-probabilities of the backward) are clamped here from below: exp
# gives exactly 0 there, as at -inf (exp underflows to 0 below -104 in float32 and -746 in float64,
# the accumulation dtypes), so the clamp changes no value, and the products 0 * u_c stay 0 where
# -inf would give NaN; small enough in magnitude that b * u_c cannot overflow for any finite
# cotangent below 1e34.
_LOWEST = -1e4


def _transform(ops: Any, rp: CallPlan, z: Any, temp: Any, acc: Any, k: int) -> tuple[Any, Any, Any]:
    """(x: z after the softcap, u = x / T, tanh or None), in ``acc``.
    Rows that do not count are not cleaned here: each row's values stay in its own row, the
    outputs of such rows are set afterwards and their gradient rows replaced by exact zeros, so
    garbage there (NaN, inf) reaches neither an output nor a gradient, without a pass over the
    logits to zero them."""
    x = ops.cast(z, acc)
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
    x, u, _ = _transform(ops, rp, z, temp, acc, k)
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
    # the per-token factors first (small arrays): A, b and the class terms, each divided by T
    a, b, c, d = ((None if cts.get(n) is None else ops.cast(cts[n], acc))
                  for n in ("log_prob", "entropy", "lse", "ids_log_prob"))
    coef = c
    if a is not None:
        coef = -a if coef is None else coef - a
    if d is not None:
        dsum = ops.sum(d, ops.ndim(d) - 1)
        coef = -dsum if coef is None else coef - dsum
    if b is not None:
        bh = b * (ls - eb)  # b H
        coef = -bh if coef is None else coef - bh
    inv = None  # 1 / T per token (an array), or a Python float; None: T = 1
    if isinstance(temp, float):
        inv = None if temp == 1.0 else 1.0 / temp
    elif temp is not None:
        inv = 1.0 / ops.cast(temp, acc)

    def per_t(v: Any) -> Any:  # v / T: a token-shaped v, or ids' (tokens, k)
        if v is None or inv is None:
            return v
        if isinstance(inv, float):
            return v * inv
        return v * (inv if ops.ndim(v) == ops.ndim(inv) else ops.expand(inv, ops.ndim(inv)))

    coef, b, a, d = per_t(coef), per_t(b), per_t(a), per_t(d)
    # then the (tokens, C) passes: l = log p (clamped), p = exp(l), g = p (A - b l)
    _, u, tanh = _transform(ops, rp, z, temp, acc, k)
    lp = (u - ops.expand(m, k)) - ops.expand(ls, k)  # u - m first: exact near the max, whatever the logits' scale
    valid = _valid(ops, red, lp, k)
    if valid is not None:
        lp = ops.where(valid, lp, -np.inf)
    lp = ops.maximum(lp, _LOWEST)  # p_c = exp(l_c) exactly 0 at a -inf logit, b l_c finite there
    p = ops.exp(lp)
    if b is not None:
        f = lp * ops.expand(-b, k)
        if coef is not None:
            f = f + ops.expand(coef, k)
        g = p * f
    elif coef is not None:
        g = p * ops.expand(coef, k)
    else:
        g = ops.zeros_like(lp)
    if a is not None and y is not None:
        yk, own = (y, None) if red is None else red.labels(y)
        g = ops.add_class(g, yk, a if own is None else ops.where(own, a, 0.0), k)
    if d is not None and ids is not None:
        ik, own = (ids, None) if red is None else red.labels(ids)
        for j in range(ops.dim(ids, ops.ndim(ids) - 1)):
            vj = d[..., j]
            g = ops.add_class(g, ik[..., j], vj if own is None else ops.where(own[..., j], vj, 0.0), k)
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
