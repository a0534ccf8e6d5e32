"""JAX's collectives for classes split across workers (API.md 9.2; the orchestration is
xseqloss/_class_parallel.py): the core's reducer over a mesh axis (inside shard_map / pmap), and the
fused output layer with the weight sharded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..._errors import XSeqLossError
from ...core import linear_stats
from ...core.chunks import even_chunk
from ...core.linear import loss_width, run_chunks
from ...plan.call_plan import LinearLayout
from ...plan.split import Reducer
from .linear import JaxChunks

__all__ = ["JaxReducer", "JaxClassParallel"]


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

    def offset(self, like: Any) -> Any:
        return (jax.lax.axis_index(self.split.handle) * self.split.local).astype(like.dtype)

    def labels(self, y: Any) -> tuple[Any, Any]:
        lo = jax.lax.axis_index(self.split.handle) * self.split.local
        yl = y - lo.astype(y.dtype)
        own = (yl >= 0) & (yl < self.split.local)
        return jnp.where(own, yl, 0), own

    def _where(self, c: Any, a: Any, b: Any) -> Any:
        return jnp.where(c, a, b)




class JaxClassParallel:
    def reducer(self, split: Any) -> JaxReducer:
        return JaxReducer(split)

    def check_split_handle(self, handle: Any) -> None:
        """A mesh axis name (checked to be bound by ``axis_size``)."""

    def axis_size(self, handle: Any) -> int:
        try:
            return int(jax.lax.psum(1, handle))
        except NameError as exc:
            raise XSeqLossError(f"class_parallel={handle!r} names a JAX mesh axis, which exists only inside shard_map "
                                f"or pmap over that axis ({exc}); under plain jax.jit with a class-sharded "
                                f"NamedSharding pass no class_parallel") from None

    def linear_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                              cw: Any, acc: Any) -> Any:
        """The fused layer inside shard_map with the weight sharded along C: the core's chunk loop for
        the losses, each chunk rematerialised (the backward recomputes its logits instead of keeping
        them), its class sums through psum; JAX's autodiff gives the gradients, d hidden summed over
        the axis by its own transpose of the hidden states' broadcast to the sharded weight."""
        lay = LinearLayout(lay.h_axis, lay.weight_layout, max(1, min(even_chunk(h2.shape[0], lay.chunk), h2.shape[0])))
        loop = JaxChunks(lay, acc, h2, w, b, False, outputs=True, width=loss_width(rp))
        return run_chunks(self, rp, loop, y, t, keep, cw, acc, None, False)[0]

    def linear_stats_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any,
                                    temp: Any, acc: Any) -> Any:
        """linear_token_stats inside shard_map with the weight sharded along C: the same custom VJP as
        one device's (backends/jax/linear_stats.py), with d hidden summed over the axis in its
        backward (the hidden states are replicated, so their cotangent must be too)."""
        lay = LinearLayout(lay.h_axis, lay.weight_layout, max(1, min(even_chunk(h2.shape[0], lay.chunk), h2.shape[0])))
        t = None if temp is None or isinstance(temp, float) else jax.lax.stop_gradient(temp)
        return _stats_vjp(self, rp, jnp.dtype(acc).name, lay)(h2, w, b, y, ids, keep, t)


def _stats_vjp(ops: Any, rp: Any, acc: str, lay: Any) -> Any:
    dt = jnp.dtype(acc)
    width = linear_stats.width(rp)
    axis = rp.class_parallel.handle

    @jax.custom_vjp
    def f(h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        loop = JaxChunks(lay, dt, h2, w, b, False, width=width)
        return linear_stats.forward(ops, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), dt)

    def fwd(h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        packed = f(h2, w, b, y, ids, keep, temp)
        return packed, (h2, w, b, y, ids, keep, temp, packed)

    def bwd(res: Any, ct: Any) -> Any:
        h2, w, b, y, ids, keep, temp, packed = res
        loop = JaxChunks(lay, dt, h2, w, b, True, vary=axis)
        dh, dw, db = linear_stats.backward(ops, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), packed, ct, dt)
        dh = jax.lax.psum(dh[:h2.shape[0]].astype(dt), axis)
        return (dh.astype(h2.dtype), dw.astype(w.dtype), None if db is None else db.astype(b.dtype),
                None, None, None, None if temp is None else jnp.zeros_like(temp))

    f.defvjp(fwd, bwd)
    return f
