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

    def any(self, x: Any, axis: Any) -> Any:
        return x.any() if axis is None else x.any(dim=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return x.all() if axis is None else x.all(dim=axis)

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


# ------------------------------------------------------------------------ fused forward+backward
#
# F.cross_entropy's forward+backward makes several logits-sized passes and buffers (log_softmax
# output, its gradient, the scatter). Here the gradient is computed during the forward pass, chunk by
# chunk while the chunk is in cache, into one logits-sized buffer (or into the logits' own storage
# with inplace_backward=True, Liger Kernel's trick); backward only scales it by the per-token upstream
# gradient. The general options reuse _loss.token_loss per chunk, so the semantics stay in one place.

_CHUNK_ELEMENTS = 1 << 21  # ~8 MB of float32 per chunk: stays in cache, amortises op dispatch
_HUGE = 1 << 21            # 2 MB: a transparent huge page on x86-64 Linux
_MIN_HUGE_BYTES = 64 << 20


def _madvise_hugepage() -> Any:
    try:
        import ctypes
        import sys

        if not sys.platform.startswith("linux"):
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except Exception:  # pragma: no cover - no libc: plain buffers
        return None


_MADVISE = _madvise_hugepage()


def _gradient_buffer(z: Any) -> Any:
    """A buffer like z for the gradient. On CPU, a large one is 2 MB-aligned and advised as
    transparent huge pages (what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation): the
    first touch of a fresh 1 GB buffer then costs ~0.1 s instead of ~0.4 s of 4 kB page faults."""
    nbytes = z.numel() * z.element_size()
    if z.device.type != "cpu" or _MADVISE is None or nbytes < _MIN_HUGE_BYTES or not z.is_contiguous():
        return torch.empty_like(z)
    pad = _HUGE // z.element_size()
    raw = torch.empty(z.numel() + pad, dtype=z.dtype)
    off = ((-raw.data_ptr()) % _HUGE) // z.element_size()
    buf = raw[off:off + z.numel()].view(z.shape)
    _MADVISE(buf.data_ptr(), (nbytes // _HUGE) * _HUGE, 14)  # MADV_HUGEPAGE; a failure is harmless
    return buf


def _chunks(z: Any, k: int) -> tuple[int, Any]:
    """(class axis of a chunk, generator of chunk indices over z)."""
    C = z.shape[k]
    if k == z.ndim - 1 and z.is_contiguous():
        rows = max(1, _CHUNK_ELEMENTS // max(C, 1))
        M = z.numel() // max(C, 1)
        return 1, ((slice(i, min(i + rows, M)),) for i in range(0, M, rows))
    # another layout: slabs along the first non-class axis, computed along the native class axis
    a0 = 0 if k != 0 else 1
    per = max(1, z.numel() // max(z.shape[a0], 1))
    step = max(1, _CHUNK_ELEMENTS // per)
    return k, (tuple([slice(None)] * a0 + [slice(i, min(i + step, z.shape[a0]))])
               for i in range(0, z.shape[a0], step))


def _tok_index(idx: tuple, k: int) -> tuple:
    """The token-array index matching a slab index over z (the class axis dropped)."""
    return tuple(s for a, s in enumerate(idx) if a != k)


def _plain_chunk(x: Any, y: Any, keep: Any, g: Any, kk: int, want_grad: bool) -> Any:
    """lse - x[y] for one chunk; if want_grad, softmax - onehot written into g (float32/64 chunk)."""
    m = x.amax(kk, keepdim=True)
    m = torch.where(m == -torch.inf, 0.0, m)
    xy = x.gather(kk, y.unsqueeze(kk))
    torch.sub(x, m, out=g)  # g may alias x (inplace_backward in the logits' own dtype)
    g.exp_()
    s = g.sum(kk, keepdim=True)
    l = (m + s.log() - xy).squeeze(kk)
    if want_grad:
        g.div_(s)
        g.scatter_add_(kk, y.unsqueeze(kk), torch.full_like(xy, -1.0))
        if keep is not None:
            g.masked_fill_(~keep.unsqueeze(kk), 0.0)  # exact 0 even where the row holds NaN
    return l if keep is None else torch.where(keep, l, 0.0)


def _run_chunks(be: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                gbuf: Any) -> Any:
    """Per-token losses (acc dtype); with gbuf, dl/dz written into it (gbuf may be z itself)."""
    from .. import _loss

    k = st.opts.k
    want_grad = gbuf is not None
    kk, chunks = _chunks(z, k)
    rows = kk == 1 and k == z.ndim - 1 and z.is_contiguous()
    C = z.shape[k]
    tok_shape = tuple(d for a, d in enumerate(z.shape) if a != k)
    out = torch.empty(tok_shape, dtype=acc, device=z.device)
    zf = z.reshape(-1, C) if rows else z
    gf = None if gbuf is None else (gbuf.reshape(-1, C) if rows else gbuf)
    of = out.reshape(-1) if rows else out
    yf = None if y is None else (y.reshape(-1) if rows else y)
    kf = None if keep is None else (keep.reshape(-1) if rows else keep)
    tf_ = None if t is None else (t.reshape(-1, C) if rows else t)
    scratch = None
    for idx in chunks:
        ti = idx if rows else _tok_index(idx, k)
        zc = zf[idx]
        kc = None if kf is None else kf[ti]
        if st.plain:
            x = zc if zc.dtype == acc else zc.to(acc)
            if gf is not None and gf.dtype == acc:
                g = gf[idx]  # write straight into the gradient buffer (or the logits, inplace)
            else:
                if scratch is None or scratch.shape != x.shape:
                    scratch = torch.empty_like(x)
                g = scratch
            of[ti] = _plain_chunk(x, yf[ti], kc, g, kk, want_grad)
            if gf is not None and g is not gf[idx] and gf.dtype != acc:
                gf[idx].copy_(g)
        else:
            l, g = _loss.token_loss(be, st, zc, None if yf is None else yf[ti], None if tf_ is None else tf_[idx],
                                    kc, cw, acc, want_grad, k=kk)
            of[ti] = l
            if gf is not None:
                gf[idx].copy_(g)
    return out


class _FusedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, st: Any, acc: Any, be: Any) -> Any:
        gbuf = z.detach() if st.opts.inplace else _gradient_buffer(z)
        out = _run_chunks(be, st, z.detach(), y, t, keep, cw, acc, gbuf)
        ctx.gbuf, ctx.k = gbuf, st.opts.k
        # kept only to recompute the gradient for a second backward (retain_graph=True, gradcheck)
        ctx.again = None if st.opts.inplace else (z.detach(), y, t, keep, cw, st, acc, be)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # second-order use raises instead of giving 0
    def backward(ctx: Any, dl: Any) -> Any:
        g = ctx.gbuf
        if g is None:  # the stored gradient was scaled in place by the first backward: recompute it
            if ctx.again is None:
                raise RuntimeError("xseqloss: with inplace_backward=True the gradient lives in the logits' "
                                   "storage and backward runs once; compute the loss again")
            z, y, t, keep, cw, st, acc, be = ctx.again
            g = _gradient_buffer(z)
            _run_chunks(be, st, z, y, t, keep, cw, acc, g)
        ctx.gbuf = None
        g.mul_(dl.unsqueeze(ctx.k).to(g.dtype))
        return g, None, None, None, None, None, None, None


def _fused_token_loss(self: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any) -> Any:
    if _compiling() or z.numel() == 0:
        return None  # inductor fuses the generic path itself; the chunk loop would unroll
    needs_grad = torch.is_grad_enabled() and z.requires_grad
    if needs_grad:
        if (t is not None and t.requires_grad) or (cw is not None and cw.requires_grad):
            return None  # gradients into targets/class weights: plain autograd
        return _FusedTokenLoss.apply(z, y, t, keep, cw, st, acc, self)
    with torch.no_grad():  # forward only: no gradient buffer at all
        return _run_chunks(self, st, z, y, t, keep, cw, acc, None)


TorchBackend.fused_token_loss = _fused_token_loss  # type: ignore[attr-defined]
