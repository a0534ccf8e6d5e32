"""The chunk helpers shared by every chunked kernel: how rows are split into chunks, the rows that
do not count made harmless, and one chunk's loss and scaled gradient (``chunk_grad``)."""

from __future__ import annotations

from typing import Any

from ..plan.call_plan import CallPlan
from .token_loss import token_loss


def even_chunk(R: int, chunk: int) -> int:
    """A chunk size <= ``chunk`` that divides R when one is near (at most twice as many chunks):
    whole chunks need no padded copy of the hidden states and no sliced copy of d hidden, each
    a d-hidden-sized temporary that grows with the tokens."""
    n0 = max(1, -(-R // max(chunk, 1)))
    for n in range(n0, min(2 * n0, R) + 1):
        if R % n == 0:
            return R // n
    return chunk


def counted_rows(ops: Any, h: Any, keep: Any) -> Any:
    """A chunk's (rows, H) hidden states with the rows that do not count zeroed: garbage there
    (NaN, inf) reaches neither the logits nor d weight (decision 55), and the core needs no masked
    copy of those rows' logits (``token_loss(rows_zeroed=True)``)."""
    return h if keep is None else ops.where(ops.expand(keep, 1), h, 0.0)


def chunk_loss(ops: Any, rp: CallPlan, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
               rows_zeroed: bool = False, collect: dict | None = None) -> Any:
    """A chunk's per-token losses (no gradient formed), from its (rows, C) logits; ``collect``:
    a loss's return_stats from the same pass (token_loss's ``collect``)."""
    if ops.row_kernel is not None and collect is None:
        out = ops.row_kernel(rp, z, y, t, keep, cw, acc, None)
        if out is not None:
            return out[0]
    return token_loss(ops, rp, z, y, t, keep, cw, acc, False, k=1, rows_zeroed=rows_zeroed, collect=collect)[0]


def chunk_grad(ops: Any, rp: CallPlan, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any, scale: Any,
               rows_zeroed: bool = False, collect: dict | None = None) -> tuple[Any, Any]:
    """A chunk's per-token losses and d/dz times ``scale`` (per row), from its (rows, C) logits in
    ``acc``: the backend's row kernel where it covers the plan (PyTorch's Triton kernel), the plain
    kernel for plain cross-entropy (its gradient may take the chunk's own buffer), else the core's
    formula. The gradient may be written into ``z``: the chunk's logits are not read afterwards.
    ``collect``: a loss's return_stats from the same pass (token_loss's ``collect``)."""
    if ops.row_kernel is not None and collect is None:
        out = ops.row_kernel(rp, z, y, t, keep, cw, acc, scale)
        if out is not None:
            return out
    if rp.plain:
        return ops.plain_ce(z, y, keep, 1, acc, scale, out=z)
    l, g = token_loss(ops, rp, z, y, t, keep, cw, acc, want_grad=True, k=1, rows_zeroed=rows_zeroed, collect=collect)
    return l, g * ops.expand(scale, 1)
