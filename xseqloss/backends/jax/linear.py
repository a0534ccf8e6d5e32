"""JAX's part of the fused output layer (``linear_cross_entropy``, core/linear.py).

The chunk loop's native pieces (``JaxChunks``): a ``lax.fori_loop`` (a scan) over chunks, so XLA
holds one chunk's logits at a time; the buffers (losses, d hidden, d weight, d bias) are the loop's
carry, written in place a chunk at a time. Matmuls take the inputs' dtype with a float32 (or wider)
result and contract the weight's own axes: no float32 copy of a 16-bit weight, no transposed copy.
A ``custom_vjp`` around the loop: the forward forms the gradients with the expected upstream
factor; the backward applies the upstream rule (core/backward.py, uniform): the formed gradients
times r, or the same loop again with the upstream gradient, as a while loop whose trip count is 0
or the number of chunks and whose carry starts from the scaled residuals (a ``lax.cond`` would size
both branches' buffers into the program).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ...core import backward
from ...core.chunks import even_chunk
from ...core.linear import ChunkLoop, loss_width, run_chunks
from ...plan.call_plan import LinearLayout

# contracting dimensions, never a transposed copy of the weight (XLA hoists w.T out of the loop as
# a (H, C) copy: 131 MB at 1,024 x 32,000)
_TC = (((1,), (1,)), ((), ()))   # a (t, k) . b (n, k) -> (t, n)
_TN = (((1,), (0,)), ((), ()))   # a (t, k) . b (k, n) -> (t, n)
_TT = (((0,), (0,)), ((), ()))   # a (k, m) . b (k, n) -> (m, n)

# d weight is accumulated CLASS_BLOCK classes at a time, in place: XLA does not fuse a matmul into
# the add that accumulates it, so a whole chunk's d weight term would be a (C, H) temporary, as
# large as d weight itself (131 MB at 32,000 x 1,024). Peak extra memory of forward+backward at
# 8,192 x 1,024 x 32,000: 0.30 L without the blocks, 0.07 L with them (benchmarks/linear_bench.py).
CLASS_BLOCK = 4096


class JaxChunks(ChunkLoop):
    """``trips``/``init`` (the backward's second pass): run that many chunks (0 or all) starting from
    the given (d hidden, d weight, d bias). ``vary``: the mesh axes (inside shard_map) along which
    the weight is sharded, so that the gradients' buffers vary along them from the start. ``outputs``: the losses as the scan's stacked output
    instead of a carried buffer, and each step rematerialised (the autodiff path of classes split
    across workers: reverse mode keeps no chunk's logits and no per-step copy of a loss buffer)."""

    def __init__(self, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool, trips: Any = None,
                 init: Any = None, outputs: bool = False, width: int = 0, vary: Any = None) -> None:
        self.acc, self.w, self.b, self.grads, self.width = acc, w, b, grads, width
        self.vary = None if vary is None else (vary if isinstance(vary, tuple) else (vary,))
        self.R, self.H = h2.shape
        self.chunk = lay.chunk
        self.ch = lay.weight_layout == "CH"
        self.n = max(1, -(-self.R // self.chunk))
        self.P = self.n * self.chunk - self.R
        self.h2 = self.pad(h2, 0)
        self.trips, self.init, self.outputs = trips, init, outputs
        self.dot = functools.partial(jax.lax.dot_general, preferred_element_type=acc)
        self._l: Any = None

    def pad(self, a: Any, fill: Any) -> Any:
        """An array of R rows padded to whole chunks (rows past R never count)."""
        if a is None or not self.P:
            return a
        return jnp.pad(a, [(0, self.P)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)

    def start(self) -> dict:
        st: dict = {}
        if not self.outputs:
            st["l"] = jnp.zeros((self.n * self.chunk, self.width) if self.width else (self.n * self.chunk,), self.acc)
        if self.grads:
            if self.init is not None:
                st["dh"], st["dw"], st["db"] = self.init
            else:
                st["dh"] = jnp.zeros((self.n * self.chunk, self.H), self.h2.dtype)
                st["dw"] = jnp.zeros(self.w.shape, self.acc)
                st["db"] = None if self.b is None else jnp.zeros(self.b.shape, self.acc)
            if self.vary is not None:  # inside shard_map with a sharded weight the gradients vary per device
                st.update({k: None if st[k] is None else jax.lax.pcast(st[k], self.vary, to="varying")
                           for k in ("dh", "dw", "db")})
        return st

    def run(self, step: Any, state: Any) -> Any:
        if self.outputs:
            def body(carry: Any, i: Any) -> Any:
                carry = step(i, carry)
                return carry, self._l
            state, ls = jax.lax.scan(jax.checkpoint(body), state, jnp.arange(self.n, dtype=jnp.int32))
            return dict(state, l=ls.reshape((-1, self.width) if self.width else (-1,)))
        if self.trips is None:
            return jax.lax.fori_loop(0, self.n, step, state)
        return jax.lax.while_loop(lambda c: c[0] < self.trips, lambda c: (c[0] + 1, step(c[0], c[1])),
                                  (jnp.zeros((), jnp.int32), state))[1]

    def tokens(self, a: Any, fill: Any) -> Any:
        return self.pad(a, fill)

    def rows(self, a: Any, i: Any) -> Any:
        return None if a is None else jax.lax.dynamic_slice_in_dim(a, i * self.chunk, self.chunk, 0)

    def hidden(self, state: Any, i: Any) -> Any:
        return jax.lax.dynamic_slice_in_dim(self.h2, i * self.chunk, self.chunk, 0)

    def logits(self, hc: Any, state: Any) -> Any:
        z = self.dot(hc, self.w, _TC if self.ch else _TN)
        return z if self.b is None else z + self.b.astype(self.acc)

    def put_loss(self, state: Any, i: Any, l: Any) -> Any:
        if self.outputs:
            self._l = l
            return state
        return dict(state, l=jax.lax.dynamic_update_slice_in_dim(state["l"], l.astype(self.acc), i * self.chunk, 0))

    def _gw(self, g: Any) -> Any:
        return g.astype(self.w.dtype) if self.w.dtype != self.acc else g  # the weight's dtype, float32 accumulation

    def put_dh(self, state: Any, i: Any, g: Any) -> Any:
        dhc = self.dot(self._gw(g), self.w, _TN if self.ch else _TC)
        dh = jax.lax.dynamic_update_slice_in_dim(state["dh"], dhc.astype(state["dh"].dtype), i * self.chunk, 0)
        return dict(state, dh=dh)

    def add_dw(self, state: Any, i: Any, g: Any, hc: Any) -> Any:
        """dw + the chunk's term, a block of classes at a time; the last block starts at
        C - CLASS_BLOCK and masks the classes an earlier block added."""
        gw, dw, dot = self._gw(g), state["dw"], self.dot
        C, cb = gw.shape[1], CLASS_BLOCK
        if C <= cb:
            return dict(state, dw=dw + (dot(gw, hc, _TT) if self.ch else dot(hc, gw, _TT)))
        axis = 0 if self.ch else 1

        def block(j: Any, dw: Any) -> Any:
            c0 = j * cb
            start = jnp.minimum(c0, C - cb)
            gb = jax.lax.dynamic_slice_in_dim(gw, start, cb, 1)
            gb = jnp.where((start + jnp.arange(cb) >= c0)[None, :], gb, jnp.zeros((), gb.dtype))
            term = dot(gb, hc, _TT) if self.ch else dot(hc, gb, _TT)
            old = jax.lax.dynamic_slice_in_dim(dw, start, cb, axis)
            return jax.lax.dynamic_update_slice_in_dim(dw, old + term, start, axis)
        return dict(state, dw=jax.lax.fori_loop(0, -(-C // cb), block, dw))

    def add_db(self, state: Any, g: Any) -> Any:
        return state if state["db"] is None else dict(state, db=state["db"] + g.sum(0))

    def finish(self, state: Any) -> tuple[Any, Any, Any, Any]:
        l = state["l"][:self.R]
        if not self.grads:
            return l, None, None, None
        return l, state["dh"], state["dw"], state["db"]  # padded, accumulation dtype: the caller casts


@functools.lru_cache(maxsize=256)
def _custom_vjp(ops: Any, rp: Any, acc: str, lay: LinearLayout) -> Any:
    def loop(h2: Any, w: Any, b: Any, grads: bool, **kw: Any) -> JaxChunks:
        return JaxChunks(lay, jnp.dtype(acc), h2, w, b, grads, width=loss_width(rp), **kw)

    @jax.custom_vjp
    def f(h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, formed: Any) -> Any:
        return run_chunks(ops, rp, loop(h2, w, b, False), y, t, keep, cw, jnp.dtype(acc), None, False)[0]

    def fwd(h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, formed: Any) -> Any:
        l, dh, dw, db = run_chunks(ops, rp, loop(h2, w, b, True), y, t, keep, cw, jnp.dtype(acc), formed, True)
        return l, (dh, dw, db, (h2, w, b, y, t, keep, cw, formed))

    def bwd(res: Any, ct: Any) -> Any:
        dh, dw, db, inputs = res
        h2, w, b, y, t, keep, cw, formed = inputs
        if ct.ndim == 2:  # return_stats: the losses are column 0, the metrics carry no gradient
            ct = ct[:, 0]
        m = backward.upstream(ops, ct, formed, keep, per_row=False)
        # uniform: the formed gradients times r (a scaled loss, the expected upstream); otherwise
        # zeros and every chunk again with the upstream gradient (reduction="none" with a cotangent)
        scaled = lambda a: None if a is None else jnp.where(m.again, jnp.zeros((), a.dtype), a * m.factor.astype(a.dtype))  # noqa: E731
        again = loop(h2, w, b, True, trips=jnp.where(m.again, max(1, -(-h2.shape[0] // lay.chunk)), 0).astype(jnp.int32),
                     init=(scaled(dh), scaled(dw), scaled(db)))
        _, gh, gw, gb = run_chunks(ops, rp, again, y, t, keep, cw, jnp.dtype(acc), ct, True)
        gh = gh[:h2.shape[0]].astype(h2.dtype)
        gw = gw.astype(w.dtype)
        gb = None if gb is None else gb.astype(b.dtype)
        zero = lambda a: None if a is None or not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a)  # noqa: E731
        return gh, gw, gb, None if y is None else zero(y), zero(t), None if keep is None else zero(keep), zero(cw), \
            jnp.zeros_like(formed)

    f.defvjp(fwd, bwd)
    return f


class JaxLinear:
    def chunk_loop(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool,
                   width: int = 0) -> JaxChunks:
        return JaxChunks(lay, acc, h2, w, b, grads, width=width)

    def linear_token_loss(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any,
                          acc: Any, scale_fn: Any, want_grad: bool) -> Any:
        formed = jax.lax.stop_gradient(scale_fn())
        lay = LinearLayout(lay.h_axis, lay.weight_layout, even_chunk(h2.shape[0], lay.chunk))
        return _custom_vjp(self, rp, jnp.dtype(acc).name, lay)(h2, w, b, y, t, keep, cw, formed)

    def linear_value_and_grad(self, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
        present = tuple(a is not None for a in arrays)
        key = (fn, "linear_vjp", st, b is not None, present)
        f = self._jitted.get(key)
        if f is None:
            def vg(h: Any, w: Any, b: Any, *given: Any) -> Any:
                it = iter(given)
                rest = [next(it) if p else None for p in present]
                out, vjp = jax.vjp(lambda hh, ww, bb: fn(self, st, hh, ww, bb, *rest), h, w, b)
                return out, vjp(jnp.ones_like(out))
            f = self._jitted[key] = jax.jit(vg)
        out, grads = f(h, w, b, *[a for a in arrays if a is not None])
        return out, tuple(grads)
