"""JAX's collectives for classes split across workers (API.md 9.2; the orchestration is
xseqloss/_class_parallel.py): the core's reducer over a mesh axis (inside shard_map / pmap), and the
fused output layer with the weight sharded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..._errors import XSeqLossError
from ...core.chunks import even_chunk
from ...core.linear import run_chunks
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
        loop = JaxChunks(lay, acc, h2, w, b, False, outputs=True)
        return run_chunks(self, rp, loop, y, t, keep, cw, acc, None, False)[0]
