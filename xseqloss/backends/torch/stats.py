"""PyTorch's part of token_stats (API.md 11): the core's per-token outputs (core/stats.py) under an
autograd Function whose backward is the core's analytic gradient: exact for the entropy where
p -> 1 and at -inf logits (autograd of the formula would give 0 * inf = NaN there), and both
upstream gradients (log-probs and entropy) honoured at once."""

from __future__ import annotations

from typing import Any

import torch

from ...core.stats import DIFFERENTIABLE, stats_rows, stats_vjp


class TokenStatsFunction(torch.autograd.Function):
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


class TorchStats:
    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        number = temp if isinstance(temp, float) else None
        tt = None if number is not None or temp is None else temp.detach()  # the temperature is a constant
        vals = TokenStatsFunction.apply(z, y, ids, keep, tt, (self, st, acc, number))
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
