"""PyTorch backend: the fused native cross-entropy with classes at dim 1; side arrays follow the
logits' device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import XSeqLossTypeError
from . import _common


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


class TorchBackend:
    name = "torch"
    type_name = "a torch.Tensor"

    # ---- conversion and inspection
    def convert(self, x: Any, argument: str, like: Any = None) -> Any:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover
            raise XSeqLossTypeError(f"{argument} could not be converted to an array: {exc}") from exc
        if arr.dtype.name == "bfloat16":  # ml_dtypes: torch cannot read it directly
            return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16, device=None if like is None else like.device)
        return torch.as_tensor(arr, device=None if like is None else like.device)

    def to_device(self, x: Any, like: Any) -> Any:
        return x if like is None or x.device == like.device else x.to(like.device)

    def kind(self, x: Any) -> str:
        d = x.dtype
        if d.is_floating_point:
            return "f"
        if d == torch.bool:
            return "b"
        if d.is_complex:
            return "c"
        return "i" if d.is_signed else "u"

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).replace("torch.", "")

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def tracing(self, x: Any) -> bool:
        return _compiling()

    def index_dtype(self, y: Any) -> Any:
        return y if y.dtype == torch.int64 else y.long()

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()

    def any_true(self, x: Any) -> bool:
        return bool(x.any())

    def isfinite_any_dtype(self, x: Any) -> Any:
        return torch.isfinite(x)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == torch.bool else m != 0

    def sample_rows(self, z: Any, k: int, n: int) -> np.ndarray:
        return _common.rows(self.to_numpy(z[_common.sample_index(tuple(z.shape), k, n)]), k)

    def run(self, fn: Any, st: Any, *arrays: Any) -> Any:
        return fn(self, st, *arrays)

    def value_and_grad(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            out = fn(self, st, zz, *arrays)
            (g,) = torch.autograd.grad(out.sum(), zz)
        return out.detach(), g

    # ---- ops
    def acc_dtype(self, z: Any) -> Any:
        return torch.float64 if z.dtype == torch.float64 else torch.float32

    def cast(self, x: Any, dtype: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(dtype)
        return torch.tensor(x, dtype=dtype)

    def where(self, c: Any, a: Any, b: Any) -> Any:
        return torch.where(c, a, b)

    def expand(self, x: Any, axis: int) -> Any:
        return x.unsqueeze(axis)

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    tanh = staticmethod(torch.tanh)
    abs = staticmethod(torch.abs)
    isfinite = staticmethod(torch.isfinite)
    zeros_like = staticmethod(torch.zeros_like)

    def maximum(self, x: Any, v: float) -> Any:
        return torch.clamp_min(x, v)

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def sum(self, x: Any, axis: Any) -> Any:
        return x.sum() if axis is None else x.sum(dim=axis)

    def max(self, x: Any, axis: int) -> Any:
        return x.amax(dim=axis)

    def min(self, x: Any, axis: int) -> Any:
        return x.amin(dim=axis)

    def any(self, x: Any, axis: int) -> Any:
        return x.any(dim=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return flags.sum(dtype=torch.int64) if axis is None else flags.sum(dim=axis, dtype=torch.int64)

    def logsumexp(self, x: Any, k: int) -> Any:
        return _common.logsumexp(self, x, k)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any) -> Any:
        """lse - z[y] through F.cross_entropy, classes at dim 1 (C last: flattened to (tokens, C))."""
        x = z.to(acc)
        if keep is not None:
            x = torch.where(keep.unsqueeze(k), x, 0.0)
        if x.ndim == 1:
            l = F.cross_entropy(x, y, reduction="none")
        elif k == x.ndim - 1:
            l = F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape)
        else:  # moving C to dim 1 keeps the other axes in order, so targets fit unchanged
            l = F.cross_entropy(x.movedim(k, 1), y, reduction="none")
        return l if keep is None else torch.where(keep, l, 0.0)

    def take(self, vec: Any, idx: Any) -> Any:
        return vec[idx]

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        return torch.gather(x, k, y.unsqueeze(k)).squeeze(k)

    def classdot(self, x: Any, w: Any, k: int) -> Any:
        return torch.movedim(x, k, -1) @ w

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        return g.scatter_add(k, y.unsqueeze(k), vals.unsqueeze(k).to(g.dtype))

    def reshape_class(self, w: Any, k: int, ndim: int) -> Any:
        shape = [1] * ndim
        shape[k] = -1
        return w.reshape(shape)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return torch.full(like.shape, value, dtype=dtype, device=like.device)

    def true_like(self, like: Any) -> Any:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)

    def drop_class(self, z: Any, k: int) -> Any:
        return z.select(k, 0)

    def dim(self, x: Any, axis: int) -> int:
        return x.shape[axis]

    def ndim(self, x: Any) -> int:
        return x.ndim

    def size(self, x: Any) -> Any:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)

    def arange(self, n: int, like: Any) -> Any:
        return torch.arange(n, device=like.device, dtype=like.dtype)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return torch.movedim(x, src, dst)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[torch.arange(h.shape[0], device=h.device), idx]

    @staticmethod
    def version() -> str:
        return torch.__version__

    @staticmethod
    def devices() -> list[str]:
        devs = ["cpu"]
        if torch.cuda.is_available():
            devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return devs


BACKEND = TorchBackend()
