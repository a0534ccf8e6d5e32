"""TensorFlow's part of linear_token_stats (core/linear_stats.py): the fused layer's chunk loop for
token_stats under a custom gradient: the forward packs the per-token outputs, the backward runs
the loop again under the cotangents (d hidden, d weight, d bias). Each chunk's kernel is one XLA
program on large chunks (``compile_chunk_kernel``, decision 113)."""

from __future__ import annotations

import functools
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?

from ...core import linear_stats
from .linear import TfChunks, first_order_only, unrecorded
from .xla import in_xla


@functools.lru_cache(maxsize=64)
def _compiled(ops: Any, make: Any, rp: Any, acc: Any) -> Any:
    """One XLA program per chunk kernel and plan (XLA compiles it once per chunk shape)."""
    return tf.function(make(ops, rp, acc), jit_compile=True, autograph=False)


class TensorflowLinearStats:
    def compile_chunk_kernel(self, make: Any, rp: Any, acc: Any) -> Any:
        """The chunk kernel by XLA from ``Engine.xla_min_elements`` logits on (as the loss's XLA
        kernel, decision 22: XLA compiles once per chunk shape, which costs more than it saves on
        small chunks); kernel "xla" at every size, "native" never; under the caller's XLA the loop's
        body as it is."""
        plain = make(self, rp, acc)
        mode = rp.engine.kernel
        if in_xla() or mode == "native":
            return plain
        least = 0 if mode == "xla" else rp.engine.xla_min_elements

        def kernel(z: Any, tc: dict) -> Any:
            n = z.shape.num_elements()  # static inside the chunk loop (whole chunks of a static size)
            if n is None or n < least:
                return plain(z, tc)
            return _compiled(self, make, rp, acc)(z, tc)
        return kernel

    def linear_token_stats(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any,
                           acc: Any) -> Any:
        ops = self
        t = None if temp is None or isinstance(temp, float) else tf.stop_gradient(temp)
        tokens = linear_stats.token_arrays(y, ids, keep, t if t is not None else temp)

        def forward(hh: Any, ww: Any, bb: Any) -> Any:
            loop = TfChunks(rp, lay, acc, hh, ww, bb, False, width=linear_stats.width(rp))
            return linear_stats.forward(ops, rp, loop, tokens, acc)

        if not (self._grad_possible or _record.could_possibly_record()):  # nothing records: outputs only
            return forward(h2, w, b)

        def fwd(*params: Any) -> Any:
            hh, ww = params[0], params[1]
            bb = params[2] if len(params) > 2 else None
            (packed,) = unrecorded(lambda: (forward(hh, ww, bb),))

            def grads(dp: Any) -> Any:
                dp = tf.reshape(dp, [-1, linear_stats.width(rp)])  # its rank may be unknown in the tape's graph
                loop = TfChunks(rp, lay, acc, hh, ww, bb, True)
                dh, dw, db = unrecorded(linear_stats.backward, ops, rp, loop, tokens, packed, dp, acc)
                return [dh, dw] + ([db] if bb is not None else [])

            def grad(dp: Any) -> Any:
                return first_order_only(lambda: grads(dp), [dp, *params])
            return packed, grad

        params = (h2, w) if b is None else (h2, w, b)
        return tf.custom_gradient(fwd)(*params)

    def linear_stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        h, w, b, *rest = arrays
        watched = [a for a in (h, w, b) if a is not None]
        with tf.GradientTape() as tape:
            for a in watched:
                tape.watch(a)
            out = fwd(self, st, h, w, b, *rest)
            total = tf.add_n([tf.reduce_sum(out[n] * tf.cast(c, out[n].dtype)) for n, c in cts.items()])
        g = iter(tape.gradient(total, watched))
        return tuple(None if a is None else next(g) for a in (h, w, b))
