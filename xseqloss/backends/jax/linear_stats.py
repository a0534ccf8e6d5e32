"""JAX's part of linear_token_stats (core/linear_stats.py): the fused layer's chunk loop for
token_stats under a ``custom_vjp``: the forward packs the per-token outputs, the backward runs the
loop again under the cotangents (d hidden, d weight, d bias); the temperature gets a zero
cotangent."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ...core import linear_stats
from ...core.chunks import even_chunk
from ...plan.call_plan import LinearLayout
from .linear import JaxChunks


@functools.lru_cache(maxsize=256)
def _with_vjp(ops: Any, rp: Any, acc: str, lay: LinearLayout) -> Any:
    dt = jnp.dtype(acc)
    width = linear_stats.width(rp)

    @jax.custom_vjp
    def f(h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        loop = JaxChunks(lay, dt, h2, w, b, False, width=width)
        return linear_stats.forward(ops, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), dt)

    def fwd(h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        packed = f(h2, w, b, y, ids, keep, temp)
        return packed, (h2, w, b, y, ids, keep, temp, packed)

    def bwd(res: Any, ct: Any) -> Any:
        h2, w, b, y, ids, keep, temp, packed = res
        loop = JaxChunks(lay, dt, h2, w, b, True)
        dh, dw, db = linear_stats.backward(ops, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), packed, ct, dt)
        return (dh[:h2.shape[0]].astype(h2.dtype), dw.astype(w.dtype), None if db is None else db.astype(b.dtype),
                None, None, None, None if temp is None else jnp.zeros_like(temp))

    f.defvjp(fwd, bwd)
    return f


class JaxLinearStats:
    def linear_token_stats(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any,
                           acc: Any) -> Any:
        lay = LinearLayout(lay.h_axis, lay.weight_layout, even_chunk(h2.shape[0], lay.chunk))
        t = None if temp is None or isinstance(temp, float) else jax.lax.stop_gradient(temp)
        return _with_vjp(self, rp, jnp.dtype(acc).name, lay)(h2, w, b, y, ids, keep, t)

    def linear_stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        h, w, b, *rest = arrays
        names = tuple(cts)

        def f(hh: Any, ww: Any, bb: Any) -> Any:
            out = fwd(self, st, hh, ww, bb, *rest)
            return {n: out[n] for n in names}
        _, pull = jax.vjp(f, h, w, b)
        return tuple(pull({n: jnp.asarray(c) for n, c in cts.items()}))
