"""PyTorch's collectives for classes split across workers (API.md 9.2; the orchestration is
xseqloss/_class_parallel.py): the core's reducer over a process group, the small all_gather every
eager call makes, DTensor unwrapping, and the fused output layer with the weight sharded."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..._errors import XSeqLossError, XSeqLossTypeError
from ...core import linear_stats
from ...core.linear import loss_width, run_chunks
from ...plan.split import Reducer
from .linear import TorchChunks

__all__ = ["TorchReducer", "TorchClassParallel"]


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

    def offset(self, like: Any) -> Any:
        return self.split.lo

    def labels(self, y: Any) -> tuple[Any, Any]:
        yl = y - self.split.lo
        own = (yl >= 0) & (yl < self.split.local)
        return torch.where(own, yl, 0), own

    def _where(self, c: Any, a: Any, b: Any) -> Any:
        return torch.where(c, a, b)

    def take(self, vec: Any, y: Any) -> Any:
        if self.split.local == 0:  # this worker holds no class: its share of vec[y] is 0
            return self.sums([torch.zeros(y.shape, dtype=vec.dtype, device=vec.device)])[0]
        return super().take(vec, y)


class ClassParallelLinear(torch.autograd.Function):
    """The fused layer with the weight sharded along C (a column-parallel output layer): the core's
    chunk loop (core/linear.py) for the losses, its class sums combined over the group; the
    backward runs the same loop again with the upstream gradient and sums d hidden over the group
    in one all-reduce (d weight and d bias stay local). Each chunk's collectives pair up across
    the ranks because every rank runs the same chunks (linear.py sizes them by the largest slice)."""

    @staticmethod
    def forward(ctx: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, plan: Any) -> Any:
        be, rp, lay, acc = plan
        l = run_chunks(be, rp, TorchChunks(lay, acc, h2, w, b, False, width=loss_width(rp)), y, t, keep, cw, acc, None,
                       False)[0]
        ctx.save_for_backward(h2, w, b, y, t, keep, cw)
        ctx.plan = plan
        return l

    @staticmethod
    def backward(ctx: Any, dl: Any) -> Any:
        h2, w, b, y, t, keep, cw = ctx.saved_tensors
        be, rp, lay, acc = ctx.plan
        if dl.ndim == 2:  # return_stats: the losses are column 0, the metrics carry no gradient
            dl = dl[:, 0]
        # d hidden in float32 until it is summed over the group (each worker holds a share of it)
        _, dh, dw, db = run_chunks(be, rp, TorchChunks(lay, acc, h2, w, b, True, dh_dtype=acc), y, t, keep, cw,
                                   acc, dl.to(acc), True)
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=rp.class_parallel.handle)  # every slice's share
        return dh.to(h2.dtype), dw, db, None, None, None, None, None


class ClassParallelLinearStats(torch.autograd.Function):
    """linear_token_stats with the weight sharded along C: the core's chunk loop for the packed
    outputs (core/linear_stats.py), its class sums combined over the group; the backward runs the
    loop again under the cotangents and sums d hidden over the group."""

    @staticmethod
    def forward(ctx: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any, temp: Any, plan: Any) -> Any:
        be, rp, lay, acc = plan
        tokens = linear_stats.token_arrays(y, ids, keep, temp)
        packed = linear_stats.forward(be, rp, TorchChunks(lay, acc, h2, w, b, False, width=linear_stats.width(rp)),
                                      tokens, acc)
        ctx.save_for_backward(h2, w, b, y, ids, keep, temp, packed)
        ctx.plan = plan
        return packed

    @staticmethod
    def backward(ctx: Any, dpacked: Any) -> Any:
        h2, w, b, y, ids, keep, temp, packed = ctx.saved_tensors
        be, rp, lay, acc = ctx.plan
        loop = TorchChunks(lay, acc, h2, w, b, True, dh_dtype=acc)
        dh, dw, db = linear_stats.backward(be, rp, loop, linear_stats.token_arrays(y, ids, keep, temp), packed,
                                           dpacked.to(acc), acc)
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=rp.class_parallel.handle)  # every slice's share
        return dh.to(h2.dtype), dw, db, None, None, None, None, None


class TorchClassParallel:
    def reducer(self, split: Any) -> TorchReducer:
        return TorchReducer(split)

    def check_split_handle(self, handle: Any) -> None:
        if torch.compiler.is_compiling():  # every rank compiles alike: each raises at trace time
            raise XSeqLossTypeError("class_parallel is not supported under torch.compile: its collectives "
                                    "(torch.distributed, eager) would break the graph; call the loss outside "
                                    "the compiled region, or use a DTensor with torch's own loss_parallel()")
        if not isinstance(handle, dist.ProcessGroup):
            raise XSeqLossTypeError(
                f"class_parallel={handle!r}: expected a torch.distributed ProcessGroup (PyTorch; "
                f"torch.distributed.group.WORLD for the default group) or a JAX mesh axis name (a str or a "
                f"tuple of str, inside shard_map / pmap)")

    def gather_ints(self, handle: Any, ints: list, like: Any, err: BaseException | None, extra: Any = None
                    ) -> tuple[list, int]:
        if not dist.is_available() or not dist.is_initialized():
            if err is not None:
                raise err
            raise XSeqLossError("class_parallel: torch.distributed is not initialised (call "
                                "torch.distributed.init_process_group first, e.g. under torchrun)")
        device = like.device if isinstance(like, torch.Tensor) and dist.get_backend(handle) != "gloo" else "cpu"
        mine = torch.tensor(ints, dtype=torch.int64, device=device)
        if extra is not None:
            mine = torch.cat([mine, extra.to(device)])
        out = [torch.empty_like(mine) for _ in range(dist.get_world_size(handle))]
        dist.all_gather(out, mine, group=handle)
        return [o.tolist() for o in out], dist.get_rank(handle)

    def value_checksums(self, arrays: tuple) -> Any:
        tensors = [x for x in arrays if isinstance(x, torch.Tensor)]
        device = tensors[0].device if tensors else "cpu"
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return torch.stack([checksum(x).to(device) if isinstance(x, torch.Tensor) else zero for x in arrays])

    def is_dtensor(self, x: Any) -> bool:
        import sys
        if "torch.distributed.tensor" not in sys.modules:
            return False
        from torch.distributed.tensor import DTensor
        return isinstance(x, DTensor)

    def from_dtensor(self, logits: Any, kw: dict, class_axis: int, names: tuple) -> tuple[Any, dict]:
        return from_dtensor(self, logits, kw, class_axis, names)

    def linear_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                              cw: Any, acc: Any) -> Any:
        return ClassParallelLinear.apply(h2, w, b, y, t, keep, cw, (self, rp, lay, acc))

    def linear_stats_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any,
                                    temp: Any, acc: Any) -> Any:
        tt = None if temp is None or isinstance(temp, float) else temp.detach()
        return ClassParallelLinearStats.apply(h2, w, b, y, ids, keep, tt, (self, rp, lay, acc))


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POSITIONS: dict = {}  # (n, device) -> the position weights, a few kept


def checksum(x: Any) -> Any:
    """sum(bits(x[i]) * w[i]) in int64, wrapping: the values' bits (a float's as an integer of its
    size, so -0.0 and 0.0 differ and nothing is rounded) times odd position weights, so any one
    changed value and any swap of two changes it. Integer sums wrap the same in any order: every
    worker holding the same values gets the same number, on any device."""
    v = x.detach().reshape(-1)
    if v.dtype == torch.bool:
        v = v.to(torch.int64)
    elif v.is_floating_point():
        v = v.contiguous().view(_BITS[v.element_size()]).to(torch.int64)
    else:
        v = v.to(torch.int64)
    key = (v.numel(), v.device)
    w = _POSITIONS.get(key)
    if w is None:
        if len(_POSITIONS) >= 8:
            _POSITIONS.clear()
        # the golden ratio's 64 bits (as a signed int64) times the position, made odd
        w = _POSITIONS[key] = torch.arange(v.numel(), dtype=torch.int64, device=v.device).mul_(
            -7046029254386353131).bitwise_or_(1)
    return (v * w).sum()


def from_dtensor(be: Any, logits: Any, kw: dict, class_axis: int, names: tuple) -> tuple[Any, dict]:
    """A DTensor of logits sharded along the class axis: its local slice, ``class_parallel`` set to
    the mesh dimension's process group, and every other DTensor argument as its local part. The
    other mesh dimensions replicate the logits or shard a token axis (a data x tensor mesh): the
    loss is then over this rank's tokens, the batch split left to the caller's normalizer (API.md
    9.1), as under DDP. Every check here reads the mesh and placements, which every rank shares,
    so a refusal is raised on every rank before any collective."""
    from torch.distributed.tensor import Replicate, Shard
    if kw.get("class_parallel") is not None:
        raise XSeqLossTypeError("class_parallel: the logits are a DTensor, whose placement already says how the "
                                "classes are split; pass class_parallel=None")
    nd = logits.ndim
    k = class_axis % nd
    mesh = logits.device_mesh
    dims = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim % nd == k]
    others = [(i, p) for i, p in enumerate(logits.placements)
              if i not in dims and not isinstance(p, (Replicate, Shard))]
    if len(dims) != 1 or others:
        raise XSeqLossError(f"logits are a DTensor with placements {tuple(logits.placements)} on mesh "
                            f"{tuple(mesh.mesh.shape)}: xseqloss takes a DTensor sharded along the class axis "
                            f"(Shard({k})) on exactly one mesh dimension, each other dimension replicating it or "
                            f"sharding a token axis (Shard(0) on a data dimension); redistribute it, or pass the "
                            f"local tensor with class_parallel=<group>")
    d = dims[0]
    ranks = mesh.mesh.movedim(d, -1).reshape(-1, mesh.mesh.shape[d])
    if mesh.mesh.shape[d] > 1 and not bool((ranks[:, 1:] > ranks[:, :-1]).all()):
        # the group's ranks are sorted (torch.distributed.new_group), the shards follow the mesh
        raise XSeqLossError(f"logits are a DTensor sharded along the classes over mesh dimension {d} of mesh "
                            f"{mesh.mesh.tolist()}, whose ranks do not increase along that dimension: the class "
                            f"slices would not be in the process group's rank order; order the mesh's ranks")
    group = mesh.get_group(d)
    out = dict(kw, class_parallel=group)
    for name in names:
        v = kw.get(name)
        if be.is_dtensor(v):
            out[name] = v.to_local()
    return logits.to_local(), out
