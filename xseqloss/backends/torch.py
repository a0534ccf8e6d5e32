"""PyTorch backend: the fused native cross-entropy with classes at dim 1; side arrays follow the
logits' device."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import XSeqLossError, XSeqLossTypeError
from . import _common


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


# Static errors under torch.compile (_errors.keep_type_when_compiled): dynamo runs an
# assume_constant_result function for real at trace time, and re-raises AssertionError from
# compilation unchanged; the subclasses below are our classes first, so `except XSeqLossError`
# and the message behave as in eager mode.
class CompiledXSeqLossError(XSeqLossError, AssertionError):
    """XSeqLossError raised while torch.compile traces the call."""


class CompiledXSeqLossTypeError(XSeqLossTypeError, AssertionError):
    """XSeqLossTypeError raised while torch.compile traces the call."""


_AT_TRACE_TIME = {"XSeqLossError": CompiledXSeqLossError, "XSeqLossTypeError": CompiledXSeqLossTypeError}


@torch._dynamo.assume_constant_result
def raise_at_trace_time(kind: str, message: str) -> None:
    raise _AT_TRACE_TIME[kind](message)


class TorchBackend:
    name = "torch"
    host_probe = True  # eager: the softmax-input probe reads a few rows on the host
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
        if not _compiling() and torch._debug_has_internal_overlap(z) == 1:
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

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse - z[y] through F.cross_entropy, classes at dim 1 (C last: flattened to (tokens, C))."""
        x = z.to(acc)
        if keep is not None:
            x = torch.where(keep.unsqueeze(k), x, 0.0)
        l = _cross_entropy(x, y, _NO_IGNORE, "none", x.shape[k], k)  # labels already clamped into [0, C)
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
        """0..n-1 on like's device, in like's integer dtype (int64 for a floating like)."""
        dt = like.dtype if not (like.dtype.is_floating_point or like.dtype == torch.bool) else torch.int64
        return torch.arange(n, device=like.device, dtype=dt)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return torch.movedim(x, src, dst)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[torch.arange(h.shape[0], device=h.device), idx]

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def shift(self, x: Any, k: int, axis: int, fill: Any) -> Any:
        return _common.shift(self, x, k, axis, fill)

    def concat(self, xs: Any, axis: int) -> Any:
        return torch.cat(xs, dim=axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return torch.full_like(x, value)

    def cumsum(self, x: Any, axis: int) -> Any:
        return torch.cumsum(x, dim=axis)

    def segment_sum(self, v: Any, j: Any) -> Any:
        return torch.zeros_like(v).scatter_add(1, j, v)

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        return torch.gather(x, axis, idx)

    def flat(self, x: Any) -> Any:
        return x.reshape(-1)

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        return torch.zeros(int(size), dtype=v.dtype, device=v.device).index_put((idx,), v)

    def reshape_like(self, x: Any, like: Any) -> Any:
        return x.reshape(like.shape)

    def reshape_rows(self, x: Any) -> Any:
        return x.reshape(-1, x.shape[-1])

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

    def moveaxis_to(self, x: Any, src: str, dst: str) -> Any:
        return _common.moveaxis_to(self, x, src, dst)

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


BACKEND = TorchBackend()


# ------------------------------------------------------------------------ fused forward+backward
#
# F.cross_entropy's forward+backward makes several logits-sized passes and buffers (log_softmax
# output, its gradient, the scatter). Here the gradient is computed during the forward pass, chunk by
# chunk while the chunk is in cache, into one logits-sized buffer (or into the logits' own storage
# with inplace_backward=True, Liger Kernel's trick); backward only scales it by the per-token upstream
# gradient. The general options reuse _token_loss.token_loss per chunk, so the semantics stay in one place.

# The sizes (_engine.Engine): chunks of ~8 MB of float32 stay in cache and amortise op dispatch;
# the reusable gradient buffer serves logits of 64 MB and more.


class _BufferCache:
    """One reusable CPU gradient buffer.

    PyTorch's CPU allocator returns large blocks to the OS on free, so every step's fresh 1 GB
    gradient would pay ~0.2-0.4 s of page faults on first touch (more than the loss itself). The
    slot keeps the last large buffer and hands it out again only when nothing else references its
    storage: not the user (``z.grad``), not a pending backward (``ctx``), not a view. On CUDA the
    caching allocator already does this. ``xseqloss.torch.empty_cache()`` releases the slot.
    """

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.raw: Any = None
        probe = torch.empty(1)
        self.idle = self._uses(probe)  # the count when only the slot's own tensor holds the storage

    @staticmethod
    def _uses(t: Any) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def get(self, z: Any, min_bytes: int) -> Any:
        n, nbytes = z.numel(), z.numel() * z.element_size()
        if z.device.type != "cpu" or nbytes < min_bytes or not z.is_contiguous():
            return torch.empty_like(z)
        with self.lock:
            raw = self.raw
            if (raw is None or raw.dtype != z.dtype or not (n <= raw.numel() <= 2 * n)
                    or self._uses(raw) != self.idle):
                raw = self.raw = None  # release the old one (if unused) before allocating
                raw = self.raw = torch.empty(n, dtype=z.dtype)
            # a new tensor object over the storage (never the slot's own): autograd then adopts it
            # as .grad without a copy, and the storage's use count tells when it is free again
            return raw[:n].view(z.shape)

    def clear(self) -> None:
        with self.lock:
            self.raw = None


try:
    _BUFFERS: Any = _BufferCache()
except Exception:  # pragma: no cover - a torch without storage use counts: plain buffers
    _BUFFERS = None


def _gradient_buffer(z: Any, st: Any) -> Any:
    return torch.empty_like(z) if _BUFFERS is None else _BUFFERS.get(z, st.engine.buffer_min_bytes)


def empty_cache() -> None:
    """Release the reusable CPU gradient buffer (it is reallocated on the next large backward)."""
    if _BUFFERS is not None:
        _BUFFERS.clear()


def _chunks(z: Any, k: int, chunk_elements: int, C_rows: int | None = None) -> tuple[int, Any]:
    """(class axis of a chunk, generator of chunk indices over z). ``C_rows``: the class count that
    sizes the chunks (classes split across workers: the global C, so that every worker runs the
    same chunks and their collectives pair up)."""
    C = z.shape[k]
    Cr = C if C_rows is None else C_rows
    if k == z.ndim - 1 and z.is_contiguous():
        rows = max(1, chunk_elements // max(Cr, 1))
        M = z.numel() // max(C, 1)
        return 1, ((slice(i, min(i + rows, M)),) for i in range(0, M, rows))
    # another layout: slabs along the first non-class axis, computed along the native class axis
    a0 = 0 if k != 0 else 1
    per = max(1, (z.numel() // max(z.shape[a0], 1)) // max(C, 1) * Cr)
    step = max(1, chunk_elements // per)
    return k, (tuple([slice(None)] * a0 + [slice(i, min(i + step, z.shape[a0]))])
               for i in range(0, z.shape[a0], step))


def _tok_index(idx: tuple, k: int) -> tuple:
    """The token-array index matching a slab index over z (the class axis dropped)."""
    return tuple(s for a, s in enumerate(idx) if a != k)


def _plain_chunk(x: Any, y: Any, keep: Any, g: Any, kk: int, want_grad: bool, scale: Any = None) -> Any:
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
            _zero_rows(g, keep, kk)
    return l if keep is None else torch.where(keep, l, 0.0)


def _zero_rows(g: Any, keep: Any, kk: int) -> None:
    """Exact 0 in the gradient rows that do not count, even where the row holds NaN."""
    if g.device.type == "cpu" and g.ndim == 2 and kk == 1:
        drop = (~keep).nonzero().squeeze(1)  # a broadcast masked_fill_ is ~10x slower on CPU
        if drop.numel():
            g.index_fill_(0, drop, 0.0)
    else:
        g.masked_fill_(~keep.unsqueeze(kk), 0.0)


def _run_chunks(be: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                gbuf: Any, scale: Any = None) -> Any:
    """Per-token losses (acc dtype); with gbuf, dl/dz times ``scale`` (token-shaped, acc dtype, or
    None for 1) written into it (gbuf may be z itself)."""
    from .. import _token_loss

    if st.engine.kernel == "triton" and _triton_covers(st, z, t, gbuf):
        return _run_triton(st, z, y, keep, cw, acc, gbuf, scale)
    k = st.opts.k
    want_grad = gbuf is not None
    cp = st.class_parallel  # chunks sized by the global C (every worker runs the same ones), each
    # worker's share of a chunk about chunk_elements: fewer collectives
    kk, chunks = _chunks(z, k, st.engine.chunk_elements if cp is None else st.engine.chunk_elements * len(cp.sizes),
                         None if cp is None else cp.C)
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
    sf = None if scale is None else (scale.reshape(-1) if rows else scale)
    scratch = None
    for idx in chunks:
        ti = idx if rows else _tok_index(idx, k)
        zc = zf[idx]
        kc = None if kf is None else kf[ti]
        sc = None if sf is None else sf[ti].unsqueeze(kk)
        if st.plain:
            x = zc if zc.dtype == acc else zc.to(acc)
            if gf is not None and gf.dtype == acc:
                g = gf[idx]  # write straight into the gradient buffer (or the logits, inplace)
            else:
                if scratch is None or scratch.shape != x.shape:
                    scratch = torch.empty_like(x)
                g = scratch
            of[ti] = _plain_chunk(x, yf[ti], kc, g, kk, want_grad, sc)
            if gf is not None and g is not gf[idx] and gf.dtype != acc:
                gf[idx].copy_(g)
        else:
            l, g = _token_loss.token_loss(be, st, zc, None if yf is None else yf[ti], None if tf_ is None else tf_[idx],
                                    kc, cw, acc, want_grad, k=kk)
            of[ti] = l
            if gf is not None:
                if sc is None:
                    gf[idx].copy_(g)
                elif gf.dtype == g.dtype:
                    torch.mul(g, sc, out=gf[idx])  # scale and store in one pass
                else:
                    gf[idx].copy_(g.mul_(sc))
    return out


def _triton_covers(st: Any, z: Any, t: Any, gbuf: Any) -> bool:
    """The Triton kernel (torch_triton.py) covers this call: logits with index targets, classes
    last in contiguous rows, float32/16-bit, the gradient (if any) in a buffer of z's dtype; on
    CUDA, or on CPU under TRITON_INTERPRET=1. Everything else runs the chunked kernel."""
    if t is not None or st.opts.inputs != "logits" or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if st.class_parallel is not None:  # its class sums are combined across workers by the chunked kernel
        return False
    if st.opts.k != z.ndim - 1 or not z.is_contiguous():
        return False
    if gbuf is not None and (gbuf.dtype != z.dtype or not gbuf.is_contiguous() or gbuf.shape != z.shape):
        return False
    from . import torch_triton
    return torch_triton.available() and (z.device.type == "cuda" or torch_triton._interpret_requested())


def _run_triton(st: Any, z: Any, y: Any, keep: Any, cw: Any, acc: Any, gbuf: Any, scale: Any) -> Any:
    """One pass over the logits: per-token losses (float32) and, with gbuf, the gradient times
    ``scale`` written into it (gbuf may be z itself: inplace_backward). The rules (which rows count,
    the coefficient, the NaN marks) arrive as arrays from the core, as for the chunked kernel."""
    from . import torch_triton
    C = z.shape[-1]
    tok_shape = z.shape[:-1]
    f = lambda a: None if a is None else a.reshape(-1)  # noqa: E731
    l = torch_triton.token_loss_triton(
        z.reshape(-1, C), f(y).to(torch.int64), f(keep), None if cw is None else cw.to(torch.float32),
        None if scale is None else f(scale).to(torch.float32).contiguous(), eps=float(st.eps),
        z_loss=float(st.opts.z_loss), cap=st.opts.cap, out=None if gbuf is None else gbuf.reshape(-1, C))
    return l.reshape(tok_shape).to(acc)


class _FusedTokenLoss(torch.autograd.Function):
    """Per-token losses whose gradient is formed during the forward pass, already multiplied by
    ``hint``: the upstream gradient backward expects (``_core._numeric``'s expected_dl). When it
    arrives as expected (loss.backward() of a reduced loss) backward returns the buffer untouched;
    otherwise one pass rescales it by dl / hint."""

    @staticmethod
    def forward(ctx: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, st: Any, acc: Any, be: Any,
                hint: Any) -> Any:
        gbuf = z.detach() if st.opts.inplace else _gradient_buffer(z, st)
        out = _run_chunks(be, st, z.detach(), y, t, keep, cw, acc, gbuf, hint)
        ctx.gbuf, ctx.k, ctx.hint = gbuf, st.opts.k, hint
        # kept only to recompute the gradient for a second backward (retain_graph=True, gradcheck)
        ctx.again = None if st.opts.inplace else (z.detach(), y, t, keep, cw, st, acc, be)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # second-order use raises instead of giving 0
    def backward(ctx: Any, dl: Any) -> Any:
        g, hint = ctx.gbuf, ctx.hint
        ctx.gbuf = None
        if g is None:  # used by an earlier backward (retain_graph, gradcheck): recompute it, the same way
            g = _recompute(ctx, hint)
        factor = _upstream_factor(dl, hint)
        if factor is _RECOMPUTE:
            g = _recompute(ctx, None)
            factor = dl
        if factor is not None:
            g.mul_(factor.unsqueeze(ctx.k).to(g.dtype))
        return g, None, None, None, None, None, None, None, None


_RECOMPUTE = object()


def _upstream_factor(dl: Any, hint: Any) -> Any:
    """What the stored gradient (formed times ``hint``) must still be multiplied by: None when dl is
    hint exactly (loss.backward() of the reduced loss: no pass at all), else a per-token factor, or
    _RECOMPUTE when a row the fold scaled to 0 now needs a nonzero multiple (never through
    _numeric, where dl is always proportional to hint)."""
    if hint is None:
        return dl
    if torch.equal(dl, hint):
        return None
    nz = hint != 0
    if bool((~nz & (dl != 0) & ~torch.isnan(dl)).any()):
        return _RECOMPUTE
    return torch.where(nz, dl / torch.where(nz, hint, 1.0), dl * 0.0)  # NaN stays NaN, 0 stays 0


def _recompute(ctx: Any, hint: Any) -> Any:
    if ctx.again is None:
        raise RuntimeError("xseqloss: with inplace_backward=True the gradient lives in the logits' "
                           "storage and cannot be formed twice (a second backward, or an upstream "
                           "gradient that zeroes nothing the loss did not); compute the loss again")
    z, y, t, keep, cw, st, acc, be = ctx.again
    g = _gradient_buffer(z, st)
    _run_chunks(be, st, z, y, t, keep, cw, acc, g, hint)
    return g


def _fused_token_loss(self: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                      expected_dl: Any = None) -> Any:
    if _compiling() or z.numel() == 0 or st.engine.kernel == "native":
        return None  # inductor fuses the generic path itself; the chunk loop would unroll
    needs_grad = torch.is_grad_enabled() and z.requires_grad
    if needs_grad:
        if (t is not None and t.requires_grad) or (cw is not None and cw.requires_grad):
            return None  # gradients into targets/class weights: plain autograd
        with torch.no_grad():
            hint = None if expected_dl is None else expected_dl()
        return _FusedTokenLoss.apply(z, y, t, keep, cw, st, acc, self, hint)
    with torch.no_grad():  # forward only: no gradient buffer at all
        return _run_chunks(self, st, z, y, t, keep, cw, acc, None)


TorchBackend.fused_token_loss = _fused_token_loss  # type: ignore[attr-defined]
TorchBackend.fused_class_parallel = True  # type: ignore[attr-defined]  # its chunks pair up (_chunks C_rows)


# ----------------------------------------------------------------------- small default calls
#
# For the default call (``Static.native_default``) F.cross_entropy(ignore_index=...) means exactly
# what we mean; at small sizes one native op beats the ~30 ops of the general core (each eager op
# costs a few microseconds of dispatch). On CPU its kernel checks every label that is not the
# ignore value against [0, C) and raises, which is our label check for free: on a bad label this
# returns None and the general path raises our error (or, with validate=False, marks the token
# NaN). On CUDA a bad label is a device-side assert, so there the general path runs. Large inputs
# keep the fused path: F.cross_entropy materialises its log-softmax (3x the logits in
# forward+backward).

_NO_IGNORE = -(1 << 63)


def _native_default_loss(self: Any, st: Any, z: Any, y: Any) -> Any:
    kernel = st.engine.kernel
    if (kernel in ("chunked", "triton") or (kernel == "auto" and z.numel() > st.engine.native_max_elements)
            or z.dtype not in (torch.float32, torch.float64) or z.device.type != "cpu" or z.numel() == 0):
        return None
    o, C, k = st.opts, st.C, st.opts.k
    ig = st.ignore[0] if st.ignore else _NO_IGNORE  # no ignore value: a value no other label equals
    if not st.ignore and bool((y == _NO_IGNORE).any()):
        return None
    if st.ignore and torch.is_grad_enabled() and z.requires_grad and not bool(torch.isfinite(z).all()):
        # an ignored row gives exactly 0 gradient whatever it holds: log_softmax's backward gives
        # 0 - exp(out) * 0 there, exactly 0 for finite rows but NaN for a row holding NaN or inf
        z = torch.where((y != ig).unsqueeze(k), z, 0.0)
    try:
        l = _cross_entropy(z, y, ig, o.reduction, C, k)
    except IndexError:  # a label out of range ("Target 7 is out of bounds"): the general path says which
        return None
    if o.reduction == "mean" and o.empty == "zero" and st.ignore and math.isnan(l.item()) \
            and not bool((y != ig).any()):
        return _cross_entropy(z, y, ig, "sum", C, k)  # every token ignored: 0 (the native mean: 0/0)
    return l


def _cross_entropy(z: Any, y: Any, ig: int, red: str, C: int, k: int) -> Any:
    """F.cross_entropy with the classes along axis k of z (targets: z's other axes, in order)."""
    if z.ndim == 1:
        return F.cross_entropy(z, y, ignore_index=ig, reduction=red)
    if k == z.ndim - 1:
        l = F.cross_entropy(z.reshape(-1, C), y.reshape(-1), ignore_index=ig, reduction=red)
        return l.reshape(y.shape) if red == "none" else l
    # classes moved to dim 1: the other axes keep their order, as the targets'
    return F.cross_entropy(z.movedim(k, 1), y, ignore_index=ig, reduction=red)


TorchBackend.native_default_loss = _native_default_loss  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ the fused output layer
#
# linear_cross_entropy (xseqloss/linear.py): the chunk loop and the matmuls. One chunk's logits at a
# time, in float32 (16-bit inputs: the weight is read in float32 once per call), the gradient formed
# in the forward and written into the chunk's own buffer, d hidden per chunk, d weight accumulated in
# float32 with addmm_ (no C x H temporary). Two custom ops, so torch.compile(fullgraph=True) sees
# one opaque node (no graph break, no chunk loop unrolled into the graph): the forward returns the
# losses and the gradients it formed; the backward op makes those gradients match the upstream
# gradient in place (nothing when it is the expected one, a rescale when it is a uniform multiple
# of it, the chunks again otherwise).

@functools.lru_cache(maxsize=256)
def _kernel_static(C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool) -> Any:
    """The per-token kernel's plan from the primitives a custom op can carry (torch.compile bakes
    them into its graph): "NC" rows, the smoothing already in the uniform convention."""
    from .._checks import Options
    from .._plan import Static
    o = Options("NC", (), "logits", eps, "uniform", z_loss, cap if cap > 0 else None, "none", "weights", "zero",
                None, False, False)
    return Static(o, C, soft, eps, False, False, False, False, has_cw, False)


def _plan_args(kst: Any) -> tuple:
    o = kst.opts
    return kst.C, kst.soft, float(kst.eps), float(o.z_loss), float(o.cap or 0.0), bool(kst.has_cw)


def _plain_chunk_grad(self: Any, z: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    """Plain cross-entropy of one chunk, the gradient written into z's own buffer."""
    l = _plain_chunk(z, y, keep, z, 1, True, scale.unsqueeze(1))
    return l, z


TorchBackend.plain_chunk_grad = _plain_chunk_grad  # type: ignore[attr-defined]


def _linear_loop(plan: tuple, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, scale: Any,
                 grads: bool) -> tuple[Any, Any, Any, Any]:
    from .._token_loss import token_loss
    from ..linear import chunk_grad, counted_rows
    *kargs, chunk, wl = plan
    kst = _kernel_static(*kargs)
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    R = h2.shape[0]
    C = w.shape[0] if wl == "CH" else w.shape[1]
    l = torch.empty(R, dtype=acc, device=h2.device)
    wa = w if w.dtype == acc else w.to(acc)  # 16-bit: read once in float32 (logits in float32)
    ba = None if b is None else b.to(acc)
    dh = dw = db = None
    if grads:
        dh = torch.empty_like(h2)
        dw = torch.zeros(w.shape, dtype=acc, device=w.device)  # float32 across chunks (Liger 512)
        db = None if b is None else torch.zeros(C, dtype=acc, device=w.device)
    zbuf = torch.empty((min(chunk, R), C), dtype=acc, device=h2.device) if R else None
    tri = _linear_triton(kst, acc, h2, cw)
    for i in range(0, R, chunk):
        j = min(R, i + chunk)
        hc = h2[i:j] if h2.dtype == acc else h2[i:j].to(acc)
        kc = None if keep is None else keep[i:j]
        hc = counted_rows(BACKEND, hc, kc)
        z = zbuf[:j - i]
        torch.mm(hc, wa.t() if wl == "CH" else wa, out=z)
        if ba is not None:
            z += ba
        yc = None if y is None else y[i:j]
        tc = None if t is None else t[i:j]
        if tri is not None:  # the Triton kernel on the chunk, its gradient written into the chunk
            l[i:j] = tri(z, yc, kc, scale[i:j] if grads else None, z if grads else None)
            if not grads:
                continue
            g = z
        elif not grads:
            l[i:j] = token_loss(BACKEND, kst, z, yc, tc, kc, cw, acc, False, k=1, rows_clean=True)[0]
            continue
        else:
            lc, g = chunk_grad(BACKEND, kst, z, yc, tc, kc, cw, acc, scale[i:j], rows_clean=True)
            l[i:j] = lc
        if dh.dtype == acc:
            torch.mm(g, wa if wl == "CH" else wa.t(), out=dh[i:j])
        else:
            dh[i:j] = torch.mm(g, wa if wl == "CH" else wa.t())
        if wl == "CH":
            dw.addmm_(g.t(), hc)
        else:
            dw.addmm_(hc.t(), g)
        if db is not None:
            db += g.sum(0)
    if not grads:
        return l, h2.new_empty(0), w.new_empty(0), w.new_empty(0)
    return l, dh, dw.to(w.dtype), (w.new_empty(0) if db is None else db.to(b.dtype))


def _linear_triton(kst: Any, acc: Any, h2: Any, cw: Any) -> Any:
    """The Triton kernel for the fused layer's float32 chunks where the torch engine is "triton"
    and it covers the call (index targets; CUDA, or CPU under TRITON_INTERPRET=1), else None."""
    from .. import _engine
    if kst.soft or acc != torch.float32 or _engine.current("torch").kernel != "triton":
        return None
    from . import torch_triton
    if not (torch_triton.available() and (h2.device.type == "cuda" or torch_triton._interpret_requested())):
        return None
    cw32 = None if cw is None else cw.to(torch.float32)
    o = kst.opts

    def run(z: Any, y: Any, keep: Any, scale: Any, out: Any) -> Any:
        return torch_triton.token_loss_triton(z, y.to(torch.int64), keep, cw32,
                                              None if scale is None else scale.to(torch.float32),
                                              eps=float(kst.eps), z_loss=float(o.z_loss), cap=o.cap, out=out)
    return run


@torch.library.custom_op("xseqloss::linear_ce", mutates_args=())
def _linear_ce(h2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
               t: Optional[torch.Tensor], keep: Optional[torch.Tensor], cw: Optional[torch.Tensor],
               scale: torch.Tensor, C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool,
               chunk: int, wl: str, grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_loop((C, soft, eps, z_loss, cap, has_cw, chunk, wl), h2, w, b, y, t, keep, cw, scale, grads)


@_linear_ce.register_fake
def _(h2, w, b, y, t, keep, cw, scale, C, soft, eps, z_loss, cap, has_cw, chunk, wl, grads):
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    l = h2.new_empty(h2.shape[0], dtype=acc)
    if not grads:
        return l, h2.new_empty(0), w.new_empty(0), w.new_empty(0)
    return l, torch.empty_like(h2), torch.empty_like(w), (w.new_empty(0) if b is None else torch.empty_like(b))


@torch.library.custom_op("xseqloss::linear_ce_match", mutates_args=("dh", "dw", "db"))
def _linear_ce_match(dl: torch.Tensor, formed: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor,
                     h2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
                     t: Optional[torch.Tensor], keep: Optional[torch.Tensor], cw: Optional[torch.Tensor],
                     C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool, chunk: int,
                     wl: str) -> None:
    """Make the gradients formed with the per-token factor ``formed`` those of ``dl``, in place."""
    if torch.equal(dl, formed):
        return  # loss.backward() of the reduced loss: the gradients are ready
    nz = formed != 0
    ratio = dl[nz] / formed[nz]
    uniform = bool((dl[~nz] == 0).all()) and (ratio.numel() == 0 or bool((ratio == ratio[0]).all()))
    if uniform:  # a scaled loss, GradScaler: every gradient scales alike
        r = ratio[0] if ratio.numel() else dl.new_zeros(())
        for g in (dh, dw, db):
            if g.numel():
                g.mul_(r.to(g.dtype))
        return
    plan = (C, soft, eps, z_loss, cap, has_cw, chunk, wl)
    _, dh2, dw2, db2 = _linear_loop(plan, h2, w, b, y, t, keep, cw, dl, True)  # a cotangent: the chunks again
    dh.copy_(dh2)
    dw.copy_(dw2)
    if db.numel():
        db.copy_(db2)


@_linear_ce_match.register_fake
def _(dl, formed, dh, dw, db, h2, w, b, y, t, keep, cw, C, soft, eps, z_loss, cap, has_cw, chunk, wl):
    return None


def _linear_setup(ctx: Any, inputs: Any, output: Any) -> None:
    # the gradients it returns are outputs no loss uses: without this autograd would hand the
    # backward a zeros_like of each (a d hidden and a d weight of zeros at the peak)
    ctx.set_materialize_grads(False)
    ctx.inputs = inputs
    ctx.grads = output[1:]
    ctx.formed = inputs[7]


def _linear_backward(ctx: Any, dl: Any, *_: Any) -> Any:
    h2, w, b, y, t, keep, cw, scale, *plan, grads = ctx.inputs
    if ctx.grads is None:  # a second backward (retain_graph): the first handed its buffers out
        _, dh, dw, db = torch.ops.xseqloss.linear_ce(h2, w, b, y, t, keep, cw, dl, *plan, True)
    else:
        dh, dw, db = ctx.grads
        torch.ops.xseqloss.linear_ce_match(dl, ctx.formed, dh, dw, db, h2, w, b, y, t, keep, cw, *plan)
    # handed over, not kept: a gradient still referenced here would be copied by autograd's
    # accumulation into .grad (a second d weight and d hidden at the peak)
    ctx.grads = ctx.formed = None
    return (dh, dw, (db if b is not None else None)) + (None,) * 14


torch.library.register_autograd("xseqloss::linear_ce", _linear_backward, setup_context=_linear_setup)


def _linear_token_loss(self: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                       scale_fn: Any, chunk: int, wl: str, want_grad: bool, cp: Any) -> Any:
    if cp is not None:
        from .class_parallel_torch import torch_linear
        return torch_linear(self, kst, h2, w, b, y, t, keep, cw, acc, chunk, wl)
    needs = torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    with torch.no_grad():
        scale = scale_fn() if needs else h2.new_empty(0, dtype=acc)
    return torch.ops.xseqloss.linear_ce(h2, w, b, y, t, keep, cw, scale.detach(), *_plan_args(kst), chunk, wl,
                                        needs)[0]


def _linear_value_and_grad(self: Any, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
    with torch.enable_grad():
        leaves = [None if a is None else a.detach().requires_grad_(True) for a in (h, w, b)]
        out = fn(self, st, *leaves, *arrays)
        want = [a for a in leaves if a is not None]
        grads = torch.autograd.grad(out.sum(), want)
    g = iter(grads)
    return out.detach(), tuple(None if a is None else next(g) for a in leaves)


TorchBackend.linear_token_loss = _linear_token_loss  # type: ignore[attr-defined]
TorchBackend.linear_value_and_grad = _linear_value_and_grad  # type: ignore[attr-defined]
