"""TensorFlow's fused output layer (``linear_cross_entropy``, xseqloss/linear.py): the chunk loop,
its custom gradient, and the plain chunk whose gradient takes the logits' own buffer (decision 58).
Split out of backends/tensorflow.py, whose ``TensorflowBackend`` gets these methods on import."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context  # anonymous_name: a resource of one run
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?
from tensorflow.python.ops import control_flow_util  # GraphOrParentsInXlaContext: under jit_compile?
from tensorflow.python.ops import gen_resource_variable_ops as resource_variable_ops  # the in-place chunk

from .._errors import XSeqLossTypeError
from . import tensorflow as _tfb
from .tensorflow import BACKEND, TensorflowBackend


def _xla_kernel(*args: Any) -> Any:
    return _tfb._xla_kernel(*args)  # looked up per call: tests replace it


# ------------------------------------------------------------------------ the fused output layer
#
# linear_cross_entropy (xseqloss/linear.py): a tf.while_loop over chunks (XLA-compilable, one
# chunk's float32 logits at a time) under a custom gradient. The forward forms the gradients with
# the expected upstream factor; the backward returns them scaled when the upstream is a uniform
# multiple of it and runs the chunks again otherwise. 16-bit inputs: the chunk and the weight are
# cast to float32 (tf.matmul has no wider result type).


def _linear_loop(kst: Any, acc: Any, chunk: int, wl: str, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                 cw: Any, scale: Any, grads: bool) -> Any:
    from .._token_loss import token_loss
    from ..linear import chunk_grad, counted_rows
    ops = BACKEND
    static_R = h2.shape[0]
    if static_R is not None and static_R > 0:
        from ..linear import even_chunk
        chunk = even_chunk(int(static_R), chunk)  # whole chunks: no padded copy of the hidden states
    R = tf.shape(h2)[0]
    n = tf.maximum((R + chunk - 1) // chunk, 1)
    P = n * chunk - R
    exact = static_R is not None and static_R > 0 and static_R % chunk == 0
    wa = tf.cast(w, acc)  # the weight itself when it is already float32 / float64 (no copy)
    ba = None if b is None else tf.cast(b, acc)
    C = tf.shape(wa)[0 if wl == "CH" else 1]

    def padded(a: Any, fill: Any) -> Any:  # whole chunks of a static size: XLA compiles the loop once
        if a is None or exact:
            return a
        pad = tf.concat([[[0, P]], tf.zeros([len(a.shape) - 1, 2], tf.int32)], 0)
        return tf.pad(a, pad, constant_values=tf.cast(fill, a.dtype))
    keep = tf.ones([R], tf.bool) if keep is None else keep
    h2p, yp, tp, kp = padded(h2, 0), padded(y, 0), padded(t, 0), padded(keep, False)
    sp = padded(scale, 0)

    def piece(a: Any, i: Any) -> Any:  # a static size: XLA needs one inside the loop
        if a is None:
            return None
        rank = len(a.shape)
        return tf.slice(a, tf.concat([[i * chunk], tf.zeros([rank - 1], tf.int32)], 0), [chunk] + [-1] * (rank - 1))

    def body(i: Any, ls: Any, dhs: Any, dw: Any, db: Any) -> Any:
        kc = piece(kp, i)
        # the chunk starts once the previous chunk's adds are done: TensorFlow's executor would
        # otherwise form its logits beside the previous chunk's gradient (outside XLA)
        with tf.control_dependencies([dw] if grads and not xla else []):
            hc = counted_rows(ops, tf.cast(piece(h2p, i), acc), kc)
        z = tf.matmul(hc, wa, transpose_b=wl == "CH")  # the weight's own layout: no transposed copy
        if ba is not None:
            z = z + ba
        if not grads:
            l = token_loss(ops, kst, z, piece(yp, i), piece(tp, i), kc, cw, acc, False, k=1, rows_clean=True)[0]
            return i + 1, ls.write(i, l), dhs, dw, db
        if in_place:
            l, g = _plain_chunk_grad_in_place(z, piece(yp, i), kc, piece(sp, i))
        else:
            l, g = chunk_grad(ops, kst, z, piece(yp, i), piece(tp, i), kc, cw, acc, piece(sp, i), rows_clean=True)
        dh = tf.cast(tf.matmul(g, wa, transpose_b=wl != "CH"), h2.dtype)
        dhs = put_dh(dhs, i, dh)
        with tf.control_dependencies([] if xla else [dhs]):  # d hidden's piece is gone before the adds
            dw = _add_dw(dw, g, hc, g.shape.num_elements()) if wl == "CH" else _add_dw(dw, hc, g, g.shape.num_elements())
        if db is not None:
            db = db + tf.reduce_sum(g, 0)
        return i + 1, ls.write(i, l), dhs, dw, db

    ls = tf.TensorArray(acc, size=n, infer_shape=False)
    xla = _in_xla()
    in_place = grads and not xla and kst.plain  # the gradient in the logits' buffer (decision 58)
    # d weight accumulates in place outside XLA (InplaceAdd into a fresh Empty buffer, which grappler
    # never folds into a shared constant): ``dw + d`` would hold two d weights at once each chunk.
    # d hidden is written in place, chunk by chunk, into the buffer that is returned (outside
    # XLA): a TensorArray's pieces and their concatenation would be two d hiddens at the end.
    # The order of the two allocations decides where TensorFlow's allocator puts the chunk's
    # logits, which it places whole, unsplit, in any free block less than twice their size
    # (decisions 57, 58): with two chunk buffers (logits and gradient), d hidden comes after d
    # weight, so it does not carve d weight's old block and leave a remainder too small to
    # split; with one (in place), d hidden comes first, so the chunk's logits find d hidden's
    # old block split off, not a remainder of one and a half chunks (0.10 L more at 8,192 tokens)
    def dh_buffer() -> Any:
        return tf.raw_ops.Empty(shape=tf.concat([[n * chunk], tf.shape(h2)[1:]], 0), dtype=h2.dtype, init=False)

    if xla or not grads:
        dhs = tf.TensorArray(h2.dtype, size=n, infer_shape=False)
        dw0 = tf.zeros(tf.shape(w), acc) if xla else tf.raw_ops.Empty(shape=tf.shape(w), dtype=acc, init=True)
    elif in_place:
        dhs = dh_buffer()
        with tf.control_dependencies([dhs]):
            dw0 = tf.raw_ops.Empty(shape=tf.shape(w), dtype=acc, init=True)
    else:
        dw0 = tf.raw_ops.Empty(shape=tf.shape(w), dtype=acc, init=True)
        with tf.control_dependencies([dw0]):
            dhs = dh_buffer()

    def put_dh(dhs: Any, i: Any, dh: Any) -> Any:
        return dhs.write(i, dh) if xla else tf.raw_ops.InplaceUpdate(x=dhs, i=tf.range(i * chunk, (i + 1) * chunk), v=dh)

    def _add_dw(dw: Any, a: Any, b: Any, logits: Any) -> Any:  # dw += a^T b
        if xla:  # XLA adds in place itself
            return dw + tf.matmul(a, b, transpose_a=True)
        # a block and its slice of a: the freed logits' block, half of it (see _add_rows_in_place),
        # or, when the gradient fills the logits' buffer, a small fraction of a chunk beside it
        share = DW_IN_PLACE_SHARE if in_place else 2
        return _add_rows_in_place(dw, a, b, None if logits is None else logits // share)
    db0 = tf.zeros([C], acc) if (b is not None and grads) else tf.zeros([0], acc)
    has_b = b is not None and grads

    def step(i: Any, ls: Any, dhs: Any, dw: Any, db: Any) -> Any:
        out = body(i, ls, dhs, dw, db if has_b else None)
        return out[:4] + ((out[4],) if has_b else (db,))
    # one chunk at a time: by default TensorFlow runs up to 10 iterations at once, 10 chunks' logits
    _, ls, dhs, dw, db = tf.while_loop(lambda i, *_: i < n, step, (tf.constant(0), ls, dhs, dw0, db0),
                                       parallel_iterations=1)
    l = ls.concat()[:R]
    if not grads:
        return l
    dh = dhs.concat() if xla else dhs
    return l, (dh if exact else dh[:R]), tf.cast(dw, w.dtype), (tf.cast(db, b.dtype) if has_b else None)


DW_BLOCK_BYTES: int | None = None  # None: each d weight block as below; an int: that many bytes
DW_WHOLE_BYTES = 4 << 20  # a d weight term this small is formed whole (no graph of many blocks)
DW_MAX_BLOCKS = 64
DW_IN_PLACE_SHARE = 32  # beside an in-place gradient, a block and its slice: 1/32 of the chunk's logits


@functools.lru_cache(maxsize=None)
def _target_entries(shape: tuple, dtype: Any) -> Any:
    """(handle, y) -> the (rows,) entries z[r, y[r]] of the (rows, C) logits a resource variable
    holds. XLA reads the variable inside its own op, so no tensor outside keeps the buffer
    referenced when the in-place kernel runs (an executor's input slot may still hold it
    briefly after the op that used it has finished, and a shared buffer is copied, not updated)."""
    def take(handle: Any, y: Any) -> Any:
        return tf.gather(resource_variable_ops.read_variable_op(handle, dtype), y, axis=1, batch_dims=1)
    return tf.function(take, jit_compile=True, autograph=False)


def _plain_chunk_grad_in_place(z: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    """_plain_chunk_grad with the gradient written into the logits' own buffer (outside XLA): the
    logits go into an anonymous resource variable, whose update XLA may alias to its input."""
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


def _add_rows_in_place(dw: Any, a: Any, b: Any, budget: Any) -> Any:
    """``dw += a^T b`` in place, a block of dw's rows at a time (a's columns are dw's rows: classes
    for "CH", where a is the chunk's gradient; hidden units for "HC", where a is its hidden states).
    The whole term would be a weight-sized temporary beside the chunk's gradient (0.12 L at 8,192 x
    1,024 x 32,000; decision 57); a block and its slice of a together take at most ``budget``
    elements (None when unknown at trace time): half the chunk's logits when the gradient is a
    buffer of its own, so they fit in the logits' freed block, which TensorFlow's allocator splits
    only for pieces of at most half its size, and the chunk's logits and gradient stay the peak;
    1/32 of them beside a gradient formed in the logits' buffer. Each block waits for the previous
    add: TensorFlow's executor would otherwise form them all at once."""
    rows, width, n = a.shape[1], b.shape[1], a.shape[0]
    known = rows is not None and width is not None and n is not None and budget is not None
    if not known or (not DW_BLOCK_BYTES and int(rows) * int(width) * dw.dtype.size <= DW_WHOLE_BYTES):
        return tf.raw_ops.InplaceAdd(x=dw, i=tf.range(tf.shape(dw)[0]), v=tf.matmul(a, b, transpose_a=True))
    step = max(1, DW_BLOCK_BYTES // (dw.dtype.size * int(width)) if DW_BLOCK_BYTES
               else int(budget) // (int(width) + int(n)))
    step = max(step, -(-int(rows) // DW_MAX_BLOCKS))  # tiny chunks: a bounded graph, not one block per row
    for r0 in range(0, int(rows), step):
        r1 = min(int(rows), r0 + step)
        with tf.control_dependencies([dw]):
            term = tf.matmul(a[:, r0:r1] if step < rows else a, b, transpose_a=True)
        dw = tf.raw_ops.InplaceAdd(x=dw, i=tf.range(r0, r1), v=term)
    return dw


def _linear_token_loss(self: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                       scale_fn: Any, chunk: int, wl: str, want_grad: bool, cp: Any) -> Any:
    if cp is not None:
        raise XSeqLossTypeError("class_parallel is for PyTorch and JAX: tf.distribute has no tensor parallelism")
    if not (self._grad_possible or _record.could_possibly_record()):  # nothing records: losses only
        return _linear_loop(kst, acc, chunk, wl, h2, w, b, y, t, keep, cw, None, False)
    hint = tf.stop_gradient(scale_fn())

    def forward(*params: Any) -> Any:
        hh, ww = params[0], params[1]
        bb = params[2] if len(params) > 2 else None
        l, dh, dw, db = _linear_loop(kst, acc, chunk, wl, hh, ww, bb, y, t, keep, cw, hint, True)

        def grad(dl: Any) -> Any:
            dl = tf.reshape(dl, [-1])  # per token (its rank may be unknown in the tape's graph)
            nz = hint != 0
            ratio = tf.where(nz, dl / tf.where(nz, hint, tf.ones_like(hint)), tf.zeros_like(dl))
            r = tf.reduce_max(tf.where(nz, ratio, tf.fill(tf.shape(ratio), tf.constant(-np.inf, ratio.dtype))))
            r = tf.where(tf.reduce_any(nz), r, tf.zeros_like(r))
            uniform = tf.reduce_all(tf.where(nz, tf.equal(ratio, r), tf.equal(dl, 0)))

            def scaled() -> Any:
                out = [dh * tf.cast(r, dh.dtype), dw * tf.cast(r, dw.dtype)]
                return out + ([db * tf.cast(r, db.dtype)] if db is not None else [])

            def formed() -> Any:  # the upstream is the expected one: the gradients as formed, no copy
                return [tf.identity(dh), tf.identity(dw)] + ([tf.identity(db)] if db is not None else [])

            def uniform_multiple() -> Any:
                return tf.cond(tf.equal(r, 1), formed, scaled)

            def again() -> Any:
                _, a, bb_, c = _linear_loop(kst, acc, chunk, wl, hh, ww, bb, y, t, keep, cw, dl, True)
                return [a, bb_] + ([c] if c is not None else [])
            return tf.cond(uniform, uniform_multiple, again)
        return l, grad

    params = (h2, w) if b is None else (h2, w, b)
    return tf.custom_gradient(forward)(*params)


def _linear_value_and_grad(self: Any, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
    return self.run(_with_linear_gradient(fn), st, h, w, b, *arrays)  # eager: one traced call


@functools.lru_cache(maxsize=None)
def _with_linear_gradient(fn: Any) -> Any:
    """fn's value and the gradients of its sum with respect to hidden, weight and bias."""
    def value_and_grads(ops: Any, st: Any, h: Any, w: Any, b: Any, *rest: Any) -> Any:
        with tf.GradientTape() as tape:
            watched = [a for a in (h, w, b) if a is not None]
            for a in watched:
                tape.watch(a)
            out = fn(ops, st, h, w, b, *rest)
            total = tf.reduce_sum(out)
        g = iter(tape.gradient(total, watched))
        return out, tuple(None if a is None else next(g) for a in (h, w, b))
    return value_and_grads


def _plain_chunk_grad(self: Any, z: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    """Plain cross-entropy of one (rows, C) chunk through the XLA kernel: the loss and the scaled
    gradient in one fused pass (the generic formula's TensorFlow ops take one pass each)."""
    has_keep = keep is not None
    return _xla_kernel(2, 1, True, has_keep)(z, y, keep if has_keep else tf.zeros([], tf.bool), scale)


TensorflowBackend.plain_chunk_grad = _plain_chunk_grad  # type: ignore[attr-defined]


def _in_xla() -> bool:
    """Is the code being traced for XLA (inside the caller's ``jit_compile`` function)?"""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _linear_plain_chunk_factor() -> int:
    """Outside XLA a plain chunk's gradient takes its logits' buffer (_plain_chunk_grad_in_place),
    so a chunk may take twice the bytes for the same peak; under XLA the gradient is a buffer of
    its own. The same test as the chunk loop's (``_in_xla``), so the chunk sized here is the one
    the loop forms in place."""
    return 1 if _in_xla() else 2


TensorflowBackend.linear_plain_chunk_factor = staticmethod(_linear_plain_chunk_factor)  # type: ignore[attr-defined]
TensorflowBackend.linear_token_loss = _linear_token_loss  # type: ignore[attr-defined]
TensorflowBackend.linear_value_and_grad = _linear_value_and_grad  # type: ignore[attr-defined]
