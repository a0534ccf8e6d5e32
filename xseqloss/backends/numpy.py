"""NumPy backend: logsumexp along any class axis; the gradient is analytic, formed chunk by chunk in
one output buffer (``fused_value_and_grad``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import XSeqLossTypeError
from . import _common


_INT64_MAX = np.iinfo(np.int64).max


class NumpyBackend:
    name = "numpy"
    host_probe = True  # eager: the softmax-input probe reads a few rows on the host
    type_name = "a NumPy array"

    # ---- conversion and inspection
    def convert(self, x: Any, argument: str, like: Any = None) -> np.ndarray:
        try:
            return np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise XSeqLossTypeError(f"{argument} could not be converted to a NumPy array: {exc}") from exc

    def to_device(self, x: Any, like: Any) -> Any:
        return x

    def kind(self, x: Any) -> str:
        return "f" if x.dtype.name == "bfloat16" else x.dtype.kind

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

    def tracing(self, x: Any) -> bool:
        return False

    def index_dtype(self, y: Any) -> Any:
        """int64 labels; an integer cast, never a float one. uint64 values past int64's range
        saturate at its maximum (out of range for any C, so checked or marked NaN) instead of
        wrapping: 2**64 - 100 must not become -100, the ignore value (issue 11)."""
        if y.dtype == np.uint64:
            y = np.minimum(y, np.uint64(_INT64_MAX))
        return y if y.dtype == np.int64 else y.astype(np.int64)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def host_view(self, x: Any) -> Any:
        return x

    def any_true(self, x: Any) -> bool:
        return bool(np.any(x))

    def isfinite_any_dtype(self, x: Any) -> Any:
        return np.isfinite(x)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == np.bool_ else m != 0


    # ---- running the numeric core
    def run(self, fn: Any, st: Any, *arrays: Any) -> Any:
        with np.errstate(all="ignore"):
            out = fn(self, st, *arrays)
        if isinstance(out, tuple):  # (result, flags)
            return np.asarray(out[0]), out[1]
        return out if isinstance(out, dict) else np.asarray(out)

    def value_and_grad(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        with np.errstate(all="ignore"):
            value, grad = fn(self, st, z, *arrays, want_grad=True)
        return np.asarray(value), np.asarray(grad).astype(z.dtype, copy=False)

    # ---- ops
    def stack(self, xs: Any) -> Any:
        return np.stack(xs)

    def acc_dtype(self, z: Any) -> Any:
        return np.float64 if z.dtype == np.float64 else np.float32

    def wide_dtype(self) -> Any:
        return np.float64

    def cast(self, x: Any, dtype: Any) -> Any:
        return np.asarray(x).astype(dtype, copy=False)

    where = staticmethod(np.where)
    expand = staticmethod(np.expand_dims)
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    tanh = staticmethod(np.tanh)
    abs = staticmethod(np.abs)
    isfinite = staticmethod(np.isfinite)
    maximum = staticmethod(np.maximum)
    zeros_like = staticmethod(np.zeros_like)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def sum(self, x: Any, axis: Any) -> Any:
        return np.sum(x, axis=axis)

    def max(self, x: Any, axis: int) -> Any:
        return np.max(x, axis=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return np.any(x, axis=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return np.all(x, axis=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return np.sum(flags, axis=axis, dtype=np.int64)

    def logsumexp(self, x: Any, k: int) -> Any:
        return _common.logsumexp(self, x, k)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        return _common.nll(self, z, y, keep, k, acc, differentiable=False)  # NumPy has no autodiff

    def take(self, vec: Any, idx: Any) -> Any:
        return vec[idx]

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        return np.take_along_axis(x, np.expand_dims(y, k), axis=k).squeeze(k)

    def classdot(self, x: Any, w: Any, k: int) -> Any:
        return np.moveaxis(x, k, -1) @ w

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        yk = np.expand_dims(y, k)
        np.put_along_axis(g, yk, np.take_along_axis(g, yk, axis=k) + np.expand_dims(vals, k), axis=k)
        return g

    def reshape_class(self, w: Any, k: int, ndim: int) -> Any:
        shape = [1] * ndim
        shape[k] = -1
        return w.reshape(shape)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return np.full(np.shape(like), value, dtype)

    def true_like(self, like: Any) -> Any:
        return np.ones(np.shape(like), bool)

    def drop_class(self, z: Any, k: int) -> Any:
        return np.take(z, 0, axis=k)

    def dim(self, x: Any, axis: int) -> int:
        return x.shape[axis]

    def ndim(self, x: Any) -> int:
        return x.ndim

    def size(self, x: Any) -> Any:
        return np.int64(np.size(x))

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 in like's integer dtype (int64 for a floating like)."""
        return np.arange(n, dtype=np.int64 if like is None or like.dtype.kind not in "iu" else like.dtype)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return np.moveaxis(x, src, dst)

    def min(self, x: Any, axis: int) -> Any:
        return np.min(x, axis=axis)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[np.arange(h.shape[0]), idx]

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def shift(self, x: Any, k: int, axis: int, fill: Any) -> Any:
        return _common.shift(self, x, k, axis, fill)

    def concat(self, xs: Any, axis: int) -> Any:
        return np.concatenate(xs, axis=axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return np.full_like(x, value)

    def cumsum(self, x: Any, axis: int) -> Any:
        return np.cumsum(x, axis=axis)

    def segment_sum(self, v: Any, j: Any) -> Any:
        """(N, T) sums of v by index j along T: out[n, i] = sum of v[n, t] over t with j[n, t] == i."""
        out = np.zeros(v.shape, v.dtype)
        np.add.at(out, (np.arange(v.shape[0])[:, None], j), v)
        return out

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        return np.take_along_axis(x, idx, axis=axis)

    def flat(self, x: Any) -> Any:
        return np.reshape(x, (-1,))

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        out = np.zeros(int(size), v.dtype)
        out[idx] = v
        return out

    def reshape_like(self, x: Any, like: Any) -> Any:
        return np.reshape(x, np.shape(like))

    def reshape_rows(self, x: Any) -> Any:
        return np.reshape(x, (-1, np.shape(x)[-1]))

    def size_of(self, x: Any) -> int:
        return int(np.size(x))

    def pad_stack(self, items: Any, T: int, fill: Any) -> Any:
        """Per-sequence arrays (length, ...) as one (N, T, ...) array, ``fill`` past each length."""
        ref = items[0] if items else np.zeros(0, np.int64)
        out = np.full((len(items), T, *np.shape(ref)[1:]), fill, dtype=np.asarray(ref).dtype)
        for i, v in enumerate(items):
            out[i, :len(v)] = v
        return out

    def permute(self, x: Any, perm: Any) -> Any:
        return np.transpose(x, perm)

    def moveaxis_to(self, x: Any, src: str, dst: str) -> Any:
        return _common.moveaxis_to(self, x, src, dst)

    def zeros_shape(self, shape: Any, like: Any) -> Any:
        return np.zeros(shape, np.float32)


BACKEND = NumpyBackend()


# ------------------------------------------------------------------------ fused loss and gradient
#
# value_and_grad's gradient is (softmax - onehot) times the per-token cotangent. Built from whole
# arrays it takes several logits-sized temporaries and passes; here it is formed chunk by chunk
# (~8 MB of logits, in cache) straight into one output buffer in the logits' dtype: max, exp in
# place, row sums, then one scaling pass and the target column. The general options run
# _token_loss.token_loss on each chunk, so the formula stays in one place.

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


def _fused_value_and_grad(ops: Any, st: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                          cotangent: Any) -> tuple[Any, Any]:
    """(per-token loss, gradient) formed chunk by chunk, or (None, None) with the "native" kernel
    (the core then runs token_loss on whole arrays)."""
    from .._token_loss import token_loss  # the one analytic formula of the package

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
            l = _plain_chunk(x, yc, work, cc)
        else:
            l, gc = token_loss(ops, st, x, yc, None if tv is None else tv[idx].reshape(x.shape), None, cw, acc,
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


def _plain_chunk(x: np.ndarray, y: np.ndarray, g: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """lse - x[y] per row, and (softmax - onehot) * ct written into g."""
    m = x.max(axis=1)
    m[m == -np.inf] = 0.0
    rows = np.arange(x.shape[0])
    xy = x[rows, y]
    np.subtract(x, m[:, None], out=g)
    np.exp(g, out=g)
    s = g.sum(axis=1)
    l = np.log(s) - (xy - m)  # the max-shifted frame: exact to float32 for logits near 1e4
    np.multiply(g, (ct / s)[:, None], out=g)
    g[rows, y] -= ct
    return l


NumpyBackend.fused_value_and_grad = _fused_value_and_grad  # type: ignore[attr-defined]


# ----------------------------------------------------------------------- the default call
#
# The default call (``Static.native_default``: index targets, at most one ignore value, mean, sum
# or none) in a few whole-array ops, without the general core's wrappers: the same arithmetic as
# _common.nll, with the label check first (a label out of range gives None, and the general path
# raises or marks it NaN). decisions.md item 21.

def _native_default_loss(self: Any, st: Any, z: Any, y: Any) -> Any:
    if st.engine.kernel != "auto" or z.dtype not in (np.float32, np.float64) or z.size == 0:
        return None
    o, C, k = st.opts, st.C, st.opts.k
    bad = (y < 0) | (y >= C)
    keep = None
    if st.ignore:
        keep = y != st.ignore[0]
        bad &= keep
        y = np.where(keep, y, 0)
    if bad.any():
        return None
    with np.errstate(all="ignore"):
        m = z.max(axis=k, keepdims=True)
        m[m == -np.inf] = 0.0  # a row of -inf: lse = -inf, as _common.logsumexp
        lse_s = np.log(np.exp(z - m).sum(axis=k))  # the max-shifted frame, as _common.nll
        l = lse_s - (np.take_along_axis(z, np.expand_dims(y, k), axis=k) - m).squeeze(k)
        if keep is not None:
            l = np.where(keep, l, 0.0)  # an ignored row gives 0, whatever it holds
        if o.reduction == "none":
            return l
        total = np.asarray(l.sum())
        if o.reduction == "sum":
            return total
        n = l.size if keep is None else int(np.count_nonzero(keep))
        return np.asarray(total / (max(n, 1) if o.empty == "zero" else n))  # empty: 0, or 0/0 = NaN


NumpyBackend.native_default_loss = _native_default_loss  # type: ignore[attr-defined]


def _version() -> str:
    return np.__version__


NumpyBackend.version = staticmethod(_version)  # type: ignore[attr-defined]
NumpyBackend.devices = staticmethod(lambda: ["cpu"])  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ the fused output layer
#
# linear_cross_entropy (xseqloss/linear.py): one chunk's float32 logits at a time; the gradient is
# formed in the chunk's buffer; d weight is accumulated in float32 in blocks of classes, so no
# C x H temporary is ever allocated (NumPy has no in-place GEMM).

def _plain_chunk_grad(self: Any, z: Any, y: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    l = _plain_chunk(z, y, z, scale)  # in place: z becomes the gradient
    if keep is not None and not keep.all():
        drop = ~keep
        z[drop] = 0.0
        l[drop] = 0.0
    return l, z


def _linear_token_loss(self: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                       scale_fn: Any, chunk: int, wl: str, want_grad: bool, cp: Any) -> Any:
    from .._token_loss import token_loss
    from ..linear import chunk_grad, counted_rows

    R, H = h2.shape
    wa = w if w.dtype == acc else w.astype(acc)
    ba = None if b is None else b.astype(acc)
    C = wa.shape[0] if wl == "CH" else wa.shape[1]
    l = np.empty(R, acc)
    if want_grad:
        scale = scale_fn()
        dh = np.empty(h2.shape, h2.dtype)
        dw = np.zeros(wa.shape, acc)
        db = None if b is None else np.zeros(C, acc)
        block = max(1, (1 << 21) // max(H, 1))  # classes per d-weight update: a small temporary
    for i in range(0, R, chunk):
        j = min(R, i + chunk)
        hc = h2[i:j] if h2.dtype == acc else h2[i:j].astype(acc)
        kc = None if keep is None else keep[i:j]
        hc = counted_rows(self, hc, kc)
        z = hc @ (wa.T if wl == "CH" else wa)
        if ba is not None:
            z += ba
        yc = None if y is None else y[i:j]
        tc = None if t is None else t[i:j]
        if not want_grad:
            l[i:j] = token_loss(self, kst, z, yc, tc, kc, cw, acc, False, k=1, rows_clean=True)[0]
            continue
        lc, g = chunk_grad(self, kst, z, yc, tc, kc, cw, acc, scale[i:j], rows_clean=True)
        l[i:j] = lc
        dh[i:j] = g @ (wa if wl == "CH" else wa.T)
        for c0 in range(0, C, block):
            c1 = min(C, c0 + block)
            if wl == "CH":
                dw[c0:c1] += g[:, c0:c1].T @ hc
            else:
                dw[:, c0:c1] += hc.T @ g[:, c0:c1]
        if db is not None:
            db += g.sum(0)
    if not want_grad:
        return l
    return l, (dh, dw.astype(w.dtype, copy=False), None if db is None else db.astype(b.dtype, copy=False))


def _linear_value_and_grad(self: Any, fn: Any, st: Any, *arrays: Any) -> Any:
    with np.errstate(all="ignore"):
        value, grads = fn(self, st, *arrays, want_grad=True)
    return np.asarray(value), grads


NumpyBackend.plain_chunk_grad = _plain_chunk_grad  # type: ignore[attr-defined]
NumpyBackend.linear_token_loss = _linear_token_loss  # type: ignore[attr-defined]
NumpyBackend.linear_value_and_grad = _linear_value_and_grad  # type: ignore[attr-defined]
