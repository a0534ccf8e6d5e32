"""TensorFlow backend: plain cross-entropy on large logits through an XLA-compiled kernel that forms
the gradient in the forward pass (``fused_token_loss``), smaller ones through the fused
SparseSoftmaxCrossEntropyWithLogits kernel (classes last) with a custom gradient that keeps rows
that do not count at exactly 0 (``multiply_no_nan``); XLA-safe ops throughout
(tf.function(jit_compile=True) works)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?
from tensorflow.python.ops import gen_resource_variable_ops as resource_variable_ops  # the in-place chunk

from .._errors import XSeqLossTypeError
from . import _common

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


class TensorflowBackend:
    name = "tensorflow"
    type_name = "a tf.Tensor"

    def __init__(self) -> None:
        self._functions: dict[Any, Any] = {}
        self._concrete: dict[Any, Any] = {}
        self._grad_possible = True  # false only while tracing an eager call that no tape records

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

    def max(self, x: Any, axis: int) -> Any:
        return tf.reduce_max(x, axis=axis)

    def min(self, x: Any, axis: int) -> Any:
        return tf.reduce_min(x, axis=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return tf.reduce_any(x, axis=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return tf.reduce_all(x, axis=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return self.sum(tf.cast(flags, tf.int64), axis)

    def logsumexp(self, x: Any, k: int) -> Any:
        return _common.logsumexp(self, x, k)

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

    def classdot(self, x: Any, w: Any, k: int) -> Any:
        return tf.tensordot(x, w, axes=[[k], [0]])

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

    def pick_step(self, h: Any, idx: Any) -> Any:
        return tf.gather(h, idx, batch_dims=1)

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def shift(self, x: Any, k: int, axis: int, fill: Any) -> Any:
        return _common.shift(self, x, k, axis, fill)

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

    def moveaxis_to(self, x: Any, src: str, dst: str) -> Any:
        return _common.moveaxis_to(self, x, src, dst)

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


# ------------------------------------------------------------------- fused forward+backward (XLA)
#
# TensorFlow's own SparseSoftmaxCrossEntropyWithLogits kernel takes ~8x one exp pass on CPU, and its
# gradient then costs a further pass. On large logits an XLA-compiled kernel forms, in one fused
# pass, the per-token loss and (softmax - onehot) already multiplied by the upstream gradient that
# backward will receive (``_core._numeric``'s expected_dl); when that is what arrives, backward
# returns it as it is. XLA compiles once per shape, so small logits, where compiling would cost
# more than it saves, keep the native kernel (decisions.md item 22).

# the XLA kernel from _engine.Engine.xla_min_elements on (4M: 16 MB of float32 logits, where the
# native kernel takes ~10 ms); kernel "xla" at every size, "native" never


def _along(v: Any, k: int) -> Any:
    return tf.expand_dims(v, k)


@functools.lru_cache(maxsize=None)
def _xla_kernel(ndim: int, k: int, grad: bool, has_keep: bool, in_place: bool = False) -> Any:
    """(z, y, keep, scale) -> the per-token loss (accumulator dtype, 0 where keep is false), and with
    ``grad`` (softmax - onehot) * scale in z's dtype, exactly 0 on rows whose scale is 0 or that do
    not count whatever their logits hold. Classes along axis k of ``ndim``; compiled by XLA per
    shape (one function per rank: reduce_retracing would otherwise relax the rank itself).

    ``in_place`` (with ``grad``): (handle, z_y, y, keep, scale) -> the loss, where ``handle`` is a
    resource variable holding the logits and ``z_y`` their target entries; the gradient is
    assigned to the variable, and XLA writes it into the logits' own buffer (a resource update may
    alias its input; the target entries are taken before, since a gather in the kernel would keep
    the logits alive beside the gradient)."""

    def kernel(z: Any, y: Any, keep: Any, scale: Any, zy: Any = None) -> Any:
        x = tf.cast(z, _acc(z))
        m = tf.reduce_max(x, axis=k)
        m = tf.where(m == -np.inf, tf.zeros_like(m), m)  # as _common.logsumexp
        e = tf.exp(x - _along(m, k))
        s = tf.reduce_sum(e, axis=k)
        if zy is None:
            zy = tf.squeeze(_tnp_take_along(x, _along(y, k), axis=k), k)
        l = tf.math.log(s) - (tf.cast(zy, x.dtype) - m)  # shifted frame
        if has_keep:
            l = tf.where(keep, l, tf.zeros_like(l))
        if not grad:
            return l
        if has_keep:
            scale = tf.where(keep, scale, tf.zeros_like(scale))
        shape = [1] * ndim
        shape[k] = -1
        classes = tf.reshape(tf.range(tf.shape(z)[k], dtype=y.dtype), shape)
        onehot = tf.cast(tf.equal(classes, _along(y, k)), x.dtype)  # fused into the loop, never stored
        g = (e * _along(1.0 / s, k) - onehot) * _along(scale, k)
        g = tf.where(_along(scale != 0, k), g, tf.zeros([], x.dtype))
        return l, tf.cast(g, z.dtype)

    if not in_place:
        return tf.function(kernel, jit_compile=True, reduce_retracing=True, autograph=False)

    def in_place_kernel(handle: Any, zy: Any, y: Any, keep: Any, scale: Any) -> Any:
        z = resource_variable_ops.read_variable_op(handle, zy.dtype)
        l, g = kernel(z, y, keep, scale, zy)
        resource_variable_ops.assign_variable_op(handle, g)
        return l

    # a resource's shape is not part of a tf.function's signature: one function per chunk shape
    return functools.lru_cache(maxsize=None)(
        lambda shape: tf.function(in_place_kernel, jit_compile=True, autograph=False))


def _fused_token_loss(self: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                      expected_dl: Any = None) -> Any:
    """Plain cross-entropy per token through the XLA kernel, or None (the generic path runs)."""
    kernel = st.engine.kernel
    if not st.plain or expected_dl is None or z.shape.rank is None or kernel == "native":
        return None
    least = 0 if kernel == "xla" else st.engine.xla_min_elements
    n = z.shape.num_elements()  # None when a dimension is unknown at trace time
    if n is not None and n < least:
        return None
    k, has_keep = st.opts.k, keep is not None
    keep = keep if has_keep else tf.zeros([], tf.bool)
    if not (self._grad_possible or _record.could_possibly_record()):  # no tape records this call
        return _kernel(z, y, keep, tf.zeros([], acc), k, has_keep, False, least)
    hint = tf.stop_gradient(expected_dl())

    @tf.custom_gradient
    def fused(z: Any) -> Any:
        loss, g = _kernel(z, y, keep, hint, k, has_keep, True, least)

        def grad(dl: Any) -> Any:
            # dl is hint exactly for loss.backward() of a reduced loss: the gradient is ready
            return tf.cond(tf.reduce_all(tf.equal(dl, hint)), lambda: g,
                           lambda: _rescaled(z, y, keep, g, dl, hint, k, has_keep, least))

        return loss, grad

    return fused(z)


def _kernel(z: Any, y: Any, keep: Any, scale: Any, k: int, has_keep: bool, grad: bool, least: int) -> Any:
    """The XLA kernel; when the size is unknown at trace time, decided at run time (XLA compiles only
    the branch taken) against the native kernel with the same outputs."""
    def xla() -> Any:
        return _xla_kernel(len(z.shape), k, grad, has_keep)(z, y, keep, scale)

    if z.shape.num_elements() is not None:
        return xla()
    return tf.cond(tf.size(z) >= least, xla,
                   lambda: _native_kernel(z, y, keep, scale, k, has_keep, grad))


def _native_kernel(z: Any, y: Any, keep: Any, scale: Any, k: int, has_keep: bool, grad: bool) -> Any:
    """_xla_kernel's outputs by SparseSoftmaxCrossEntropyWithLogits on (tokens, C)."""
    x, x2 = _rows(tf.cast(z, _acc(z)), k)
    loss, backprop = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=x2, labels=tf.reshape(y, [-1]))
    loss = tf.reshape(loss, tf.shape(y))
    if has_keep:
        loss = tf.where(keep, loss, tf.zeros_like(loss))
        scale = tf.where(keep, scale, tf.zeros_like(scale))
    if not grad:
        return loss
    g = tf.math.multiply_no_nan(backprop, tf.reshape(scale, [-1, 1]))  # 0 where scale is 0, NaN or not
    g = tf.experimental.numpy.moveaxis(tf.reshape(g, tf.shape(x)), -1, k)
    return loss, tf.cast(g, z.dtype)


def _rescaled(z: Any, y: Any, keep: Any, g: Any, dl: Any, hint: Any, k: int, has_keep: bool, least: int) -> Any:
    """The gradient for another upstream gradient (a scaled loss, a cotangent, NaN marks): g times
    dl / hint, or formed again when a row the fold scaled to 0 now needs a nonzero multiple."""
    scale = hint if not has_keep else tf.where(keep, hint, tf.zeros_like(hint))
    nz = scale != 0
    again = ~nz & (dl != 0) & ~tf.math.is_nan(dl)
    again = tf.reduce_any(again & keep if has_keep else again)
    factor = tf.where(nz, dl / tf.where(nz, scale, tf.ones_like(scale)), dl * 0.0)  # NaN stays NaN
    return tf.cond(again, lambda: _kernel(z, y, keep, dl, k, has_keep, True, least)[1],
                   lambda: g * tf.cast(_along(factor, k), g.dtype))


TensorflowBackend.fused_token_loss = _fused_token_loss  # type: ignore[attr-defined]

BACKEND = TensorflowBackend()


from . import linear_tensorflow as _linear_tensorflow  # noqa: E402,F401  the fused layer's methods
