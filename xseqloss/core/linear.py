"""The fused output layer's core (``linear_cross_entropy``, API.md section 8): one chunk loop for
every backend.

The tokens go through in chunks; a chunk's logits go to the same per-token formula as every other
path (``chunks.chunk_grad``: the backend's plain kernel for plain cross-entropy, ``token_loss``
otherwise) with the reduction's coefficient known before the loss (``compute.token_rules``), so
the gradients are formed in the forward pass, Liger-Kernel's way::

    z_c  = h_c @ W^T + b                      (float32 or wider, whatever the inputs' dtype)
    g_c  = d loss / d z_c  (times the coefficient)
    dh_c = g_c @ W ;  dW += g_c^T @ h_c (float32) ;  db += sum(g_c)

``run_chunks`` is that loop, written once. A backend gives only the native part, a ``ChunkLoop``
(``Backend.chunk_loop``): its loop primitive (a Python loop, ``lax.scan`` / ``while_loop``,
``tf.while_loop``), its buffers and in-place accumulation, its matmuls. The backward is the
backend's autodiff wrapper (a custom op, ``custom_vjp``, ``custom_gradient``) around this loop
with the upstream rule of ``backward.upstream``: the gradients formed in the forward returned as
they are, rescaled, or formed again by the same loop with the real upstream gradient.
"""

from __future__ import annotations

from typing import Any, Callable

from ..plan.call_plan import CallPlan
from .chunks import chunk_grad, chunk_loss, counted_rows
from .compute import metrics, token_rules


class ChunkLoop:
    """The native part of the fused layer's loop for one call (one chunk of ``chunk`` rows at a
    time). ``state`` is whatever the backend carries (its buffers: losses, d hidden, d weight,
    d bias); ``i`` is the chunk's index (a Python int or a traced scalar)."""

    def tokens(self, a: Any, fill: Any) -> Any:
        """A token array (R rows) prepared for ``rows`` once, before the loop (padded to whole
        chunks where the backend's loop needs chunks of one static size)."""
        return a

    def start(self) -> Any:
        """The loop's initial state (the buffers)."""
        raise NotImplementedError

    def run(self, step: Callable[[Any, Any], Any], state: Any) -> Any:
        """``state = step(i, state)`` for every chunk i, by the backend's own loop."""
        raise NotImplementedError

    def rows(self, a: Any, i: Any) -> Any:
        """Chunk i's rows of a token array (None stays None)."""
        raise NotImplementedError

    def hidden(self, state: Any, i: Any) -> Any:
        """Chunk i's hidden states in the accumulation dtype (ordered after the previous chunk's
        accumulation where the framework's executor would otherwise overlap them)."""
        raise NotImplementedError

    def logits(self, hc: Any, state: Any) -> Any:
        """hc @ W^T + b in the accumulation dtype (in a reused buffer where the backend has one)."""
        raise NotImplementedError

    def put_loss(self, state: Any, i: Any, l: Any) -> Any:
        """Chunk i's per-row outputs into the outputs' buffer: (rows,), or (rows, width) when the
        loop was made with a ``width`` (token_stats packs its outputs as columns)."""
        raise NotImplementedError

    def put_dh(self, state: Any, i: Any, g: Any) -> Any:
        """d hidden of chunk i: g @ W, written into the d hidden buffer."""
        raise NotImplementedError

    def add_dw(self, state: Any, i: Any, g: Any, hc: Any) -> Any:
        """d weight += the chunk's term (g^T hc for "CH", hc^T g for "HC"), accumulated in place."""
        raise NotImplementedError

    def add_db(self, state: Any, g: Any) -> Any:
        raise NotImplementedError

    def finish(self, state: Any) -> tuple[Any, Any, Any, Any]:
        """(losses, d hidden, d weight, d bias) in the inputs' dtypes; without gradients only the
        losses matter."""
        raise NotImplementedError


def run_chunks(ops: Any, rp: CallPlan, loop: ChunkLoop, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               scale: Any, grads: bool) -> tuple[Any, Any, Any, Any]:
    """The fused layer's chunk loop for the loss: per-token losses (R,) and, with ``grads``, the
    gradients of sum(scale * l) for hidden, weight and bias. ``rp``: the per-row plan ("NC" rows);
    ``y``, ``t``, ``keep``, ``scale``: the flattened token arrays (R rows). With a loss's
    return_stats (``rp.stats``) the losses come as column 0 of (R, ``loss_width(rp)``) rows whose
    other columns are the per-token outputs from the same pass (the loop must have that width)."""
    def kernel(z: Any, tc: dict) -> tuple[Any, Any]:
        part = None if rp.stats is None else {}
        if not grads:
            l, g = chunk_loss(ops, rp, z, tc["y"], tc["t"], tc["keep"], cw, acc, rows_zeroed=True, collect=part), None
        else:
            l, g = chunk_grad(ops, rp, z, tc["y"], tc["t"], tc["keep"], cw, acc, tc["scale"], rows_zeroed=True,
                              collect=part)
        if part is not None:
            l = ops.concat([ops.expand(l, 1)] + [ops.expand(ops.cast(part[n], acc), 1) for n in rp.stats.outputs], 1)
        return l, g
    return run_kernel(ops, loop, dict(y=y, t=t, keep=keep, scale=scale), kernel, grads)


def loss_width(rp: CallPlan) -> int:
    """The columns of the loss loop's per-row outputs: 0 (a vector of losses), or 1 + one per
    return_stats output."""
    return 0 if rp.stats is None else 1 + len(rp.stats.outputs)


def split_losses(ops: Any, rp: CallPlan, l2: Any) -> tuple[Any, dict]:
    """(the losses, the return_stats outputs by name) of the loss loop's per-row outputs."""
    if rp.stats is None:
        return l2, {}
    out = {}
    for j, name in enumerate(rp.stats.outputs):
        v = ops.stop_gradient(l2[:, 1 + j])  # API.md 11.5: the metrics carry no gradient
        out[name] = ops.as_index(v) if name == "argmax" else (v > 0.5) if name == "correct" else v
    return l2[:, 0], out


def run_kernel(ops: Any, loop: ChunkLoop, token_arrays: dict, kernel: Callable[[Any, dict], tuple[Any, Any]],
               grads: bool) -> tuple[Any, Any, Any, Any]:
    """The chunk loop itself, for any per-chunk kernel: ``kernel(z, rows)`` gets a chunk's logits
    (rows, C) and its rows of every token array (``rows["keep"]``: the rows that count) and gives
    the chunk's per-row outputs and, with ``grads``, d/dz of the chunk (its d hidden, d weight and
    d bias follow here). The loss (``run_chunks``) and token_stats (core/linear_stats.py) are its
    two kernels."""
    arrays = {n: loop.tokens(a, False if n == "keep" else 0) for n, a in token_arrays.items()}

    def step(i: Any, state: Any) -> Any:
        tc = {n: loop.rows(a, i) for n, a in arrays.items()}
        hc = counted_rows(ops, loop.hidden(state, i), tc.get("keep"))
        z = loop.logits(hc, state)
        out, g = kernel(z, tc)
        state = loop.put_loss(state, i, out)
        if not grads:
            return state
        state = loop.put_dh(state, i, g)
        state = loop.add_dw(state, i, g, hc)
        return loop.add_db(state, g)

    return loop.finish(loop.run(step, loop.start()))


def linear_core(ops: Any, st: CallPlan, h: Any, w: Any, b: Any, y: Any, t: Any, mask: Any, lengths: Any,
                weights: Any, cw: Any, normalizer: Any, segs: Any = None, want_grad: bool = False) -> Any:
    """The loss of the fused layer; with ``want_grad`` (NumPy) also (d hidden, d weight, d bias).
    Which tokens count, the coefficient and the reduction are the core's (``token_rules``); the
    per-token losses come from the backend's autodiff wrapper of ``run_chunks`` over the flattened
    tokens (or, classes split across workers, its class-parallel variant)."""
    lay = st.linear
    acc = ops.acc_dtype(h)
    like = y if y is not None else ops.drop_class(t, st.opts.k)
    p = token_rules(ops, st, like, acc, y, t, mask, lengths, weights, cw, normalizer, segs)
    hr = ops.moveaxis(h, lay.h_axis, -1) if lay.h_axis != ops.ndim(h) - 1 else h
    h2 = ops.reshape_rows(hr)  # (tokens, H), in the token arrays' order
    flat = (lambda x: None if x is None else ops.flat(x))
    t2 = None if p.t is None else ops.reshape_rows(ops.moveaxis(p.t, st.opts.k, -1))
    if st.class_parallel is not None:
        res = ops.linear_class_parallel(st.row_plan, lay, h2, w, b, flat(p.y), t2, flat(p.counted), p.cw, acc)
    else:
        scale = p.cotangent if want_grad else p.expected_dl
        res = ops.linear_token_loss(st.row_plan, lay, h2, w, b, flat(p.y), t2, flat(p.counted), p.cw, acc,
                                    lambda: flat(scale()), want_grad)
    l2, stats = split_losses(ops, st.row_plan, res[0] if want_grad else res)
    out = p.combine(ops.reshape_like(l2, like))
    result = p.finish(out)
    if st.stats is not None:
        result = (result, metrics(ops, {n: ops.reshape_like(v, like) for n, v in stats.items()}, p, None, like))
    if not want_grad:
        return result
    dh2, dw, db = res[1]
    dh = ops.reshape_like(dh2, hr)
    if lay.h_axis != ops.ndim(h) - 1:
        dh = ops.moveaxis(dh, -1, lay.h_axis)
    return result, (dh, dw, db)
