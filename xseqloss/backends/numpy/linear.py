"""NumPy's part of the fused output layer (``linear_cross_entropy``): the chunk loop's native
pieces for ``core.linear.run_chunks``. One chunk's logits at a time in the accumulation dtype, the
plain gradient formed in the chunk's own buffer, d weight accumulated in the accumulation dtype a
block of classes at a time (NumPy has no in-place GEMM, so a whole chunk's term would be a C x H
temporary). No autodiff: the gradients come from the same loop run with the cotangent."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core import linear_stats
from ...core.linear import ChunkLoop, loss_width, run_chunks


class NumpyChunks(ChunkLoop):
    def __init__(self, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool, width: int = 0) -> None:
        self.h2, self.w, self.b, self.acc, self.grads, self.width = h2, w, b, acc, grads, width
        self.R, self.H = h2.shape
        self.chunk, self.ch = lay.chunk, lay.weight_layout == "CH"
        self.wa = w if w.dtype == acc else w.astype(acc)
        self.ba = None if b is None else b.astype(acc)
        self.C = self.wa.shape[0] if self.ch else self.wa.shape[1]
        self.block = max(1, (1 << 21) // max(self.H, 1))  # classes per d-weight update: a small temporary

    def start(self) -> dict:
        st = {"l": np.empty((self.R, self.width) if self.width else self.R, self.acc)}
        if self.grads:
            st["dh"] = np.empty(self.h2.shape, self.h2.dtype)
            st["dw"] = np.zeros(self.wa.shape, self.acc)
            st["db"] = None if self.b is None else np.zeros(self.C, self.acc)
        return st

    def run(self, step: Any, state: Any) -> Any:
        for i in range(-(-self.R // self.chunk)):
            state = step(i, state)
        return state

    def _span(self, i: int) -> slice:
        return slice(i * self.chunk, min(self.R, (i + 1) * self.chunk))

    def rows(self, a: Any, i: int) -> Any:
        return None if a is None else a[self._span(i)]

    def hidden(self, state: Any, i: int) -> Any:
        hc = self.h2[self._span(i)]
        return hc if hc.dtype == self.acc else hc.astype(self.acc)

    def logits(self, hc: Any, state: Any) -> Any:
        z = hc @ (self.wa.T if self.ch else self.wa)
        if self.ba is not None:
            z += self.ba
        return z

    def put_loss(self, state: Any, i: int, l: Any) -> Any:
        state["l"][self._span(i)] = l
        return state

    def put_dh(self, state: Any, i: int, g: Any) -> Any:
        state["dh"][self._span(i)] = g @ (self.wa if self.ch else self.wa.T)
        return state

    def add_dw(self, state: Any, i: int, g: Any, hc: Any) -> Any:
        dw = state["dw"]
        for c0 in range(0, self.C, self.block):
            c1 = min(self.C, c0 + self.block)
            if self.ch:
                dw[c0:c1] += g[:, c0:c1].T @ hc
            else:
                dw[:, c0:c1] += hc.T @ g[:, c0:c1]
        return state

    def add_db(self, state: Any, g: Any) -> Any:
        if state["db"] is not None:
            state["db"] += g.sum(0)
        return state

    def finish(self, state: Any) -> tuple[Any, Any, Any, Any]:
        if not self.grads:
            return state["l"], None, None, None
        db = state["db"]
        return (state["l"], state["dh"], state["dw"].astype(self.w.dtype, copy=False),
                None if db is None else db.astype(self.b.dtype, copy=False))


class NumpyLinear:
    def chunk_loop(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool,
                   width: int = 0) -> NumpyChunks:
        return NumpyChunks(lay, acc, h2, w, b, grads, width)

    def linear_token_loss(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any,
                          acc: Any, scale_fn: Any, want_grad: bool) -> Any:
        loop = self.chunk_loop(rp, lay, acc, h2, w, b, want_grad, width=loss_width(rp))
        l, dh, dw, db = run_chunks(self, rp, loop, y, t, keep, cw, acc, scale_fn() if want_grad else None,
                                   want_grad)
        return (l, (dh, dw, db)) if want_grad else l

    def linear_value_and_grad(self, fn: Any, st: Any, *arrays: Any) -> Any:
        with np.errstate(all="ignore"):
            value, grads = fn(self, st, *arrays, want_grad=True)
        return np.asarray(value), grads

    def linear_token_stats(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any,
                           acc: Any) -> Any:
        loop = self.chunk_loop(rp, lay, acc, h2, w, b, False, width=linear_stats.width(rp))
        return linear_stats.forward(self, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), acc)

    def linear_stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        with np.errstate(all="ignore"):
            return vjp(self, st, *arrays, cts)
