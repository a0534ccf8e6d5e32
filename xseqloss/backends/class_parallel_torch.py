"""PyTorch's collectives for classes split across workers (xseqloss/class_parallel.py, API.md 9.2):
the core's reducer over a process group, and the fused output layer with the weight sharded."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._token_loss import token_loss
from ..class_parallel import Reducer
from ..linear import counted_rows

__all__ = ["TorchReducer", "torch_linear"]


class SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity: the sum is replicated, so every worker's
    upstream gradient of it is already the whole one (Megatron's reduce-from-model-parallel)."""

    @staticmethod
    def forward(ctx: Any, x: Any, group: Any) -> Any:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        return g, None


class TorchReducer(Reducer):
    def max(self, v: Any) -> Any:
        v = v.detach().clone()
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.split.handle)
        return v

    def sums(self, vs: list) -> list:
        dt = vs[0].dtype
        for v in vs[1:]:
            dt = torch.promote_types(dt, v.dtype)
        flat = torch.cat([v.reshape(-1).to(dt) for v in vs])
        out = SumOverGroup.apply(flat, self.split.handle)
        pieces = torch.split(out, [v.numel() for v in vs])
        return [p.reshape(v.shape).to(v.dtype) for p, v in zip(pieces, vs)]

    def labels(self, y: Any) -> tuple[Any, Any]:
        yl = y - self.split.lo
        own = (yl >= 0) & (yl < self.split.local)
        return torch.where(own, yl, 0), own

    @staticmethod
    def _where(c: Any, a: Any, b: Any) -> Any:
        return torch.where(c, a, b)


def torch_linear(be: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                 chunk: int, wl: str) -> Any:
    """The fused layer with the weight sharded along C (a column-parallel output layer): per chunk
    of tokens the local logits, the per-token loss with its class sums combined over the group
    (``token_loss``); the backward runs the chunks again and forms d hidden (summed over the group
    in one all-reduce), d weight and d bias (local). Each chunk's collectives pair up across the
    ranks because every rank runs the same chunks (``linear._prepare_linear``)."""
    return ClassParallelLinear.apply(h2, w, b, y, t, keep, cw, (be, kst, acc, chunk, wl))


def _torch_mm(hc: Any, w: Any, wl: str, acc: Any) -> Any:
    wa = w.to(acc)
    return hc.to(acc) @ (wa.t() if wl == "CH" else wa)


def _torch_chunks(R: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, R)) for i in range(0, R, chunk)] or [(0, 0)]


def _rows(x: Any, i: int, j: int) -> Any:
    return None if x is None else x[i:j]


class ClassParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, plan: Any) -> Any:
        be, kst, acc, chunk, wl = plan
        out = h2.new_zeros(h2.shape[0], dtype=acc)
        for i, j in _torch_chunks(h2.shape[0], chunk):
            z = _torch_mm(h2[i:j], w, wl, acc)
            if b is not None:
                z = z + b.to(acc)
            out[i:j] = token_loss(be, kst, z, _rows(y, i, j), _rows(t, i, j), _rows(keep, i, j), cw, acc, k=1)[0]
        ctx.save_for_backward(h2, w, b, y, t, keep, cw)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx: Any, dl: Any) -> Any:
        h2, w, b, y, t, keep, cw = ctx.saved_tensors
        be, kst, acc, chunk, wl = ctx.plan
        wa = w.to(acc)
        dh = torch.zeros(h2.shape, dtype=acc, device=h2.device)
        dw = torch.zeros(wa.shape, dtype=acc, device=w.device)
        db = None if b is None else torch.zeros(b.shape, dtype=acc, device=b.device)
        for i, j in _torch_chunks(h2.shape[0], chunk):
            hc = h2[i:j].to(acc)
            kc = _rows(keep, i, j)
            hc = counted_rows(be, hc, kc)
            z = hc @ (wa.t() if wl == "CH" else wa)
            if b is not None:
                z = z + b.to(acc)
            _, g = token_loss(be, kst, z, _rows(y, i, j), _rows(t, i, j), kc, cw, acc, want_grad=True, k=1,
                              rows_clean=True)
            g = g * dl[i:j].to(acc).unsqueeze(1)
            dh[i:j] = g @ (wa if wl == "CH" else wa.t())
            dw += (g.t() @ hc) if wl == "CH" else (hc.t() @ g)
            if db is not None:
                db += g.sum(0)
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=kst.class_parallel.handle)  # every slice's share
        return (dh.to(h2.dtype), dw.to(w.dtype), None if db is None else db.to(b.dtype),
                None, None, None, None, None)
