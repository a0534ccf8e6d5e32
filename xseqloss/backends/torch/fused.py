"""PyTorch's fused forward+backward for the logits path (``Backend.fused_token_loss``).

F.cross_entropy's forward+backward makes several logits-sized passes and buffers (log_softmax
output, its gradient, the scatter). Here the gradient is computed during the forward pass, chunk by
chunk while the chunk is in cache, into one logits-sized buffer (or into the logits' own storage
with inplace_backward=True, Liger Kernel's trick); backward only matches it to the upstream gradient
(``core.backward``). The general options run the core's ``token_loss`` per chunk, so the semantics
stay in one place; plain cross-entropy runs the plain kernel (``ops.plain_rows``), and with the
"triton" kernel the Triton one (triton.py).

The sizes (plan/engine.py): chunks of ~8 MB of float32 stay in cache and amortise op dispatch; the
reusable gradient buffer serves logits of 64 MB and more (buffers.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ...core import backward
from ...core.token_loss import token_loss
from .buffers import gradient_buffer
from .ops import compiling, plain_rows


def _chunks(z: Any, k: int, chunk_elements: int, C_rows: int | None = None) -> tuple[int, Any]:
    """(class axis of a chunk, generator of chunk indices over z). ``C_rows``: the class count that
    sizes the chunks (classes split across workers: the global C, so that every worker runs the
    same chunks and their collectives pair up)."""
    C = z.shape[k]
    Cr = C if C_rows is None else C_rows
    if k == z.ndim - 1 and z.is_contiguous():
        rows = max(1, chunk_elements // max(Cr, 1))
        M = _tokens(z, k)  # from the shape: a worker holding 0 classes runs the same chunks as the others
        return 1, ((slice(i, min(i + rows, M)),) for i in range(0, M, rows))
    # another layout: slabs along the first non-class axis, computed along the native class axis
    a0 = 0 if k != 0 else 1
    per = max(1, _tokens(z, k) // max(z.shape[a0], 1) * Cr)
    step = max(1, chunk_elements // per)
    return k, (tuple([slice(None)] * a0 + [slice(i, min(i + step, z.shape[a0]))])
               for i in range(0, z.shape[a0], step))


def _tokens(z: Any, k: int) -> int:
    """The number of tokens of z (its size without the class axis)."""
    n = 1
    for a, d in enumerate(z.shape):
        if a != k:
            n *= int(d)
    return n


def _tok_index(idx: tuple, k: int) -> tuple:
    """The token-array index matching a slab index over z (the class axis dropped)."""
    return tuple(s for a, s in enumerate(idx) if a != k)


def run_chunks(be: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               gbuf: Any, scale: Any = None, collect: dict | None = None) -> Any:
    """Per-token losses (acc dtype); with gbuf, dl/dz times ``scale`` (token-shaped, acc dtype, or
    None for 1) written into it (gbuf may be z itself). ``collect``: the per-token outputs of a
    loss's return_stats, filled chunk by chunk from the same pass (token_loss's ``collect``)."""
    if st.engine.kernel == "triton" and collect is None:
        from .triton_route import covers, run_triton
        if covers(st, z, t, gbuf):
            return run_triton(st, z, y, keep, cw, acc, gbuf, scale)
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
    M = _tokens(z, k)  # (M, C) rows, not (-1, C): C may be 0 on a class-split worker
    zf = z.reshape(M, C) if rows else z
    gf = None if gbuf is None else (gbuf.reshape(M, C) if rows else gbuf)
    of = out.reshape(-1) if rows else out
    yf = None if y is None else (y.reshape(-1) if rows else y)
    kf = None if keep is None else (keep.reshape(-1) if rows else keep)
    tf_ = None if t is None else (t.reshape(M, C) if rows else t)
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
            of[ti] = plain_rows(x, yf[ti], kc, g, kk, want_grad, sc)
            if gf is not None and g is not gf[idx] and gf.dtype != acc:
                gf[idx].copy_(g)
        else:
            part = None if collect is None else {}
            l, g = token_loss(be, st, zc, None if yf is None else yf[ti], None if tf_ is None else tf_[idx],
                              kc, cw, acc, want_grad, k=kk, collect=part)
            of[ti] = l
            for name, v in (part or {}).items():
                if name not in collect:
                    collect[name] = torch.empty(tok_shape, dtype=v.dtype, device=z.device)
                (collect[name].reshape(-1) if rows else collect[name])[ti] = v
            if gf is not None:
                if sc is None:
                    gf[idx].copy_(g)
                elif gf.dtype == g.dtype:
                    torch.mul(g, sc, out=gf[idx])  # scale and store in one pass
                else:
                    gf[idx].copy_(g.mul_(sc))
    return out


class FusedTokenLoss(torch.autograd.Function):
    """Per-token losses whose gradient is formed during the forward pass, already multiplied by
    ``formed``: the upstream gradient backward expects (``TokenRules.expected_dl``). When it arrives
    as expected (loss.backward() of a reduced loss) backward returns the buffer untouched;
    otherwise the upstream rule (core/backward.py) rescales it or forms it again."""

    @staticmethod
    def forward(ctx: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, st: Any, acc: Any, be: Any,
                formed: Any, collect: Any = None) -> Any:
        gbuf = z.detach() if st.opts.inplace else gradient_buffer(z, st)
        out = run_chunks(be, st, z.detach(), y, t, keep, cw, acc, gbuf, formed, collect)
        ctx.gbuf, ctx.k, ctx.formed, ctx.keep, ctx.be = gbuf, st.opts.k, formed, keep, be
        # kept only to recompute the gradient for a second backward (retain_graph=True, gradcheck)
        ctx.again = None if st.opts.inplace else (z.detach(), y, t, keep, cw, st, acc, be)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # second-order use raises instead of giving 0
    def backward(ctx: Any, dl: Any) -> Any:
        g, formed = ctx.gbuf, ctx.formed
        ctx.gbuf = None
        if g is None:  # used by an earlier backward (retain_graph, gradcheck): recompute it, the same way
            g = _recompute(ctx, formed)
        if dl is None:
            dl = torch.zeros_like(formed)
        if not bool(backward.is_formed(ctx.be, dl, formed, ctx.keep)):
            m = backward.upstream(ctx.be, dl, formed, ctx.keep, per_row=True)
            if bool(m.again):
                g = _recompute(ctx, dl)
            else:
                g.mul_(m.factor.unsqueeze(ctx.k).to(g.dtype))
        return g, None, None, None, None, None, None, None, None, None


def _recompute(ctx: Any, scale: Any) -> Any:
    if ctx.again is None:
        raise RuntimeError("xseqloss: with inplace_backward=True the gradient lives in the logits' "
                           "storage and cannot be formed twice (a second backward, or an upstream "
                           "gradient that zeroes nothing the loss did not); compute the loss again")
    z, y, t, keep, cw, st, acc, be = ctx.again
    g = gradient_buffer(z, st)
    run_chunks(be, st, z, y, t, keep, cw, acc, g, scale)
    return g


class TorchFused:
    fused_class_parallel = True  # its chunks pair up across workers (_chunks' C_rows)

    def fused_token_loss(self, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                         expected_dl: Any = None, collect: dict | None = None) -> Any:
        if compiling() or z.numel() == 0 or st.engine.kernel == "native":
            return None  # inductor fuses the generic path itself; the chunk loop would unroll
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        if needs_grad:
            if (t is not None and t.requires_grad) or (cw is not None and cw.requires_grad):
                return None  # gradients into targets/class weights: plain autograd
            with torch.no_grad():
                formed = None if expected_dl is None else expected_dl()
            if formed is None:
                return None
            return FusedTokenLoss.apply(z, y, t, keep, cw, st, acc, self, formed, collect)
        with torch.no_grad():  # forward only: no gradient buffer at all
            return run_chunks(self, st, z, y, t, keep, cw, acc, None, collect=collect)
