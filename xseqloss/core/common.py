"""Kernels shared by backends whose arrays follow the NumPy API (NumPy, JAX) or that need a generic
fallback. Written over the backend's ops, so they are the same math everywhere."""

from __future__ import annotations

from typing import Any

import numpy as np


def shift(ops: Any, x: Any, k: int, axis: int, fill: Any) -> Any:
    """out[.., t, ..] = x[.., t + k, ..] along ``axis``, ``fill`` where t + k falls outside: one slice
    and one small fill of |k| steps (any k, also past the axis' length), written with slices so
    unknown sizes (tf.function) work too."""
    def cut(a: Any, b: Any) -> Any:
        idx = [slice(None)] * ops.ndim(x)
        idx[axis] = slice(a, b)
        return x[tuple(idx)]
    if k >= 0:
        return ops.concat([cut(k, None), ops.full_like(cut(None, k), fill)], axis)
    return ops.concat([ops.full_like(cut(None, -k), fill), cut(None, k)], axis)


def logsumexp(ops: Any, x: Any, k: int) -> Any:
    """max-shifted logsumexp along axis k. A row whose max is -inf gives -inf; a +inf or NaN in a row
    gives NaN (softmax is undefined there), the same on every backend."""
    m = ops.stop_gradient(ops.max(x, k))
    m = ops.where(m == -np.inf, 0.0, m)
    return ops.log(ops.sum(ops.exp(x - ops.expand(m, k)), k)) + m


def nll(ops: Any, z: Any, y: Any, keep: Any, k: int, acc: Any, differentiable: bool = True) -> Any:
    """lse(z) - z[y] per token, formed in the max-shifted frame as log(sum(exp(z - m))) - (z[y] - m):
    float32 logits near 1e4 would otherwise lose ulp(1e4) in lse and in z[y] before the subtraction.
    Rows where ``keep`` is false give exactly 0 and exactly 0 gradient. Without autodiff
    (``differentiable=False``) the inputs need no masking: the final where hides whatever a dropped
    row computed."""
    x = ops.cast(z, acc)
    if keep is not None and differentiable:
        x = ops.where(ops.expand(keep, k), x, 0.0)
    m = ops.stop_gradient(ops.max(x, k))
    m = ops.where(m == -np.inf, 0.0, m)
    x = x - ops.expand(m, k)
    l = ops.log(ops.sum(ops.exp(x), k)) - ops.take_class(x, y, k)
    return l if keep is None else ops.where(keep, l, 0.0)


def moveaxis_to(ops: Any, x: Any, src: str, dst: str) -> Any:
    """x with axes named by ``src`` (e.g. "NTC") rearranged into the order of ``dst``."""
    return ops.permute(x, [src.index(a) for a in dst])


def two_sum(ops: Any, x: Any, k: int) -> tuple[Any, Any]:
    """The sum of x along axis k (a static size) as an unevaluated pair hi + lo in x's dtype: a
    pairwise sum whose every addition keeps its rounding error (Knuth's TwoSum), so hi + lo is the
    exact sum to about ulp(ulp(sum)) * log2(size). Where float64 does not exist (JAX without x64) it
    stands in for a float64 sum of float32 values (decisions.md item 72)."""
    n = ops.dim(x, k)
    nd = ops.ndim(x)

    def cut(a: Any, start: Any, stop: Any = None, step: Any = None) -> Any:
        idx = [slice(None)] * nd
        idx[k] = slice(start, stop, step)
        return a[tuple(idx)]

    lo = ops.zeros_like(x)
    while n > 1:
        if n % 2:
            x = ops.concat([x, ops.full_like(cut(x, 0, 1), 0.0)], k)
            lo = ops.concat([lo, ops.full_like(cut(lo, 0, 1), 0.0)], k)
            n += 1
        a, b = cut(x, 0, None, 2), cut(x, 1, None, 2)
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
        x, lo = s, cut(lo, 0, None, 2) + cut(lo, 1, None, 2) + err
        n //= 2
    return ops.sum(x, k), ops.sum(lo, k)
