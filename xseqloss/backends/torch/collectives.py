"""PyTorch's collectives for tokens split across workers (API.md 9.1; the counts themselves are
xseqloss/distributed.py): the count summed over a process group with one scalar all-reduce, and a
failed local check on one rank made an error on every rank (it contributes NaN), never a hang."""

from __future__ import annotations

from typing import Any

import torch

from ..._errors import XSeqLossError, XSeqLossTypeError


class TorchCollectives:
    def check_workers(self, fn: str, group: Any) -> None:
        _torch_dist(fn, group)

    def workers_ready(self) -> bool:
        return bool(torch.distributed.is_available() and torch.distributed.is_initialized())

    def worker_count(self, group: Any, axis_name: Any) -> Any:
        return _torch_dist("ddp_normalizer", group).get_world_size(group)

    def sum_over_workers(self, fn: str, local: Any, targets: Any, group: Any, axis_name: Any, validate: bool) -> Any:
        return _torch_sum(fn, local, targets, group, validate)


def _torch_dist(fn: str, group: Any) -> Any:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise XSeqLossError(
            f"{fn}: torch.distributed is not initialised, so there are no other workers to sum the count over; "
            f"call torch.distributed.init_process_group(...) first (torchrun sets its environment), or use "
            f"xsl.token_count(...) in a single process")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        hint = (f"; for a DeviceMesh dimension pass mesh.get_group({group!r})" if isinstance(group, str) else
                "; for a DeviceMesh pass mesh.get_group(<dimension name>)" if type(group).__name__ == "DeviceMesh"
                else "")
        raise XSeqLossTypeError(
            f"{fn}: group must be a torch.distributed ProcessGroup (e.g. from torch.distributed.new_group) or None "
            f"for the default group, got {group!r} ({type(group).__name__}){hint}")
    return dist


def _torch_device(targets: Any, group: Any) -> Any:
    """Where the count lives when the local computation failed: the targets' device, or the
    process group's device (CUDA for NCCL)."""
    x = targets
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        x = x.data
    if isinstance(x, (list, tuple)):
        x = next((v for v in x if isinstance(v, torch.Tensor)), None)
    if isinstance(x, torch.Tensor):
        return x.device
    try:
        if torch.distributed.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    except Exception:  # pragma: no cover - exotic groups
        pass
    return torch.device("cpu")


def _torch_sum(fn: str, local: Any, targets: Any, group: Any, validate: bool) -> Any:
    dist = torch.distributed
    compiling = torch.compiler.is_compiling()
    try:
        count = local()
        failure = None
    except Exception as exc:  # take part in the collective anyway (NaN), then raise: nobody hangs
        if compiling:
            raise
        count, failure = None, exc
    if failure is None:
        buf = count.detach().to(torch.float64)  # exact for integer counts below 2**53, any dtype alike
    else:
        buf = torch.full((), float("nan"), dtype=torch.float64, device=_torch_device(targets, group))
    buf = buf.clone()  # all_reduce works in place: never on the caller's tensor
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    if failure is not None:
        raise failure
    if validate and not compiling and not bool(torch.isfinite(buf)):
        raise XSeqLossError(
            f"{fn}: the count summed over the process group is not finite: another rank's local check failed "
            f"(that rank raised the error that names the argument); every rank raises so that none waits in "
            f"the all-reduce")
    return buf.to(count.dtype)


