"""JAX's collectives for classes split across workers (xseqloss/class_parallel.py, API.md 9.2):
the core's reducer over a mesh axis (inside shard_map / pmap), and the fused output layer with the
weight sharded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._token_loss import token_loss
from ..class_parallel import Reducer
from ..linear import counted_rows

__all__ = ["JaxReducer", "jax_linear"]


class JaxReducer(Reducer):
    def max(self, v: Any) -> Any:
        return jax.lax.pmax(jax.lax.stop_gradient(v), self.split.handle)

    def sums(self, vs: list) -> list:
        dt = jnp.result_type(*vs)
        flat = jnp.concatenate([jnp.ravel(v).astype(dt) for v in vs])
        out = jax.lax.psum(flat, self.split.handle)
        ends = []
        n = 0
        for v in vs:
            n += int(jnp.size(v))
            ends.append(n)
        pieces = jnp.split(out, ends[:-1])
        return [p.reshape(jnp.shape(v)).astype(jnp.result_type(v)) for p, v in zip(pieces, vs)]

    def valid(self, x: Any, k: int) -> Any:
        """Columns of the local slice (along axis k of x's shape) that are real classes (< C)."""
        cols = jax.lax.broadcasted_iota(jnp.int32, jnp.shape(x), k)
        return cols + (jax.lax.axis_index(self.split.handle) * self.split.local).astype(jnp.int32) < self.split.C

    def labels(self, y: Any) -> tuple[Any, Any]:
        lo = jax.lax.axis_index(self.split.handle) * self.split.local
        yl = y - lo.astype(y.dtype)
        own = (yl >= 0) & (yl < self.split.local)
        return jnp.where(own, yl, 0), own

    @staticmethod
    def _where(c: Any, a: Any, b: Any) -> Any:
        return jnp.where(c, a, b)


def jax_linear(be: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               chunk: int, wl: str) -> Any:
    """The fused layer inside shard_map with the weight sharded along C: the chunks through
    ``jax.lax.map`` of a rematerialised body (the backward recomputes each chunk's logits instead
    of keeping them), its class sums through psum; d hidden is summed over the axis by JAX's
    own transpose of the hidden states' broadcast to the sharded weight."""
    R, H = h2.shape
    chunk = max(1, min(chunk, R))
    n = -(-R // chunk)
    pad = n * chunk - R

    def split(x: Any) -> Any:
        if x is None:
            return None
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        return x.reshape(n, chunk, *x.shape[1:])

    valid = None if not pad else split(jnp.ones((R,), bool))
    kp = split(keep) if keep is not None else valid
    if keep is not None and valid is not None:
        kp = kp & valid
    dims = (((1,), (1,)), ((), ())) if wl == "CH" else (((1,), (0,)), ((), ()))

    @jax.checkpoint
    def body(args: Any) -> Any:
        hc, yc, tc, kc = args
        hc = counted_rows(be, hc, kc)
        z = jax.lax.dot_general(hc, w, dims, preferred_element_type=acc)
        if b is not None:
            z = z + b.astype(acc)
        return token_loss(be, kst, z, yc, tc, kc, cw, acc, k=1, rows_clean=True)[0]

    l = jax.lax.map(body, (split(h2), split(y), split(t), kp))
    return l.reshape(n * chunk)[:R]
