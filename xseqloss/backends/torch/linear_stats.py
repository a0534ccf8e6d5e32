"""PyTorch's part of linear_token_stats (core/linear_stats.py): the fused layer's chunk loop for
token_stats as two custom ops, so torch.compile(fullgraph=True) sees one opaque node: the forward
(the packed per-token outputs) and its backward (the loop again under the cotangents: d hidden,
d weight, d bias)."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ...core import linear_stats
from ...plan.call_plan import CallPlan, LinearLayout, StatsPlan
from ...plan.options import Options
from .linear import TorchChunks

_BACKEND: Any = None  # the composed backend (its ops), bound by the package's __init__ (``bind``)


def bind(backend: Any) -> None:
    global _BACKEND
    _BACKEND = backend


@functools.lru_cache(maxsize=256)
def row_plan(C: int, cap: float, outputs: str, temperature: float, n_ids: int, has_temp: bool) -> CallPlan:
    """The per-row plan from the primitives a custom op can carry."""
    o = Options("NC", (), "logits", 0.0, "uniform", 0.0, cap if cap > 0 else None, "none", "weights", "zero",
                None, False, False)
    sp = StatsPlan(tuple(outputs.split(",")), None if has_temp else temperature, "tokens" if has_temp else "", n_ids)
    return CallPlan(o, C, False, 0.0, False, False, False, False, False, False, stats=sp)


def _args(rp: CallPlan, temp: Any) -> tuple:
    sp = rp.stats
    return (rp.C, float(rp.opts.cap or 0.0), ",".join(sp.outputs), float(sp.temperature or 1.0), sp.n_ids,
            temp is not None)


def _tokens(y: Any, ids: Any, keep: Any, temp: Any) -> dict:
    return linear_stats.token_arrays(y, ids, keep, temp)


@torch.library.custom_op("xseqloss::linear_stats", mutates_args=())
def _linear_stats(h2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
                  ids: Optional[torch.Tensor], keep: Optional[torch.Tensor], temp: Optional[torch.Tensor], C: int,
                  cap: float, outputs: str, temperature: float, n_ids: int, has_temp: bool, chunk: int,
                  wl: str) -> torch.Tensor:
    rp = row_plan(C, cap, outputs, temperature, n_ids, has_temp)
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    loop = TorchChunks(LinearLayout(1, wl, chunk), acc, h2, w, b, False, width=linear_stats.width(rp))
    return linear_stats.forward(_BACKEND, rp, loop, _tokens(y, ids, keep, temp), acc)


@_linear_stats.register_fake
def _(h2, w, b, y, ids, keep, temp, C, cap, outputs, temperature, n_ids, has_temp, chunk, wl):
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    rp = row_plan(C, cap, outputs, temperature, n_ids, has_temp)
    return h2.new_empty((h2.shape[0], linear_stats.width(rp)), dtype=acc)


@torch.library.custom_op("xseqloss::linear_stats_backward", mutates_args=())
def _linear_stats_backward(packed: torch.Tensor, cts: torch.Tensor, h2: torch.Tensor, w: torch.Tensor,
                           b: Optional[torch.Tensor], y: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                           keep: Optional[torch.Tensor], temp: Optional[torch.Tensor], C: int, cap: float,
                           outputs: str, temperature: float, n_ids: int, has_temp: bool, chunk: int,
                           wl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rp = row_plan(C, cap, outputs, temperature, n_ids, has_temp)
    acc = packed.dtype
    loop = TorchChunks(LinearLayout(1, wl, chunk), acc, h2, w, b, True)
    dh, dw, db = linear_stats.backward(_BACKEND, rp, loop, _tokens(y, ids, keep, temp), packed, cts.to(acc), acc)
    return dh, dw, (w.new_empty(0) if db is None else db)


@_linear_stats_backward.register_fake
def _(packed, cts, h2, w, b, y, ids, keep, temp, C, cap, outputs, temperature, n_ids, has_temp, chunk, wl):
    return torch.empty_like(h2), torch.empty_like(w), (w.new_empty(0) if b is None else torch.empty_like(b))


def _setup(ctx: Any, inputs: Any, output: Any) -> None:
    ctx.inputs = inputs
    ctx.packed = output


def _backward(ctx: Any, dpacked: Any) -> Any:
    h2, w, b, y, ids, keep, temp, *args = ctx.inputs
    if dpacked is None:
        dpacked = torch.zeros_like(ctx.packed)
    dh, dw, db = torch.ops.xseqloss.linear_stats_backward(ctx.packed, dpacked, h2, w, b, y, ids, keep, temp, *args)
    return (dh, dw, (db if b is not None else None)) + (None,) * 12


torch.library.register_autograd("xseqloss::linear_stats", _backward, setup_context=_setup)


class TorchLinearStats:
    def linear_token_stats(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any,
                           acc: Any) -> Any:
        tt = None if temp is None or isinstance(temp, float) else temp.detach()  # the temperature is a constant
        return torch.ops.xseqloss.linear_stats(h2, w, b, y, ids, keep, tt, *_args(rp, tt), lay.chunk,
                                               lay.weight_layout)

    def linear_stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        with torch.enable_grad():
            leaves = [None if a is None else a.detach().requires_grad_(True) for a in arrays[:3]]
            out = fwd(self, st, *leaves, *arrays[3:])
            total = sum((out[n] * c.to(out[n].dtype)).sum() for n, c in cts.items())
            want = [a for a in leaves if a is not None]
            grads = torch.autograd.grad(total, want, allow_unused=True)
        g = iter(grads)
        return tuple(None if a is None else (lambda x, a=a: torch.zeros_like(a) if x is None else x)(next(g))
                     for a in leaves)
