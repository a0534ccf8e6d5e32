"""TensorFlow's part of token_stats (API.md 11): the core's per-token outputs (core/stats.py) under
a custom gradient whose backward is the core's analytic gradient (exact for the entropy where
p -> 1 and at -inf logits); the integer outputs (argmax, correct) ride beside it."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ...core.stats import DIFFERENTIABLE, stats_rows, stats_vjp


class TensorflowStats:
    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        floats = [n for n in st.stats.outputs if n in DIFFERENTIABLE]
        if not floats:
            return stats_rows(self, st, z, y, ids, keep, temp, acc)[0]
        beside = {}  # no annotation: autograph rewrites it as a nonlocal
        ops = self

        @tf.custom_gradient
        def f(z: Any) -> Any:
            out, saved = stats_rows(ops, st, z, y, ids, keep, temp, acc)
            beside.update({n: v for n, v in out.items() if n not in DIFFERENTIABLE})

            def grad(*dys: Any) -> Any:
                cts = {n: d for n, d in zip(floats, dys) if d is not None}
                return tf.cast(stats_vjp(ops, st, z, y, ids, keep, temp, acc, saved, cts), z.dtype)
            return tuple(out[n] for n in floats), grad

        vals = f(z)
        out = dict(zip(floats, vals), **beside)
        return {n: out[n] for n in st.stats.outputs}

    def stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        z = arrays[0]
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = fwd(self, st, z, *arrays[1:])
            total = tf.add_n([tf.reduce_sum(out[n] * tf.cast(c, out[n].dtype)) for n, c in cts.items()])
        g = tape.gradient(total, z)
        return tf.zeros_like(z) if g is None else g
