"""token_stats a chunk of rows at a time, for the eager backends whose arrays can be written in
place (NumPy, PyTorch): the outputs and what the backward needs (m, log s, Ē per token) are
written chunk by chunk into preallocated rows, and the gradient chunk by chunk into one output
buffer. Each chunk (~8 MB of logits) stays in cache through its passes, and no logits-sized
temporary is made: the whole-array formula (core/stats.py) holds several, and on CPU each fresh
one pays its page faults on first touch.

Only for logits with the classes last in C order (then the rows are a view); other layouts, and
the traced and XLA backends, run the whole-array formula.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..plan.call_plan import CallPlan
from .stats import stats_rows, stats_vjp


def as_rows(z: Any, k: int) -> Any:
    """z as (rows, C) without a copy when the classes are its last axis in C order, else None."""
    nd = len(z.shape)
    if nd < 2 or k not in (-1, nd - 1) or not _contiguous(z) or 0 in tuple(z.shape)[:-1]:
        return None
    R = 1
    for d in tuple(z.shape)[:-1]:
        R *= int(d)
    return z.reshape(R, z.shape[-1])  # C may be 0 on a class-split worker: (R, 0) rows


def _contiguous(z: Any) -> bool:
    flags = getattr(z, "flags", None)
    return bool(flags.c_contiguous) if flags is not None else bool(z.is_contiguous())


def chunks(R: int, C: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    rows = max(1, chunk_elements // max(C, 1))  # the global C under a class split: workers' chunks pair up
    for i in range(0, R, rows):
        yield i, min(R, i + rows)


def token_rows(x: Any, R: int, trailing: bool = False) -> Any:
    """A token-shaped array as (R,) rows, or with a trailing axis (ids: k per token) as (R, k); a
    Python float as it is."""
    if x is None or isinstance(x, float):
        return x
    return x.reshape(R, -1) if trailing else x.reshape(R)


def keep_rows(keep: Any, R: int, on_host: bool) -> Any:
    """``keep`` as (R,) rows, or None when every row counts and the array is on the host (one
    cheap read there, where it saves the kernels a pass over the logits to zero rows that do not
    count; a device array is kept as it is: reading it would wait for the device)."""
    if keep is None:
        return None
    keep = keep.reshape(R)
    return None if on_host and bool(keep.all()) else keep


def _sl(a: Any, i: int, j: int) -> Any:
    return a if a is None or isinstance(a, float) else a[i:j]


def forward(ops: Any, rp: CallPlan, zf: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> tuple[dict, tuple]:
    """(outputs by name as rows, saved (m, log s, Ē) as rows) of the (R, C) rows ``zf``; the token
    arrays already as rows (``token_rows``); the rows are made by ``ops.empty_rows``."""
    R, C = zf.shape
    outs: dict = {}
    saved: list = []
    for i, j in chunks(R, rp.C or C, rp.engine.chunk_elements):
        o, s = stats_rows(ops, rp, zf[i:j], _sl(y, i, j), _sl(ids, i, j), _sl(keep, i, j), _sl(temp, i, j), acc, k=1)
        if not saved:
            saved = [ops.empty_rows((R,), v.dtype, zf) for v in s]
            outs = {name: ops.empty_rows((R, *v.shape[1:]), v.dtype, zf) for name, v in o.items()}
        for buf, v in zip(saved, s):
            buf[i:j] = v
        for name, v in o.items():
            outs[name][i:j] = v
    return outs, tuple(saved)


def gradient(ops: Any, rp: CallPlan, zf: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any, saved: Any,
             cts: dict, out: Any) -> Any:
    """d/dz of sum over outputs of sum(cotangent * output) of the (R, C) rows ``zf``, written chunk by
    chunk into ``out`` (R, C); ``cts`` as rows. ``saved``: the forward's (m, log s, Ē) rows, or None
    to form them per chunk (NumPy's analytic VJP: one pass, no forward kept)."""
    R, C = zf.shape
    for i, j in chunks(R, rp.C or C, rp.engine.chunk_elements):
        zc, yc, ic, kc, tc = zf[i:j], _sl(y, i, j), _sl(ids, i, j), _sl(keep, i, j), _sl(temp, i, j)
        s = stats_rows(ops, rp, zc, yc, ic, kc, tc, acc, k=1)[1] if saved is None else tuple(v[i:j] for v in saved)
        out[i:j] = stats_vjp(ops, rp, zc, yc, ic, kc, tc, acc, s, {n: c[i:j] for n, c in cts.items()}, k=1)
    return out
