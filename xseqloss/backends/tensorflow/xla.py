"""TensorFlow's XLA-compiled kernels: the plain kernel (``plain_ce``, also written into the logits'
own buffer outside XLA) and the fused forward+backward of the logits path (``fused_token_loss``).

TensorFlow's own SparseSoftmaxCrossEntropyWithLogits kernel takes ~8x one exp pass on CPU, and its
gradient then costs a further pass. On large logits an XLA-compiled kernel forms, in one fused
pass, the per-token loss and (softmax - onehot) already multiplied by the upstream gradient that
backward will receive (``TokenRules.expected_dl``); the backward applies the upstream rule
(core/backward.py). XLA compiles once per shape, so small logits, where compiling would cost more
than it saves, keep the native kernel (decisions.md item 22): the XLA kernel from
``Engine.xla_min_elements`` on (4M: 16 MB of float32 logits, where the native kernel takes ~10 ms);
kernel "xla" at every size, "native" never.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context  # anonymous_name: a resource of one run
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?
from tensorflow.python.ops import control_flow_util  # GraphOrParentsInXlaContext: under jit_compile?
from tensorflow.python.ops import gen_resource_variable_ops as resource_variable_ops  # the in-place chunk

from ...core import backward
from .ops import _acc, _rows, _tnp_take_along


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

def plain_ce(z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None, out: Any = None) -> Any:
    """``Backend.plain_ce`` (plan/ops.py) through the XLA kernel; ``out is z`` outside the caller's
    XLA context, on (rows, C) of a static shape: the gradient in the logits' own buffer."""
    has_keep = keep is not None
    kp = keep if has_keep else tf.zeros([], tf.bool)
    if scale is None:
        return _xla_kernel(len(z.shape), k, False, has_keep)(z, y, kp, tf.zeros([], acc)), None
    if out is z and k == 1 and len(z.shape) == 2 and z.shape.is_fully_defined() and not in_xla():
        return _in_place(z, y, keep, scale)
    return _xla_kernel(len(z.shape), k, True, has_keep)(z, y, kp, scale)


@functools.lru_cache(maxsize=None)
def _target_entries(shape: tuple, dtype: Any) -> Any:
    """(handle, y) -> the (rows,) entries z[r, y[r]] of the (rows, C) logits a resource variable
    holds. XLA reads the variable inside its own op, so no tensor outside keeps the buffer
    referenced when the in-place kernel runs (an executor's input slot may still hold it
    briefly after the op that used it has finished, and a shared buffer is copied, not updated)."""
    def take(handle: Any, y: Any) -> Any:
        return tf.gather(resource_variable_ops.read_variable_op(handle, dtype), y, axis=1, batch_dims=1)
    return tf.function(take, jit_compile=True, autograph=False)


def _in_place(z: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    """The plain kernel with the gradient written into the logits' own buffer (outside XLA): the
    logits go into an anonymous resource variable, whose update XLA may alias to its input
    (decision 58). ``z`` must have no other consumer (its buffer is then adopted, not copied)."""
    has_keep = keep is not None
    shape = tuple(z.shape.as_list())
    handle = resource_variable_ops.var_handle_op(dtype=z.dtype, shape=z.shape, shared_name=context.anonymous_name())
    put = resource_variable_ops.assign_variable_op(handle, z)  # z's only consumer: its buffer, no copy
    with tf.control_dependencies([put]):
        zy = _target_entries(shape, z.dtype)(handle, y)
        l = _xla_kernel(2, 1, True, has_keep, True)(shape)(handle, zy, y, keep if has_keep else tf.zeros([], tf.bool),
                                                          scale)
    with tf.control_dependencies([l]):
        g = resource_variable_ops.read_variable_op(handle, z.dtype)
    return l, g


def in_xla() -> bool:
    """Is the code being traced for XLA (inside the caller's ``jit_compile`` function)?"""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def rescaled(ops: Any, z: Any, y: Any, kp: Any, keep: Any, g: Any, dl: Any, formed: Any, k: int, has_keep: bool,
             least: int) -> Any:
    """The gradient for an upstream other than the formed one (a scaled loss, a cotangent, NaN
    marks): the upstream rule per row (core/backward.py), g rescaled or formed again."""
    m = backward.upstream(ops, dl, formed, keep, per_row=True)
    return tf.cond(m.again, lambda: _kernel(z, y, kp, dl, k, has_keep, True, least)[1],
                   lambda: g * tf.cast(_along(m.factor, k), g.dtype))


class TensorflowXla:
    def plain_ce(self, z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None, out: Any = None) -> Any:
        return plain_ce(z, y, keep, k, acc, scale, out if self._in_place else None)

    def fused_token_loss(self, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                         expected_dl: Any = None, collect: dict | None = None) -> Any:
        """Plain cross-entropy per token through the XLA kernel, or None (the generic path runs;
        a loss's return_stats makes a call not plain)."""
        kernel = st.engine.kernel
        if not st.plain or expected_dl is None or z.shape.rank is None or kernel == "native":
            return None
        least = 0 if kernel == "xla" else st.engine.xla_min_elements
        n = z.shape.num_elements()  # None when a dimension is unknown at trace time
        if n is not None and n < least:
            return None
        k, has_keep = st.opts.k, keep is not None
        kp = keep if has_keep else tf.zeros([], tf.bool)
        if not (self._grad_possible or _record.could_possibly_record()):  # no tape records this call
            return _kernel(z, y, kp, tf.zeros([], acc), k, has_keep, False, least)
        formed = tf.stop_gradient(expected_dl())
        ops = self

        @tf.custom_gradient
        def fused(z: Any) -> Any:
            loss, g = _kernel(z, y, kp, formed, k, has_keep, True, least)

            def grad(dl: Any) -> Any:
                # dl is the formed upstream exactly for loss.backward() of a reduced loss: the gradient is ready
                return tf.cond(backward.is_formed(ops, dl, formed, keep), lambda: g,
                               lambda: rescaled(ops, z, y, kp, keep, g, dl, formed, k, has_keep, least))

            return loss, grad

        return fused(z)
