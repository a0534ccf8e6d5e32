"""NumPy's kernels: the plain kernel (``plain_ce``), the default call's per-token losses, and the
analytic gradient formed chunk by chunk in one output buffer (``fused_value_and_grad``).

value_and_grad's gradient is (softmax - onehot) times the per-token cotangent. Built from whole
arrays it takes several logits-sized temporaries and passes; here it is formed chunk by chunk
(~8 MB of logits, in cache) straight into one output buffer in the logits' dtype: max, exp in
place, row sums, then one scaling pass and the target column. The general options run the core's
``token_loss`` on each chunk, so the formula stays in one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core import stats_chunks
from ...core.reduction import default_coef, default_native
from ...core.stats import grad_of_rows, stats_rows
from ...core.token_loss import token_loss


class NumpyKernels:
    def plain_ce(self, z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None,
                 out: Any = None) -> tuple[Any, Any]:
        """The plain kernel (plan/ops.py ``Backend.plain_ce``): max, exp in place, row sums, one
        scaling pass and the target column. Classes last in C order (the common case, and every
        chunk) runs on (rows, C) views with flat indices; other layouts along axis k."""
        x = z if z.dtype == acc else z.astype(acc)
        g = out if out is not None and out.dtype == acc and out.shape == x.shape else np.empty(x.shape, acc)
        if k in (-1, x.ndim - 1) and x.flags.c_contiguous and g.flags.c_contiguous:
            l, g = self._plain_rows(x, g, y, keep, scale)
        else:
            l, g = self._plain_axis(x, g, y, keep, k, scale)
        return l, (g if g is None or g.dtype == z.dtype else g.astype(z.dtype))

    @staticmethod
    def _plain_rows(x: Any, g: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
        C = x.shape[-1]
        x2, g2 = x.reshape(-1, C), g.reshape(-1, C)  # views (C order)
        yf = np.reshape(y, -1)
        r = np.arange(x2.shape[0])
        m = x2.max(axis=1)
        m[m == -np.inf] = 0.0
        xy = x2[r, yf]  # a copy, taken before g (which may be x's own buffer) is written
        np.subtract(x2, m[:, None], out=g2)
        np.exp(g2, out=g2)
        s = g2.sum(axis=1)
        l = np.log(s) - (xy - m)  # the max-shifted frame: exact to float32 for logits near 1e4
        drop = None if keep is None or keep.all() else ~np.reshape(keep, -1)
        if drop is not None:
            l[drop] = 0.0
        if scale is None:
            return l.reshape(np.shape(y)), None
        sc = np.reshape(scale, -1)
        np.multiply(g2, (sc / s)[:, None], out=g2)
        g2[r, yf] -= sc
        if drop is not None:  # rows that do not count: exactly 0, whatever they hold
            g2[drop] = 0.0
        return l.reshape(np.shape(y)), g

    @staticmethod
    def _plain_axis(x: Any, g: Any, y: Any, keep: Any, k: int, scale: Any) -> tuple[Any, Any]:
        yk = np.expand_dims(y, k)
        m = x.max(axis=k, keepdims=True)
        m[m == -np.inf] = 0.0
        xy = np.take_along_axis(x, yk, axis=k)
        np.subtract(x, m, out=g)  # g may be x itself (the gradient in the logits' buffer)
        np.exp(g, out=g)
        s = g.sum(axis=k, keepdims=True)
        l = (np.log(s) - (xy - m)).squeeze(k)
        drop = None if keep is None or keep.all() else ~keep
        if drop is not None:
            l[drop] = 0.0
        if scale is None:
            return l, None
        sk = np.expand_dims(scale, k)
        np.multiply(g, sk / s, out=g)
        np.put_along_axis(g, yk, np.take_along_axis(g, yk, axis=k) - sk, axis=k)
        if drop is not None:
            np.copyto(g, 0.0, where=np.expand_dims(drop, k))
        return l, g

    def empty_rows(self, shape: tuple, dtype: Any, like: Any) -> Any:
        return np.empty(shape, dtype)

    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        """The forward of core.stats (NumPy has no autodiff: ``stats_vjp`` is analytic): a chunk of
        rows at a time where the classes are last (core/stats_chunks.py), else whole arrays."""
        zf = None if st.engine.kernel == "native" else stats_chunks.as_rows(z, st.opts.k)
        with np.errstate(all="ignore"):
            if zf is None:
                return stats_rows(self, st, z, y, ids, keep, temp, acc)[0]
            R = zf.shape[0]
            outs, _ = stats_chunks.forward(self, st, zf, *_token_rows(R, y, ids, keep, temp), acc)
        tok = z.shape[:-1]
        return {n: v.reshape(*tok, *v.shape[1:]) for n, v in outs.items()}

    def stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        z = arrays[0]
        with np.errstate(all="ignore"):
            return np.asarray(vjp(self, st, *arrays, cts, grad_rows=_grad_rows)).astype(z.dtype, copy=False)

    def default_token_loss(self, st: Any, z: Any, y: Any, want_grad: bool = False) -> Any:
        """The default call (plan/ops.py), with the label check first: a label out of range gives
        None, and the general path raises or marks it NaN (decisions.md item 21)."""
        if st.engine.kernel != "auto" or z.dtype not in (np.float32, np.float64) or z.size == 0:
            return None
        keep = None
        if st.ignore:
            keep = y != st.ignore[0]
            if not keep.all():
                y = np.where(keep, y, 0)
            else:
                keep = None
        bad = (y < 0) | (y >= st.C)
        if keep is not None:
            bad &= keep
        if bad.any():
            return None
        n = int(y.size if keep is None else np.count_nonzero(keep))
        scale = None
        if want_grad:
            scale = np.full(y.shape, default_coef(st, n), z.dtype)
        with np.errstate(all="ignore"):
            l, g = self.plain_ce(z, y, keep, st.opts.k, z.dtype, scale)
        red = default_native(st, n)
        return (l if red == "none" else l.sum() / n if red == "mean" else l.sum()), n, g

    def fused_value_and_grad(self, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                             cotangent: Any) -> tuple[Any, Any]:
        """(per-token loss, gradient) formed chunk by chunk, or (None, None) with the "native" kernel
        (the core then runs token_loss on whole arrays)."""
        if st.engine.kernel == "native":
            return None, None
        ct = cotangent()
        k = st.opts.k
        grad = np.empty_like(z)  # the logits' memory order, so both views below flatten alike
        zv, gv = np.moveaxis(z, k, -1), np.moveaxis(grad, k, -1)
        if zv.ndim > 2 and zv.flags.c_contiguous and gv.flags.c_contiguous:  # flatten without a copy
            C = zv.shape[-1]
            zv, gv = zv.reshape(-1, C), gv.reshape(-1, C)
        tokens = zv.shape[:-1]
        tv = None if t is None else np.moveaxis(t, k, -1).reshape(zv.shape)
        yv = None if y is None else np.reshape(y, tokens)
        kv = None if keep is None else np.reshape(keep, tokens)
        cv = np.reshape(ct, tokens)
        loss = np.empty(tokens, acc)
        for idx in _row_blocks(zv, st.engine.chunk_elements):
            x, g = zv[idx], gv[idx]  # (rows, C)
            take = (lambda a: None if a is None else np.reshape(a[idx], x.shape[:1]))
            yc, kc, cc = take(yv), take(kv), take(cv)
            x = x if x.dtype == acc else x.astype(acc)
            work = g if g.dtype == acc else np.empty(x.shape, acc)
            if st.plain:
                l, _ = self.plain_ce(x, yc, kc, 1, acc, cc, out=work)
            else:
                l, gc = token_loss(self, st, x, yc, None if tv is None else tv[idx].reshape(x.shape), None, cw, acc,
                                   want_grad=True, k=-1)
                np.multiply(gc, cc[:, None], out=work)
                if kc is not None and not kc.all():  # rows that do not count: exactly 0, whatever they hold
                    drop = ~kc
                    work[drop] = 0.0
                    l[drop] = 0.0
            if work is not g:
                g[...] = work
            loss[idx] = l.reshape(loss[idx].shape)
        return loss.reshape(np.shape(ct)), grad


def _row_blocks(zv: np.ndarray, chunk_elements: int) -> Any:
    """Index tuples of row blocks over ``zv`` (class axis last) such that each block is (rows, C)."""
    C = zv.shape[-1]
    rows = max(1, chunk_elements // max(C, 1))
    if zv.ndim == 1:
        yield (None,)  # one token
        return
    R = zv.shape[-2]
    for lead in np.ndindex(*zv.shape[:-2]):
        for i in range(0, R, rows):
            yield lead + (slice(i, min(i + rows, R)),)


def _token_rows(R: int, y: Any, ids: Any, keep: Any, temp: Any) -> tuple:
    tr = stats_chunks.token_rows
    return tr(y, R), tr(ids, R, True), stats_chunks.keep_rows(keep, R, True), tr(temp, R)


def _grad_rows(ops: Any, rp: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any, cts: dict) -> Any:
    """core.stats.grad_of_rows a chunk of rows at a time into one buffer in the logits' dtype
    (classes last), the forward formed per chunk with its gradient; whole arrays otherwise."""
    zf = None if rp.engine.kernel == "native" else stats_chunks.as_rows(z, rp.opts.k)
    if zf is None:
        return grad_of_rows(ops, rp, z, y, ids, keep, temp, acc, cts)
    R = zf.shape[0]
    cf = {n: stats_chunks.token_rows(np.asarray(c), R, n == "ids_log_prob") for n, c in cts.items()}
    out = np.empty(z.shape, z.dtype)
    stats_chunks.gradient(ops, rp, zf, *_token_rows(R, y, ids, keep, temp), acc, None, cf, out.reshape(R, -1))
    return out
