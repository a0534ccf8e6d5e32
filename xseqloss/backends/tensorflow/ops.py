"""TensorFlow's ops: conversion, running the core as one traced call per plan and signature (each
eager op costs 10-100 us of dispatch), the array ops (XLA-safe throughout, so
``tf.function(jit_compile=True)`` works), and the autodiff-able per-token loss through the fused
SparseSoftmaxCrossEntropyWithLogits kernel (classes last) with a custom gradient that keeps rows
that do not count at exactly 0 (``multiply_no_nan``)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?

from ..._errors import XSeqLossTypeError

_tnp_take_along = tf.experimental.numpy.take_along_axis


def _acc(z: Any) -> Any:
    return tf.float64 if z.dtype == tf.float64 else tf.float32


def _rows(x: Any, k: int) -> tuple[Any, Any]:
    """x with its class axis moved last, and that as (tokens, C) rows: the layout of TensorFlow's
    fused SparseSoftmaxCrossEntropyWithLogits kernel."""
    rank = len(x.shape)
    if k != rank - 1:
        x = tf.transpose(x, [a for a in range(rank) if a != k] + [k])
    return x, tf.reshape(x, [-1, tf.shape(x)[-1]])


def _like_dtype(v: Any, other: Any) -> Any:
    if isinstance(v, (bool, int, float)) and isinstance(other, (tf.Tensor, tf.Variable)):
        return tf.constant(v, dtype=other.dtype)
    return v


class TensorflowOps:
    name = "tensorflow"
    type_name = "a tf.Tensor"

    def __init__(self) -> None:
        self._functions: dict[Any, Any] = {}
        self._concrete: dict[Any, Any] = {}
        self._grad_possible = True  # false only while tracing an eager call that no tape records
        self._in_place = True  # false while the fused layer's loop runs inside a gradient (linear.py)

    # ---- conversion and inspection
    def convert(self, x: Any, argument: str, like: Any = None) -> Any:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover
            raise XSeqLossTypeError(f"{argument} could not be converted to an array: {exc}") from exc
        if arr.dtype.name == "bfloat16":
            return tf.cast(tf.convert_to_tensor(arr.astype(np.float32)), tf.bfloat16)
        return tf.convert_to_tensor(arr)

    def to_device(self, x: Any, like: Any) -> Any:
        return tf.convert_to_tensor(x) if isinstance(x, tf.Variable) else x

    def kind(self, x: Any) -> str:
        d = x.dtype
        if d.is_floating:
            return "f"
        if d == tf.bool:
            return "b"
        if d.is_integer:
            return "u" if d.is_unsigned else "i"
        return "o"

    def dtype_name(self, x: Any) -> str:
        return x.dtype.name

    def shape(self, x: Any) -> tuple[Any, ...]:
        return tuple(x.shape.as_list()) if x.shape.rank is not None else ()

    def tracing(self, x: Any) -> bool:
        return not tf.executing_eagerly()

    def index_dtype(self, y: Any) -> Any:
        """int64 labels (an integer cast, never a float one); uint64 values past int64's range
        saturate at its maximum instead of wrapping (see numpy.py)."""
        if y.dtype == tf.uint64:
            v = tf.bitcast(y, tf.int64)  # a negative means >= 2**63
            return tf.where(v < 0, tf.constant(np.iinfo(np.int64).max, tf.int64), v)
        return y if y.dtype == tf.int64 else tf.cast(y, tf.int64)

    def to_numpy(self, x: Any) -> np.ndarray:
        if x.dtype == tf.bfloat16:
            x = tf.cast(x, tf.float32)
        return np.asarray(x.numpy())

    def any_true(self, x: Any) -> bool:
        return bool(tf.reduce_any(x))

    def isfinite_any_dtype(self, x: Any) -> Any:
        return tf.math.is_finite(x) if x.dtype.is_floating else tf.ones_like(x, dtype=tf.bool)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == tf.bool else tf.not_equal(m, tf.zeros([], m.dtype))


    def run(self, fn: Any, st: Any, *arrays: Any) -> Any:
        if not tf.executing_eagerly():
            return fn(self, st, *arrays)  # already inside the caller's graph
        # eager: one traced call instead of ~30 eager ops (each costs 10-100 us of dispatch). Only
        # the arrays given are passed: tf.function's per-argument dispatch is most of a tiny call.
        # A call that no tape records needs no gradient: its trace leaves the gradient out.
        present = tuple(a is not None for a in arrays)
        given = [a for a in arrays if a is not None]
        grad_possible = _record.could_possibly_record()
        # the concrete function per exact signature: calling it skips tf.function's own signature
        # matching, which costs more than the tiny call itself
        sig = (fn, st, present, grad_possible, *[(a.dtype, a.shape) for a in given])
        cf = self._concrete.get(sig)
        if cf is None:
            key = (fn, st, present, grad_possible)
            f = self._functions.get(key)
            if f is None:
                def traced(*given: Any) -> Any:
                    it = iter(given)
                    self._grad_possible = grad_possible
                    try:
                        return fn(self, st, *[next(it) if p else None for p in present])
                    finally:
                        self._grad_possible = True

                f = tf.function(traced, reduce_retracing=True, autograph=False)
                self._functions[key] = f
            cf = f.get_concrete_function(*given)
            if len(self._concrete) >= 4096:
                self._concrete.clear()
            self._concrete[sig] = cf
        return cf(*given)

    def value_and_grad(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        return self.run(_with_gradient(fn), st, z, *arrays)  # eager: one traced call

    # ---- ops
    def stack(self, xs: Any) -> Any:
        return tf.stack(xs)

    def acc_dtype(self, z: Any) -> Any:
        return _acc(z)

    def wide_dtype(self) -> Any:
        return tf.float64

    def cast(self, x: Any, dtype: Any) -> Any:
        return tf.cast(x, dtype)

    def where(self, c: Any, a: Any, b: Any) -> Any:
        a, b = _like_dtype(a, b), _like_dtype(b, a)
        return tf.where(c, a, b)

    def expand(self, x: Any, axis: int) -> Any:
        return tf.expand_dims(x, axis)

    exp = staticmethod(tf.exp)
    log = staticmethod(tf.math.log)
    tanh = staticmethod(tf.tanh)
    abs = staticmethod(tf.abs)
    isfinite = staticmethod(tf.math.is_finite)
    zeros_like = staticmethod(tf.zeros_like)
    stop_gradient = staticmethod(tf.stop_gradient)

    def maximum(self, x: Any, v: float) -> Any:
        return tf.maximum(x, tf.constant(v, x.dtype))

    def sum(self, x: Any, axis: Any) -> Any:
        return tf.reduce_sum(x, axis=None if axis is None else list(axis) if isinstance(axis, tuple) else axis)

    def max(self, x: Any, axis: Any) -> Any:
        return tf.reduce_max(x, axis=axis)

    def min(self, x: Any, axis: int) -> Any:
        return tf.reduce_min(x, axis=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return tf.reduce_any(x, axis=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return tf.reduce_all(x, axis=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return self.sum(tf.cast(flags, tf.int64), axis)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse - z[y] by the fused kernel on (tokens, C); its gradient is multiplied without NaN
        propagation, so garbage rows that do not count get exactly 0."""
        _, x2 = _rows(tf.cast(z, acc), k)
        tok_shape = tf.shape(y)
        y1 = tf.reshape(y, [-1])
        keep1 = None if keep is None else tf.reshape(keep, [-1])

        @tf.custom_gradient
        def fused(x2: Any) -> Any:
            loss, backprop = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=x2, labels=y1)
            if keep1 is not None:
                loss = tf.where(keep1, loss, tf.zeros_like(loss))

            def grad(dl: Any) -> Any:
                if keep1 is not None:
                    dl = tf.where(keep1, dl, tf.zeros_like(dl))
                return tf.math.multiply_no_nan(backprop, dl[:, None])

            return loss, grad

        return tf.reshape(fused(x2), tok_shape)

    def take(self, vec: Any, idx: Any) -> Any:
        return tf.gather(vec, idx)

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        return tf.squeeze(_tnp_take_along(x, tf.expand_dims(y, k), axis=k), k)

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        """g + vals at class y along k (the fused layer's analytic gradient; autodiff elsewhere)."""
        shape = [1] * len(g.shape)
        shape[k] = -1
        classes = tf.reshape(tf.range(tf.shape(g)[k], dtype=y.dtype), shape)
        hit = tf.equal(classes, tf.expand_dims(y, k))
        return g + tf.where(hit, tf.cast(tf.expand_dims(vals, k), g.dtype), tf.zeros([], g.dtype))

    def reshape_class(self, w: Any, k: int, ndim: int) -> Any:
        shape = [1] * ndim
        shape[k] = -1
        return tf.reshape(w, shape)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return tf.fill(tf.shape(like), tf.constant(value, dtype))

    def true_like(self, like: Any) -> Any:
        return tf.ones(tf.shape(like), tf.bool)

    def drop_class(self, z: Any, k: int) -> Any:
        return tf.gather(z, 0, axis=k)

    def dim(self, x: Any, axis: int) -> Any:
        d = x.shape[axis]
        return d if d is not None else tf.cast(tf.shape(x)[axis], tf.int64)

    def ndim(self, x: Any) -> int:
        return len(x.shape)

    def size(self, x: Any) -> Any:
        return tf.size(x, out_type=tf.int64)

    def arange(self, n: Any, like: Any) -> Any:
        """0..n-1 in like's integer dtype (int64 for a floating like)."""
        dt = tf.int64 if like is None or not like.dtype.is_integer else like.dtype
        return tf.range(tf.cast(n, dt), dtype=dt)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return tf.experimental.numpy.moveaxis(x, src, dst)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def as_index(self, x: Any) -> Any:
        return tf.cast(x, tf.int64)

    def argmax(self, x: Any, k: int) -> Any:
        """The lowest index of the maximum (tf.argmax does not promise which on ties)."""
        m = tf.reduce_max(x, axis=k, keepdims=True)
        shape = [1] * len(x.shape)
        shape[k] = -1
        idx = tf.reshape(tf.range(tf.shape(x, out_type=tf.int64)[k]), shape)
        big = tf.cast(tf.shape(x)[k], tf.int64)
        return tf.reduce_min(tf.where(tf.equal(x, m), idx, big), axis=k)

    def pick_step(self, h: Any, idx: Any) -> Any:
        return tf.gather(h, idx, batch_dims=1)

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def concat(self, xs: Any, axis: int) -> Any:
        return tf.concat(xs, axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return tf.fill(tf.shape(x), tf.cast(value, x.dtype))

    def cumsum(self, x: Any, axis: int) -> Any:
        return tf.cumsum(x, axis=axis)

    def segment_sum(self, v: Any, j: Any) -> Any:
        shape = tf.shape(v, out_type=j.dtype)
        ids = tf.expand_dims(tf.range(shape[0], dtype=j.dtype), 1) * shape[1] + j
        out = tf.math.unsorted_segment_sum(tf.reshape(v, [-1]), tf.reshape(ids, [-1]), shape[0] * shape[1])
        return tf.reshape(out, tf.shape(v))

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        return tf.gather(x, idx, axis=axis, batch_dims=axis)

    def flat(self, x: Any) -> Any:
        return tf.reshape(x, [-1])

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        if v.dtype == tf.bool:  # scatter_nd takes numbers
            return tf.cast(self.scatter(tf.cast(v, tf.int8), idx, size), tf.bool)
        return tf.scatter_nd(tf.expand_dims(idx, 1), v, tf.reshape(tf.cast(size, idx.dtype), [1]))

    def reshape_like(self, x: Any, like: Any) -> Any:
        return tf.reshape(x, tf.shape(like))

    def reshape_rows(self, x: Any) -> Any:
        return tf.reshape(x, [-1, tf.shape(x)[-1]])

    def size_of(self, x: Any) -> Any:
        return tf.size(x, out_type=tf.int64)

    def pad_stack(self, items: Any, T: Any, fill: Any) -> Any:
        rank = len(items[0].shape) if items else 1
        return tf.stack([tf.pad(v, [[0, T - tf.shape(v)[0]]] + [[0, 0]] * (rank - 1),
                                constant_values=tf.cast(fill, v.dtype)) for v in items])

    def permute(self, x: Any, perm: Any) -> Any:
        return tf.transpose(x, perm)

    def zeros_shape(self, shape: Any, like: Any) -> Any:
        return tf.zeros(shape)

    @staticmethod
    def version() -> str:
        return tf.__version__

    @staticmethod
    def devices() -> list[str]:
        return [d.name.replace("/physical_device:", "").lower() for d in tf.config.list_physical_devices()
                if d.device_type in ("CPU", "GPU")]


@functools.lru_cache(maxsize=None)
def _with_gradient(fn: Any) -> Any:
    """fn's value and the gradient of its sum with respect to the logits."""
    def value_and_grad(ops: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = fn(ops, st, z, *arrays)
            total = tf.reduce_sum(out)
        return out, tape.gradient(total, z)

    return value_and_grad
