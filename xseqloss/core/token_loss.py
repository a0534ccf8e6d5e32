"""The per-token loss and its gradient: the one analytic formula of the package (``token_loss``).
Every backend's chunked or fused kernel calls it, or a native kernel that means exactly the same."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..plan.call_plan import CallPlan
from ..plan.options import PROB_EPS

def token_loss(ops: Any, st: CallPlan, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               want_grad: bool = False, k: int | None = None, rows_zeroed: bool = False,
               collect: dict | None = None) -> tuple[Any, Any]:
    """Per-token loss l (acc dtype, token shape) and, if ``want_grad``, dl/dz (acc dtype, logits' shape).

    With x the transformed inputs (softcap; log of clamped probabilities), the target distribution
    q = (1 - eps) * cw[y] * onehot(y) + (eps / C) * cw (index targets, never built as a one-hot) or
    q = cw * ((1 - eps) * t + eps / C) (soft targets), and for logits m = max(x), xs = x - m,
    lse_s = log(sum(exp(xs))) (lse = lse_s + m):

        l = sum(q) * lse_s - q . xs + z_loss * w_z * lse^2      (w_z = cw[y]; 1 for soft targets)

    which is sum(q) * lse - q . x written in the max-shifted frame: float32 logits near 1e4 would
    otherwise lose ulp(1e4) in lse and in x[y] before the subtraction (issue 11). For log_probs and
    probs inputs m = 0 and there is no lse. 0 log 0 = 0: a class whose target mass q[c] is exactly 0
    adds exactly 0 to l and to the gradient, even where its logit is -inf (vocabulary masking).
    Rows where ``keep`` is false give exactly 0 loss and exactly 0 gradient whatever their contents.
    ``k`` overrides the class axis (a backend's chunked kernel passes flattened (rows, C) chunks).
    ``rows_zeroed``: the caller made the rows that do not count harmless already (the fused layer
    zeroes their hidden states before the matmul, so their logits are the bias), and the masked
    copy of the logits that makes garbage rows NaN-safe is not needed: on XLA that copy is a
    chunk-sized temporary, as the reductions do not fuse it. Their loss and gradient are still
    exactly 0.

    Classes split across workers (``st.class_parallel``, API.md 9.2): ``z``, ``t`` and ``cw`` are
    this worker's slice of the class axis and C is the global count. The formula is the same; its
    class sums (the max m, sum(exp), the target logit x[y] and weight cw[y], the smoothing sum,
    sum(q) and q . x) are the local partial sums combined over the workers: one all-reduce of the
    max and one of the stacked token-sized partial sums (the backend's ``reducer``, plan/split.py).

    ``collect`` (a loss's ``return_stats``, API.md 11.5; ``st.stats`` names them): a dict that
    receives the per-token outputs of core/stats.py at temperature 1 from this same pass (the
    same max, exponentials and sums), as metrics without gradient.
    """
    o, C, eps = st.opts, st.C, st.eps
    k = o.k if k is None else k
    red = None if st.class_parallel is None else ops.reducer(st.class_parallel)
    if st.plain and not want_grad and collect is None:
        return ops.nll(z, y, keep, k, acc, st), None
    keep_c = None if keep is None else ops.expand(keep, k)
    x = ops.cast(z, acc)
    if keep_c is not None and not rows_zeroed:
        x = ops.where(keep_c, x, 0.0)  # NaN-safe: garbage rows never reach exp/log (nor their gradient)
    tanh = None
    if o.cap is not None:
        tanh = ops.tanh(x / o.cap)
        x = tanh * o.cap
    probs = None
    if o.inputs == "probs":
        probs = x
        x = ops.log(ops.maximum(x, PROB_EPS))
    valid = None
    if red is not None and red.split.padded:  # JAX: padding columns past the global C take no part
        valid = red.valid(x, k)
        x = ops.where(valid, x, -np.inf)
        if cw is not None:
            cw = ops.where(red.valid(cw, 0), cw, 0.0)
    lse_s = lse = e = s = m = None
    if o.inputs == "logits":
        m = ops.stop_gradient(ops.max(x, k))
        if red is not None:
            m = red.max(m)
        m = ops.where(m == -np.inf, 0.0, m)  # a row of -inf: lse = -inf, as _common.logsumexp
        x = x - ops.expand(m, k)  # the max-shifted frame; softmax = e / s, not exp(x - lse)
        e = ops.exp(x)
        s = ops.sum(e, k)
    want = () if collect is None else st.stats.outputs
    eus = None if "entropy" not in want else \
        ops.sum(ops.where(e == 0, 0.0, ops.stop_gradient(e) * ops.stop_gradient(x)), k)  # 0 log 0 = 0
    cw_b = None if cw is None else ops.reshape_class(cw, k, ops.ndim(x))
    w_z = 1.0
    yk = y
    if red is not None and not st.soft:
        yk, own = red.labels(y)  # this worker's column of each target, and whether it holds it
    if st.soft:
        q = ops.cast(t, acc)
        if keep_c is not None:
            q = ops.where(keep_c, q, 0.0)
        if eps:
            q = q * (1.0 - eps) + eps / C
        if cw_b is not None:
            q = q * cw_b
        if valid is not None:
            q = ops.where(valid, q, 0.0)
        sumq = ops.sum(q, k)
        qx = ops.sum(_times(ops, q, x), k)
        if red is not None:
            parts = red.sums([p for p in (s, sumq, qx, eus) if p is not None])
            s = parts.pop(0) if s is not None else None
            sumq, qx = parts[0], parts[1]
            eus = parts[2] if eus is not None else None
        l = -qx
    else:
        xy = ops.take_class(x, yk, k)
        w_y = ops.take(cw, yk) if cw is not None else 1.0
        smooth = sum_cw = None
        if eps:
            smooth = ops.sum(_times(ops, cw_b, x), k) if cw is not None else \
                ops.sum(x if valid is None else ops.where(valid, x, 0.0), k)
            sum_cw = ops.sum(cw, 0) if cw is not None else None
        if red is not None:  # the owner's x[y] and cw[y], 0 elsewhere; then every partial sum combined
            xy = ops.where(own, xy, 0.0)
            if cw is not None:
                w_y = ops.where(own, w_y, 0.0)
            parts = [p for p in (s, xy, w_y if cw is not None else None, smooth, sum_cw, eus) if p is not None]
            it = iter(red.sums(parts))
            s, xy = (next(it) if s is not None else None), next(it)
            w_y = next(it) if cw is not None else w_y
            smooth = next(it) if smooth is not None else None
            sum_cw = next(it) if sum_cw is not None else None
            eus = next(it) if eus is not None else None
        if cw is not None:
            w_z = w_y
        a = (1.0 - eps) * w_y
        l = -_times(ops, a, xy)
        sumq = a
        if eps:
            b = eps / C
            sumq = sumq + b * (sum_cw if cw is not None else float(C))
            l = l - b * smooth
    if s is not None:
        lse_s = ops.log(s)
        lse = lse_s + m
    if lse is not None:
        l = l + sumq * lse_s
        if o.z_loss:
            l = l + (o.z_loss * lse * lse) * w_z
    if keep is not None:
        l = ops.where(keep, l, 0.0)
    if collect is not None:
        _metrics(ops, st, red, collect, x, m, s, eus, None if st.soft else xy, y, keep, k)
    if not want_grad:
        return l, None
    # dl/dx = (sum(q) + 2 z_loss w_z lse) softmax(x) - q, then the chain rule through softcap / log-clamp.
    if lse is not None:
        coef = sumq + (2.0 * o.z_loss * lse) * w_z if o.z_loss else sumq
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
        va = -a if not isinstance(a, float) else ops.full_tokens(y, -a, acc)
        g = ops.add_class(g, yk, va if red is None else ops.where(own, va, 0.0), k)
    if tanh is not None:
        g = g * (1.0 - tanh * tanh)
    if probs is not None:
        g = ops.where(probs > PROB_EPS, g / ops.where(probs > PROB_EPS, probs, 1.0), 0.0)
    if keep_c is not None:
        g = ops.where(keep_c, g, 0.0)
    if valid is not None:
        g = ops.where(valid, g, 0.0)
    return l, g


def _times(ops: Any, mass: Any, x: Any) -> Any:
    """mass * x with 0 log 0 = 0: exactly 0 where the mass is 0, even where x is -inf (or NaN from
    -inf - -inf). A Python float mass is 0 only with label_smoothing=1 (the target keeps nothing)."""
    if isinstance(mass, float):
        return 0.0 if mass == 0.0 else mass * x
    return ops.where(mass == 0, 0.0, mass * x)


def _metrics(ops: Any, st: CallPlan, red: Any, collect: dict, xs: Any, m: Any, s: Any, eus: Any, xy: Any, y: Any,
             keep: Any, k: int) -> None:
    """The loss pass's per-token outputs at temperature 1 (core/stats.py's meaning, API.md 11.5):
    ``xs`` the max-shifted logits after the softcap, ``m`` the max, ``s`` sum(exp(xs)), ``eus``
    sum(exp(xs) xs), ``xy`` the target's shifted logit (all combined over workers already)."""
    sg = ops.stop_gradient
    ls = ops.log(sg(s))
    want = st.stats.outputs
    out = {}
    if "log_prob" in want:
        out["log_prob"] = sg(xy) - ls
    if "entropy" in want:
        out["entropy"] = ls - eus / sg(s)
    if "lse" in want:
        out["lse"] = ls + sg(m)
    if "argmax" in want or "correct" in want:
        am = argmax_of(ops, red, sg(xs), k)
        if "argmax" in want:
            out["argmax"] = am
        if "correct" in want:
            out["correct"] = am == y
    for name, v in out.items():
        if keep is not None:
            v = ops.where(keep, v, -1) if name == "argmax" else (v & keep) if name == "correct" else \
                ops.where(keep, v, 0.0)
        collect[name] = v


def argmax_of(ops: Any, red: Any, x: Any, k: int) -> Any:
    """The index of the largest logit (after the softcap), the lowest on ties; global indices when
    classes are split across workers (the lowest index among the workers holding the maximum)."""
    idx = ops.argmax(x, k)
    if red is None:
        return idx
    mx = ops.max(x, k)
    gmx = red.max(mx)
    glob = idx + red.offset(idx)
    big = ops.full_like(glob, np.iinfo(np.int32).max)
    return -red.max(-ops.where(mx == gmx, glob, big))
