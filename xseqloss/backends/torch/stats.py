"""PyTorch's part of token_stats (API.md 11): the core's per-token outputs (core/stats.py) under an
autograd Function whose backward is the core's analytic gradient: exact for the entropy where
p -> 1 and at -inf logits (autograd of the formula would give 0 * inf = NaN there), and both
upstream gradients (log-probs and entropy) honoured at once.

Eager calls on logits with classes last run the core a chunk of rows at a time (``ChunkedStats``):
the forward reads the logits once, keeping per token only what the backward needs (m, log s, Ē),
and the backward reads them once more and writes the gradient once, chunk by chunk into the
reusable gradient buffer (buffers.py): no logits-sized temporary, where the composition users write
today (log_softmax, gather, exp, sum) holds several. Under torch.compile the whole-array Function
runs and inductor fuses it.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core import stats_chunks
from ...core.stats import DIFFERENTIABLE, stats_rows, stats_vjp
from .buffers import gradient_buffer
from .ops import compiling


class TokenStatsFunction(torch.autograd.Function):
    """The whole arrays at once (compiled calls, other layouts)."""

    @staticmethod
    def forward(ctx: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, args: Any) -> Any:
        be, st, acc, temp_number = args
        t = temp_number if temp is None else temp
        with torch.no_grad():
            out, saved = stats_rows(be, st, z, y, ids, keep, t, acc)
        names = tuple(out)
        ctx.names, ctx.args, ctx.saved_stats = names, args, saved
        ctx.save_for_backward(z, y, ids, keep, temp)
        ctx.mark_non_differentiable(*[out[n] for n in names if n not in DIFFERENTIABLE])
        return tuple(out[n] for n in names)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Any) -> Any:
        z, y, ids, keep, temp = ctx.saved_tensors
        be, st, acc, temp_number = ctx.args
        cts = {n: g for n, g in zip(ctx.names, grads) if n in DIFFERENTIABLE and g is not None}
        g = None
        if cts:
            t = temp_number if temp is None else temp
            g = stats_vjp(be, st, z, y, ids, keep, t, acc, ctx.saved_stats, cts).to(z.dtype)
        return g, None, None, None, None, None


class ChunkedStats(torch.autograd.Function):
    """A chunk of rows at a time (eager, classes last; core/stats_chunks.py): see the module docstring."""

    @staticmethod
    def forward(ctx: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, args: Any) -> Any:
        be, st, acc, temp_number = args
        zf = stats_chunks.as_rows(z.detach(), -1)
        R = zf.shape[0]
        rows = _token_rows(R, y, ids, keep, temp, temp_number)
        with torch.no_grad():
            outs, saved = stats_chunks.forward(be, st, zf, *rows, acc)
        names = tuple(outs)
        ctx.names, ctx.args, ctx.saved_stats = names, args, saved
        ctx.save_for_backward(z, y, ids, keep, temp)
        tok = z.shape[:-1]
        res = tuple(outs[n].reshape(*tok, *outs[n].shape[1:]) for n in names)
        ctx.mark_non_differentiable(*[r for n, r in zip(names, res) if n not in DIFFERENTIABLE])
        return res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Any) -> Any:
        z, y, ids, keep, temp = ctx.saved_tensors
        be, st, acc, temp_number = ctx.args
        cts = {n: g for n, g in zip(ctx.names, grads) if n in DIFFERENTIABLE and g is not None}
        if not cts:
            return None, None, None, None, None, None
        zf = stats_chunks.as_rows(z, -1)
        R = zf.shape[0]
        cf = {n: stats_chunks.token_rows(g, R, n == "ids_log_prob") for n, g in cts.items()}
        gbuf = gradient_buffer(z, st)
        stats_chunks.gradient(be, st, zf, *_token_rows(R, y, ids, keep, temp, temp_number), acc, ctx.saved_stats, cf,
                              gbuf.view(R, -1))
        return gbuf, None, None, None, None, None


def _token_rows(R: int, y: Any, ids: Any, keep: Any, temp: Any, number: Any) -> tuple:
    tr = stats_chunks.token_rows
    kr = stats_chunks.keep_rows(keep, R, keep is not None and keep.device.type == "cpu")
    return tr(y, R), tr(ids, R, True), kr, (number if temp is None else tr(temp, R))


class TorchStats:
    def empty_rows(self, shape: tuple, dtype: Any, like: Any) -> Any:
        return torch.empty(shape, dtype=dtype, device=like.device)

    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        number = temp if isinstance(temp, float) else None
        tt = None if number is not None or temp is None else temp.detach()  # the temperature is a constant
        chunked = (not compiling() and st.engine.kernel != "native"
                   and stats_chunks.as_rows(z, st.opts.k) is not None)
        fn = ChunkedStats if chunked else TokenStatsFunction
        vals = fn.apply(z, y, ids, keep, tt, (self, st, acc, number))
        if not isinstance(vals, tuple):
            vals = (vals,)
        return dict(zip(st.stats.outputs, vals))

    def stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        z = arrays[0]
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            out = fwd(self, st, zz, *arrays[1:])
            total = sum((out[n] * c.to(out[n].dtype)).sum() for n, c in cts.items())
            (g,) = torch.autograd.grad(total, zz, allow_unused=True)
        return torch.zeros_like(z) if g is None else g
