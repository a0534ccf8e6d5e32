"""The per-token loss and its gradient: the one analytic formula of the package (``token_loss``).
Every backend's chunked or fused kernel calls it, or a native kernel that means exactly the same."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks
from ._plan import Static

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


