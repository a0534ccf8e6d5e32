"""PyTorch's ops: conversion (side arrays follow the logits' device), inspection, running the core
eagerly (inductor fuses it under torch.compile), the array ops, and the plain kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..._errors import CompiledXSeqLossError, CompiledXSeqLossTypeError, XSeqLossError, XSeqLossTypeError


def compiling() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


_AT_TRACE_TIME = {"XSeqLossError": CompiledXSeqLossError, "XSeqLossTypeError": CompiledXSeqLossTypeError}
_NUMBER_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}  # np.asarray's for each


def _assume_constant_result(fn: Any) -> Any:
    """``torch._dynamo.assume_constant_result(fn)`` without importing torch._dynamo at load (1.2 s on
    the first torch call): the decorator sets this one attribute (torch 2.1-2.13), which
    tests/test_compile.py checks it still does."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def raise_at_trace_time(kind: str, message: str) -> None:
    """A static error under torch.compile, raised at trace time (api/compiled.py): dynamo runs an
    assume_constant_result function for real, and re-raises AssertionError from compilation
    unchanged; the classes are ours first, so ``except XSeqLossError`` and the message behave as in
    eager mode (decisions.md item 23)."""
    raise _AT_TRACE_TIME[kind](message)


class TorchOps:
    raise_at_trace_time = staticmethod(raise_at_trace_time)
    name = "torch"
    host_probe = True  # eager: the softmax-input probe reads a few rows on the host
    type_name = "a torch.Tensor"

    # ---- conversion and inspection
    def convert(self, x: Any, argument: str, like: Any = None) -> Any:
        if type(x) in _NUMBER_DTYPES:  # NumPy's dtype without np.asarray (torch.compile cannot trace it)
            return torch.tensor(x, dtype=_NUMBER_DTYPES[type(x)], device=None if like is None else like.device)
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
        return compiling()

    def index_dtype(self, y: Any) -> Any:
        """int64 labels; uint64 values past int64's range saturate at its maximum instead of
        wrapping (2**64 - 100 must not become -100, the ignore value; see numpy.py)."""
        if y.dtype == torch.uint64:  # few ops take uint64: reinterpret, then a negative means >= 2**63
            v = y.view(torch.int64)
            return torch.where(v < 0, torch.iinfo(torch.int64).max, v)
        return y if y.dtype == torch.int64 else y.long()

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()

    def host_view(self, x: Any) -> Any:
        """The tensor as a NumPy array without a copy (CPU), or None."""
        if x.device.type != "cpu" or x.dtype == torch.bfloat16:
            return None
        return x.detach().numpy()

    def any_true(self, x: Any) -> bool:
        return bool(x.any())

    def isfinite_any_dtype(self, x: Any) -> Any:
        return torch.isfinite(x)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == torch.bool else m != 0


    def run(self, fn: Any, st: Any, *arrays: Any) -> Any:
        return fn(self, st, *arrays)

    def check_inplace(self, z: Any) -> None:
        """inplace_backward=True needs logits whose elements have storage of their own."""
        if not compiling() and torch._debug_has_internal_overlap(z) == 1:
            raise XSeqLossError(
                f"inplace_backward=True writes the gradient into the logits' own storage, but these logits "
                f"share memory between elements (shape {tuple(z.shape)}, strides {tuple(z.stride())}: an "
                f"expand()ed or other stride-0 view), so one gradient entry would overwrite another; pass "
                f"logits with their own storage (logits.contiguous()) or drop inplace_backward")

    def value_and_grad(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            out = fn(self, st, zz, *arrays)
            (g,) = torch.autograd.grad(out.sum(), zz)
        return out.detach(), g

    # ---- ops
    def stack(self, xs: Any) -> Any:
        return torch.stack(xs)

    def acc_dtype(self, z: Any) -> Any:
        return torch.float64 if z.dtype == torch.float64 else torch.float32

    def wide_dtype(self) -> Any:
        return torch.float64

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

    def max(self, x: Any, axis: Any) -> Any:
        if x.numel() == 0:  # a class-split worker holding 0 classes: the max of nothing
            return _empty_reduce(x, axis, -float("inf"))
        return x.amax() if axis is None else x.amax(dim=axis)

    def min(self, x: Any, axis: int) -> Any:
        if x.numel() == 0:
            return _empty_reduce(x, axis, float("inf"))
        return x.amin(dim=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return x.any() if axis is None else x.any(dim=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return x.all() if axis is None else x.all(dim=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return flags.sum(dtype=torch.int64) if axis is None else flags.sum(dim=axis, dtype=torch.int64)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse - z[y] through F.cross_entropy, classes at dim 1 (C last: flattened to (tokens, C))."""
        x = z.to(acc)
        if keep is not None:
            x = torch.where(keep.unsqueeze(k), x, 0.0)
        l = cross_entropy(x, y, NO_IGNORE, "none", x.shape[k], k)  # labels already clamped into [0, C)
        return l if keep is None else torch.where(keep, l, 0.0)

    def plain_ce(self, z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None, out: Any = None) -> Any:
        """The plain kernel (plan/ops.py): the gradient formed in ``out`` when it has the
        accumulation dtype (the logits themselves with inplace_backward), else in a new buffer."""
        x = z if z.dtype == acc else z.to(acc)
        g = out if out is not None and out.dtype == acc and out.shape == x.shape else torch.empty_like(x)
        l = plain_rows(x, y, keep, g, k, scale is not None, None if scale is None else scale.unsqueeze(k))
        if scale is None:
            return l, None
        return l, (g if g.dtype == z.dtype else g.to(z.dtype))

    def take(self, vec: Any, idx: Any) -> Any:
        if vec.shape[0] == 0 and idx.numel():  # a class-split worker's empty class-weight slice: owns no y
            return vec.new_zeros(idx.shape)
        return vec[idx]

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        if x.shape[k] == 0:  # a class-split worker holding 0 classes: it owns no target (0 there)
            return x.sum(dim=k)
        return torch.gather(x, k, y.unsqueeze(k)).squeeze(k)

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        """In place when autograd does not record g (the contract allows it, as NumPy's does: every
        caller passes a gradient it has just formed), saving a copy of the whole array."""
        if g.shape[k] == 0:
            return g
        if g.requires_grad:
            return g.scatter_add(k, y.unsqueeze(k), vals.unsqueeze(k).to(g.dtype))
        return g.scatter_add_(k, y.unsqueeze(k), vals.unsqueeze(k).to(g.dtype))

    def reshape_class(self, w: Any, k: int, ndim: int) -> Any:
        shape = [1] * ndim
        shape[k] = w.shape[0]  # not -1: a class-split worker's slice may be empty
        return w.reshape(shape)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return torch.full(like.shape, value, dtype=dtype, device=like.device)

    def true_like(self, like: Any) -> Any:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)

    def drop_class(self, z: Any, k: int) -> Any:
        if z.shape[k] == 0:  # a class-split worker holding 0 classes: a token-shaped array all the same
            return z.sum(dim=k)
        return z.select(k, 0)

    def dim(self, x: Any, axis: int) -> int:
        return x.shape[axis]

    def ndim(self, x: Any) -> int:
        return x.ndim

    def size(self, x: Any) -> Any:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 on like's device, in like's integer dtype (int64 for a floating like)."""
        dt = like.dtype if not (like.dtype.is_floating_point or like.dtype == torch.bool) else torch.int64
        return torch.arange(n, device=like.device, dtype=dt)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return torch.movedim(x, src, dst)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def as_index(self, x: Any) -> Any:
        return x.long()

    def argmax(self, x: Any, k: int) -> Any:
        if x.shape[k] == 0:  # 0 classes here: its max is -inf (core.token_loss.argmax_of)
            return torch.zeros(x.sum(dim=k).shape, dtype=torch.int64, device=x.device)
        return torch.argmax(x, dim=k)  # "the indices of the first maximal value"

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[torch.arange(h.shape[0], device=h.device), idx]

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def concat(self, xs: Any, axis: int) -> Any:
        return torch.cat(xs, dim=axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return torch.full_like(x, value)

    def cumsum(self, x: Any, axis: int) -> Any:
        return torch.cumsum(x, dim=axis)

    def segment_sum(self, v: Any, j: Any) -> Any:
        return torch.zeros_like(v).scatter_add(1, j, v)

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        if x.shape[axis] == 0 and idx.numel():  # 0 classes on this worker: it owns no id (0 there)
            return x.new_zeros(idx.shape)
        return torch.gather(x, axis, idx)

    def flat(self, x: Any) -> Any:
        return x.reshape(-1)

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        return torch.zeros(int(size), dtype=v.dtype, device=v.device).index_put((idx,), v)

    def reshape_like(self, x: Any, like: Any) -> Any:
        return x.reshape(like.shape)

    def reshape_rows(self, x: Any) -> Any:
        # the leading axes merged, not reshape(-1, H): an H of 0 leaves -1 undetermined
        return x.flatten(0, -2) if x.ndim > 1 else x.unsqueeze(0)

    def size_of(self, x: Any) -> int:
        return x.numel()

    def pad_stack(self, items: Any, T: int, fill: Any) -> Any:
        """Per-sequence tensors (length, ...) as one (N, T, ...) tensor, ``fill`` past each length
        (differentiable: gradients reach each item)."""
        if not items:
            return torch.zeros(0, T, dtype=torch.long)
        out = torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True, padding_value=fill)
        if out.shape[1] < T:
            pad = out.new_full((out.shape[0], T - out.shape[1], *out.shape[2:]), fill)
            out = torch.cat([out, pad], 1)
        return out

    def permute(self, x: Any, perm: Any) -> Any:
        return x.permute(*perm)

    def zeros_shape(self, shape: Any, like: Any) -> Any:
        return torch.zeros(shape, device=like.device)

    @staticmethod
    def version() -> str:
        return torch.__version__

    @staticmethod
    def devices() -> list[str]:
        devs = ["cpu"]
        if torch.cuda.is_available():
            devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return devs


NO_IGNORE = -(1 << 63)  # an ignore value no label equals


def plain_rows(x: Any, y: Any, keep: Any, g: Any, kk: int, want_grad: bool, scale: Any = None) -> Any:
    """lse - x[y] for one chunk; if want_grad, (softmax - onehot) * scale written into g (float32/64
    chunk; scale per row, keepdim, or None for 1)."""
    m = x.amax(kk, keepdim=True)
    m = torch.where(m == -torch.inf, 0.0, m)
    xy = x.gather(kk, y.unsqueeze(kk))
    torch.sub(x, m, out=g)  # g may alias x (inplace_backward in the logits' own dtype)
    g.exp_()
    s = g.sum(kk, keepdim=True)
    l = (s.log() - (xy - m)).squeeze(kk)  # the max-shifted frame (exact near 1e4)
    if want_grad:
        if scale is None:
            g.div_(s)
            g.scatter_add_(kk, y.unsqueeze(kk), torch.full_like(xy, -1.0))
        else:
            g.mul_(scale / s)
            g.scatter_add_(kk, y.unsqueeze(kk), -scale.to(g.dtype))
        if keep is not None:
            zero_rows(g, keep, kk)
    return l if keep is None else torch.where(keep, l, 0.0)


def zero_rows(g: Any, keep: Any, kk: int) -> None:
    """Exact 0 in the gradient rows that do not count, even where the row holds NaN."""
    if g.device.type == "cpu" and g.ndim == 2 and kk == 1:
        drop = (~keep).nonzero().squeeze(1)  # a broadcast masked_fill_ is ~10x slower on CPU
        if drop.numel():
            g.index_fill_(0, drop, 0.0)
    else:
        g.masked_fill_(~keep.unsqueeze(kk), 0.0)


def cross_entropy(z: Any, y: Any, ig: int, red: str, C: int, k: int) -> Any:
    """F.cross_entropy with the classes along axis k of z (targets: z's other axes, in order)."""
    if z.ndim == 1:
        return F.cross_entropy(z, y, ignore_index=ig, reduction=red)
    if k == z.ndim - 1:
        l = F.cross_entropy(z.reshape(-1, C), y.reshape(-1), ignore_index=ig, reduction=red)
        return l.reshape(y.shape) if red == "none" else l
    # classes moved to dim 1: the other axes keep their order, as the targets'
    return F.cross_entropy(z.movedim(k, 1), y, ignore_index=ig, reduction=red)


def _empty_reduce(x: Any, axis: Any, fill: float) -> Any:
    """A max / min of an empty array (a class-split worker holding 0 classes): ``fill`` in the
    reduced shape."""
    shape = () if axis is None else tuple(d for i, d in enumerate(x.shape) if i != axis % x.ndim)
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)
