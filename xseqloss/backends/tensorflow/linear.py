"""TensorFlow's part of the fused output layer (``linear_cross_entropy``, core/linear.py).

The chunk loop's native pieces (``TfChunks``): a ``tf.while_loop`` over chunks (XLA-compilable, one
chunk's float32 logits at a time, one iteration at a time); a custom gradient around it: the
forward forms the gradients with the expected upstream factor, the backward applies the upstream
rule (core/backward.py, uniform): the formed gradients as they are, scaled, or the loop again with
the upstream gradient. 16-bit inputs: the chunk and the weight are cast to float32 (tf.matmul has
no wider result type).

Outside XLA every buffer is placed by hand, because TensorFlow's CPU allocator places a request
whole in any free block less than twice its size (decisions 57, 58): d weight accumulates in place
(InplaceAdd into a fresh Empty buffer, which grappler never folds into a shared constant), a block
of rows at a time, each block's product overlapping the previous block's add, and for an (H, C)
weight as (C, H), transposed once at the end (decision 115); d hidden is written in place, chunk
by chunk, into the buffer that is returned; a plain chunk's gradient takes its logits' own buffer
(xla.py); each chunk starts once the previous chunk's adds are done, and each chunk's d weight
adds wait for its d hidden piece.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import record as _record  # could_possibly_record: is any tape active?
from tensorflow.python.util import _pywrap_util_port as _port  # IsMklEnabled: are oneDNN's kernels on?

from ...core import backward
from ...core.chunks import even_chunk
from ...core.linear import ChunkLoop, loss_width, run_chunks
from .xla import in_xla

DW_BLOCK_BYTES: int | None = None  # None: each d weight block as below; an int: that many bytes
DW_WHOLE_BYTES = 4 << 20  # a d weight term this small is formed whole (no graph of many blocks)
DW_MAX_BLOCKS = 128  # overlapped blocks are a third smaller: 96 at 1,024-row chunks of 32,000 classes
DW_OVERLAP = True  # a block's product runs while the previous block is added (decision 115)
DW_OVERLAP_MIN_ROWS = 256  # ... when the blocks stay this many rows or more
DW_IN_PLACE_SHARE = 32  # beside an in-place gradient, a block and its slice: 1/32 of the chunk's logits
_ONEDNN = bool(_port.IsMklEnabled())  # TensorFlow's oneDNN kernels (TF_ENABLE_ONEDNN_OPTS; on by default on x86)



class TfChunks(ChunkLoop):
    def __init__(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool, width: int = 0,
                 in_place: bool = True) -> None:
        self.acc, self.h2, self.w, self.b, self.grads, self.width = acc, h2, w, b, grads, width
        self.ch = lay.weight_layout == "CH"
        chunk = lay.chunk
        static_R = h2.shape[0]
        if static_R is not None and static_R > 0:
            chunk = even_chunk(int(static_R), chunk)  # whole chunks: no padded copy of the hidden states
        self.chunk = chunk
        self.R = tf.shape(h2)[0]
        self.n = tf.maximum((self.R + chunk - 1) // chunk, 1)
        self.P = self.n * chunk - self.R
        self.exact = static_R is not None and static_R > 0 and static_R % chunk == 0
        self.wa = tf.cast(w, acc)  # the weight itself when it is already float32 / float64 (no copy)
        self.ba = None if b is None else tf.cast(b, acc)
        self.C = tf.shape(self.wa)[0 if self.ch else 1]
        self.xla = in_xla()
        # an (H, C) weight's d weight accumulates transposed, as (C, H), outside XLA: class blocks
        # of the chunk's gradient (the "CH" way), one transpose at the end, into the chunk's freed
        # buffer, so only where that is as large as the weight (H <= chunk; decision 115)
        H = h2.shape[-1]
        self.dw_t = (grads and not self.ch and not self.xla and H is not None
                     and int(H) * w.dtype.size <= chunk * tf.as_dtype(acc).size)
        # the gradient in the logits' buffer (decision 58)
        self.in_place = in_place and grads and not self.xla and rp.plain
        self.h2p = self.tokens(h2, 0)

    def tokens(self, a: Any, fill: Any) -> Any:  # whole chunks of a static size: XLA compiles the loop once
        if a is None or self.exact:
            return a
        pad = tf.concat([[[0, self.P]], tf.zeros([len(a.shape) - 1, 2], tf.int32)], 0)
        return tf.pad(a, pad, constant_values=tf.cast(fill, a.dtype))

    def rows(self, a: Any, i: Any) -> Any:  # a static size: XLA needs one inside the loop
        if a is None:
            return None
        rank = len(a.shape)
        return tf.slice(a, tf.concat([[i * self.chunk], tf.zeros([rank - 1], tf.int32)], 0),
                        [self.chunk] + [-1] * (rank - 1))

    def start(self) -> tuple:
        h2, n, acc = self.h2, self.n, self.acc
        ls = tf.TensorArray(acc, size=n, infer_shape=False)
        # The order of the two allocations decides where TensorFlow's allocator puts the chunk's
        # logits (decisions 57, 58): with two chunk buffers (logits and gradient), d hidden comes
        # after d weight, so it does not carve d weight's old block and leave a remainder too small
        # to split; with one (in place), d hidden comes first, so the chunk's logits find d
        # hidden's old block split off, not a remainder of one and a half chunks (0.10 L more)

        def dh_buffer() -> Any:
            return tf.raw_ops.Empty(shape=tf.concat([[n * self.chunk], tf.shape(h2)[1:]], 0), dtype=h2.dtype,
                                    init=False)

        dw_shape = tf.reverse(tf.shape(self.w), [0]) if self.dw_t else tf.shape(self.w)
        if self.xla or not self.grads:
            dhs = tf.TensorArray(h2.dtype, size=n, infer_shape=False)
            dw0 = tf.zeros(dw_shape, acc) if self.xla else tf.raw_ops.Empty(shape=dw_shape, dtype=acc, init=True)
        elif self.in_place:
            dhs = dh_buffer()
            with tf.control_dependencies([dhs]):
                dw0 = tf.raw_ops.Empty(shape=dw_shape, dtype=acc, init=True)
        else:
            dw0 = tf.raw_ops.Empty(shape=dw_shape, dtype=acc, init=True)
            with tf.control_dependencies([dw0]):
                dhs = dh_buffer()
        db0 = tf.zeros([self.C], acc) if (self.b is not None and self.grads) else tf.zeros([0], acc)
        return (ls, dhs, dw0, db0)

    def run(self, step: Any, state: Any) -> Any:
        # one chunk at a time: by default TensorFlow runs up to 10 iterations at once, 10 chunks' logits
        out = tf.while_loop(lambda i, *_: i < self.n, lambda i, *st: (i + 1, *step(i, st)),
                            (tf.constant(0), *state), parallel_iterations=1)
        return out[1:]

    def hidden(self, state: Any, i: Any) -> Any:
        # the chunk starts once the previous chunk's adds are done: TensorFlow's executor would
        # otherwise form its logits beside the previous chunk's gradient (outside XLA)
        with tf.control_dependencies([state[2]] if self.grads and not self.xla else []):
            return tf.cast(self.rows(self.h2p, i), self.acc)

    def logits(self, hc: Any, state: Any) -> Any:
        z = _times_t(hc, self.wa, self.xla) if self.ch else tf.matmul(hc, self.wa)  # the weight's own layout
        return z if self.ba is None else z + self.ba

    def put_loss(self, state: Any, i: Any, l: Any) -> Any:
        return (state[0].write(i, l), *state[1:])

    def put_dh(self, state: Any, i: Any, g: Any) -> Any:
        dh = tf.cast(tf.matmul(g, self.wa) if self.ch else _times_t(g, self.wa, self.xla), self.h2.dtype)
        dhs = state[1]
        if self.xla:
            dhs = dhs.write(i, dh)
        else:
            dhs = tf.raw_ops.InplaceUpdate(x=dhs, i=tf.range(i * self.chunk, (i + 1) * self.chunk), v=dh)
        return (state[0], dhs, *state[2:])

    def add_dw(self, state: Any, i: Any, g: Any, hc: Any) -> Any:
        ls, dhs, dw, db = state
        a, b = (g, hc) if self.ch or self.dw_t else (hc, g)
        with tf.control_dependencies([] if self.xla else [dhs]):  # d hidden's piece is gone before the adds
            if self.xla:  # XLA adds in place itself
                dw = dw + tf.matmul(a, b, transpose_a=True)
            else:
                # a block and its slice of a: the freed logits' block, half of it (see
                # _add_rows_in_place), or, when the gradient fills the logits' buffer, a small
                # fraction of a chunk beside it
                logits = g.shape.num_elements()
                share = DW_IN_PLACE_SHARE if self.in_place else 2
                dw = _add_rows_in_place(dw, a, b, None if logits is None else logits // share)
        return (ls, dhs, dw, db)

    def add_db(self, state: Any, g: Any) -> Any:
        if self.b is None:
            return state
        return (*state[:3], state[3] + tf.reduce_sum(g, 0))

    def finish(self, state: Any) -> tuple[Any, Any, Any, Any]:
        ls, dhs, dw, db = state
        l = tf.reshape(ls.concat(), [-1, self.width] if self.width else [-1])[:self.R]  # a known rank
        if not self.grads:
            return l, None, None, None
        dh = dhs.concat() if self.xla else dhs
        dw = tf.cast(dw, self.w.dtype)
        dw = tf.transpose(dw) if self.dw_t else dw  # the chunks' buffers are free by now: it takes theirs
        return (l, (dh if self.exact else dh[:self.R]), dw,
                (tf.cast(db, self.b.dtype) if self.b is not None else None))


def _times_t(a: Any, b: Any, xla: bool) -> Any:
    """``a @ b^T`` for a chunk's rows ``a`` and the weight ``b``, no transposed copy of the weight.
    With oneDNN (TensorFlow's default on x86), ``MatMul(transpose_b=True)`` reorders all of ``b``
    on every call, whatever the rows: at 128 rows x 1,024 x 32,000 that took 2.2-2.5x the time of the
    same product with ``b`` already transposed, and the stats chunks are 131-262 rows (decision 113);
    the batched product (``BatchMatMulV2``, one batch) reads ``b`` as it is: 1.03x. Without
    oneDNN the batched product is as slow as the plain one, and under XLA it is the same dot."""
    if xla or not _ONEDNN:
        return tf.matmul(a, b, transpose_b=True)
    return tf.linalg.matmul(a[None], b[None], adjoint_b=True)[0]


def d_weight_blocks(rows: int, width: int, n: int, budget: int, itemsize: int) -> tuple[int, bool]:
    """(rows per block, overlapped?) for ``_add_rows_in_place``: a block's term (rows x width) and
    its slice of a (n x rows) within ``budget`` elements; overlapped, a block's product runs while
    the previous block is added, two terms at once, so smaller blocks, taken only while they stay
    ``DW_OVERLAP_MIN_ROWS`` rows or more (an efficient GEMM) and within the budget: where the
    bound on the number of blocks makes them larger than the budget (a short chunk of a large
    vocabulary), one term at a time, not two over it."""
    floor = -(-rows // DW_MAX_BLOCKS)  # tiny chunks: a bounded graph, not a block per row
    if DW_BLOCK_BYTES:
        step, overlap = max(1, DW_BLOCK_BYTES // (itemsize * width)), False
    else:
        overlap = DW_OVERLAP and budget // (2 * width + n) >= max(DW_OVERLAP_MIN_ROWS, floor)
        step = max(1, budget // ((2 if overlap else 1) * width + n))
    return max(step, floor), overlap


def _add_rows_in_place(dw: Any, a: Any, b: Any, budget: Any) -> Any:
    """``dw += a^T b`` in place, a block of dw's rows at a time (a's columns are dw's rows: classes
    for "CH", where a is the chunk's gradient; hidden units for "HC", where a is its hidden states).
    The whole term would be a weight-sized temporary beside the chunk's gradient (0.12 L at 8,192 x
    1,024 x 32,000; decision 57); a block and its slice of a together take at most ``budget``
    elements (None when unknown at trace time): half the chunk's logits when the gradient is a
    buffer of its own, so they fit in the logits' freed block, which TensorFlow's allocator splits
    only for pieces of at most half its size, and the chunk's logits and gradient stay the peak;
    1/32 of them beside a gradient formed in the logits' buffer. Each block's product waits for the
    previous block's add (TensorFlow's executor would otherwise form them all at once), or, where
    the blocks stay large (classes for "CH"), for the add before that one: the product then runs
    while the previous block is added, two terms within the budget (1/32 of the chunk: 1.066 ->
    1.021 x naive at 2,048 x 1,024 x 32,000, decision 115). Hidden-unit blocks of an (H, C) weight
    that is not accumulated transposed are ~15-31 rows at 32,000 classes, each reading the whole
    gradient: below ``DW_OVERLAP_MIN_ROWS``, so one at a time (overlapped: 1.29 against 1.10 x naive)."""
    rows, width, n = a.shape[1], b.shape[1], a.shape[0]
    known = rows is not None and width is not None and n is not None and budget is not None
    if not known or (not DW_BLOCK_BYTES and int(rows) * int(width) * dw.dtype.size <= DW_WHOLE_BYTES):
        return tf.raw_ops.InplaceAdd(x=dw, i=tf.range(tf.shape(dw)[0]), v=tf.matmul(a, b, transpose_a=True))
    step, overlap = d_weight_blocks(int(rows), int(width), int(n), int(budget), dw.dtype.size)
    after = dw  # what the next product waits for: the previous add, or (overlapped) the one before it
    for r0 in range(0, int(rows), step):
        r1 = min(int(rows), r0 + step)
        with tf.control_dependencies([after]):
            term = tf.matmul(a[:, r0:r1] if step < rows else a, b, transpose_a=True)
        previous = dw
        dw = tf.raw_ops.InplaceAdd(x=dw, i=tf.range(r0, r1), v=term)
        after = previous if overlap else dw
    return dw



def unrecorded(fn: Any, *args: Any) -> tuple:
    """fn's outputs (the chunk loop's), with no tape recording the loop and no gradient through its
    outputs: the custom gradient around it is the loop's only gradient. A tape that records the
    loop's inputs (a persistent tape, nested tapes) would otherwise wrap the while_loop for
    higher-order gradients, which differentiates it (no gradient for InplaceUpdate) and, under
    XLA, accumulates its intermediates in lists of no fixed size."""
    with _record.stop_recording():
        out = fn(*args)
        return tuple(None if o is None else tf.stop_gradient(o) for o in out)


def without_in_place(ops: Any, fn: Any) -> Any:
    """fn() with the plain kernel's gradient in a buffer of its own, not the logits' (a resource
    variable, which tf.vectorized_map cannot convert: tape.jacobian vectorizes the backward)."""
    ops._in_place = False
    try:
        return fn()
    finally:
        ops._in_place = True


def first_order_only(grads_fn: Any, inputs: list) -> list:
    """The gradients ``grads_fn()`` forms (no tape records how), as identities of ``inputs`` for any
    tape that records the backward (nested tapes, a persistent tape around a gradient): their own
    derivative, a second derivative through the fused layer, is not formed and is NaN for every
    input, never a silent zero (decision 80). Not an error: TensorFlow forms that derivative's
    graph, unasked, whenever a persistent tape records a first gradient."""
    with _record.stop_recording():
        grads = grads_fn()

    @tf.custom_gradient
    def mark(*xs: Any) -> Any:
        def grad(*_: Any) -> Any:
            return [tf.fill(tf.shape(x), tf.constant(float("nan"), x.dtype)) for x in xs]
        return [tf.identity(g) for g in grads], grad
    return mark(*inputs)


class TensorflowLinear:
    def linear_plain_chunk_factor(self) -> int:
        """Outside XLA a plain chunk's gradient takes its logits' buffer (xla.py), so a chunk may
        take twice the bytes for the same peak; under XLA the gradient is a buffer of its own. The
        same test as the chunk loop's (``in_xla``), so the chunk sized here is the one the loop
        forms in place."""
        return 1 if in_xla() else 2

    def chunk_loop(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool,
                   width: int = 0) -> TfChunks:
        return TfChunks(rp, lay, acc, h2, w, b, grads, width)

    def linear_token_loss(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any,
                          acc: Any, scale_fn: Any, want_grad: bool) -> Any:
        ops = self

        def loop(hh: Any, ww: Any, bb: Any, scale: Any, grads: bool, in_place: bool = True) -> Any:
            ly = lay  # without the in-place gradient, half the chunk: the same peak (two chunk buffers)
            if not in_place and rp.plain and self.linear_plain_chunk_factor() > 1:
                ly = dataclasses.replace(lay, chunk=max(1, lay.chunk // self.linear_plain_chunk_factor()))
            chunks = TfChunks(rp, ly, acc, hh, ww, bb, grads, width=loss_width(rp), in_place=in_place)
            if in_place:
                return run_chunks(ops, rp, chunks, y, t, keep, cw, acc, scale, grads)
            return without_in_place(ops, lambda: run_chunks(ops, rp, chunks, y, t, keep, cw, acc, scale, grads))

        if not (self._grad_possible or _record.could_possibly_record()):  # nothing records: losses only
            return loop(h2, w, b, None, False)[0]
        formed = tf.stop_gradient(scale_fn())

        def forward(*params: Any) -> Any:
            hh, ww = params[0], params[1]
            bb = params[2] if len(params) > 2 else None
            l, dh, dw, db = unrecorded(loop, hh, ww, bb, formed, True)

            def grad(dl: Any) -> Any:
                return first_order_only(lambda: grads(dl), [dl, *params])

            def grads(dl: Any) -> Any:
                w_ = loss_width(rp)  # return_stats: the losses are column 0, the metrics carry no gradient
                dl = tf.reshape(dl, [-1, w_])[:, 0] if w_ else tf.reshape(dl, [-1])  # per token (rank may be unknown)
                m = backward.upstream(ops, dl, formed, keep, per_row=False)

                def as_formed() -> Any:  # the upstream is the expected one: the gradients as formed, no copy
                    return [tf.identity(dh), tf.identity(dw)] + ([tf.identity(db)] if db is not None else [])

                def scaled() -> Any:
                    r = m.factor
                    out = [dh * tf.cast(r, dh.dtype), dw * tf.cast(r, dw.dtype)]
                    return out + ([db * tf.cast(r, db.dtype)] if db is not None else [])

                def again() -> Any:  # inside the caller's gradient, which tf.vectorized_map may convert
                    _, a, bb_, c = unrecorded(loop, hh, ww, bb, dl, True, False)
                    return [a, bb_] + ([c] if c is not None else [])
                return tf.cond(m.exact, as_formed, lambda: tf.cond(m.again, again, scaled))
            return l, grad

        params = (h2, w) if b is None else (h2, w, b)
        return tf.custom_gradient(forward)(*params)

    def linear_value_and_grad(self, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
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


