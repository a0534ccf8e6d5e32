"""JAX backend: jnp logsumexp along any class axis; the numeric core runs through a cached jax.jit
(op-by-op dispatch costs ~30x more than a jitted call)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import XSeqLossError, XSeqLossTypeError
from ..linear import even_chunk
from . import _common
from .numpy import NumpyBackend

_I32 = np.iinfo(np.int32)
_KINDS: dict[Any, str] = {}


class JaxBackend(NumpyBackend):
    name = "jax"
    host_probe = False  # the probe rides in the jitted core
    type_name = "a jax.Array"
    # NumPy's eager kernels (in-place writes) do not apply: the jitted core and jax.grad do it all
    native_default_loss = None
    fused_value_and_grad = None
    host_view = None

    def __init__(self) -> None:
        self._jitted: dict[Any, Any] = {}

    def convert(self, x: Any, argument: str, like: Any = None) -> Any:
        try:
            arr = np.asarray(x) if not isinstance(x, np.ndarray) else x
        except Exception as exc:  # pragma: no cover
            raise XSeqLossTypeError(f"{argument} could not be converted to an array: {exc}") from exc
        if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8 and not jax.config.jax_enable_x64 and arr.size:
            lo, hi = arr.min(), arr.max()
            if lo < _I32.min or hi > _I32.max:
                bad = int(np.argmax((arr < _I32.min) | (arr > _I32.max)))
                pos = np.unravel_index(bad, arr.shape)
                raise XSeqLossError(
                    f"{argument}{list(int(i) for i in pos)} = {arr[pos]} does not fit in int32, JAX's index type "
                    f"without x64: valid range [{_I32.min}, {_I32.max}]; enable jax_enable_x64 "
                    f"(jax.config.update('jax_enable_x64', True)) - it would be truncated silently otherwise")
        out = jnp.asarray(arr)
        return self.to_device(out, like) if like is not None else out

    def to_device(self, x: Any, like: Any) -> Any:
        if like is None or isinstance(x, jax.core.Tracer) or isinstance(like, jax.core.Tracer):
            return x
        if x.sharding is not like.sharding and x.devices() != like.devices():
            return jax.device_put(x, like.sharding)
        return x

    def kind(self, x: Any) -> str:
        d = x.dtype
        k = _KINDS.get(d)  # jnp.issubdtype costs microseconds a call: once per dtype
        if k is None:
            if jnp.issubdtype(d, jnp.floating):
                k = "f"
            elif d == jnp.bool_:
                k = "b"
            elif jnp.issubdtype(d, jnp.unsignedinteger):
                k = "u"
            elif jnp.issubdtype(d, jnp.integer):
                k = "i"
            else:
                k = "o"
            _KINDS[d] = k
        return k

    def tracing(self, x: Any) -> bool:
        return isinstance(x, jax.core.Tracer)

    def index_dtype(self, y: Any) -> Any:
        """int64 labels with x64, int32 without; unsigned values past that range (uint64, or uint32
        without x64) saturate at its maximum instead of wrapping (see numpy.py)."""
        want = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        if y.dtype == want:
            return y
        if jnp.dtype(y.dtype).kind == "u" and jnp.dtype(y.dtype).itemsize >= jnp.dtype(want).itemsize:
            v = jax.lax.bitcast_convert_type(y.astype(jnp.dtype(f"uint{8 * jnp.dtype(want).itemsize}")), want)
            return jnp.where(v < 0, jnp.iinfo(want).max, v)  # a negative means past want's maximum
        return y.astype(want)

    def index_limits(self) -> tuple[int, int]:
        """The range of the label dtype: an ignore value outside it can never match a label."""
        info = jnp.iinfo(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
        return int(info.min), int(info.max)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def any_true(self, x: Any) -> bool:
        return bool(jnp.any(x))

    def isfinite_any_dtype(self, x: Any) -> Any:
        return jnp.isfinite(x)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == jnp.bool_ else m != 0


    def _jit(self, fn: Any, grad: str, st: Any, present: tuple[bool, ...]) -> Any:
        """fn jitted for one plan, taking only the arrays a call gives: a static argument is hashed
        and compared, and every None walked, on each call, which cost more than the tiny call itself.
        ``grad``: "" (fn's value), "vjp" (value and gradient) or "vjp_aux" (fn returns (value,
        aux): value, gradient and aux)."""
        key = (fn, grad, st, present)
        f = self._jitted.get(key)
        if f is None:
            def core(*given: Any) -> Any:
                it = iter(given)
                return fn(self, st, *[next(it) if p else None for p in present])

            if grad:
                aux = grad == "vjp_aux"

                def vg(z: Any, *given: Any) -> Any:
                    out, vjp, *rest = jax.vjp(lambda zz: core(zz, *given), z, has_aux=aux)
                    return (out, vjp(jnp.ones_like(out))[0], *rest)
                f = jax.jit(vg)
            else:
                f = jax.jit(core)
            if len(self._jitted) >= 1024:
                self._jitted.clear()
            self._jitted[key] = f
        return f

    def run(self, fn: Any, st: Any, *arrays: Any) -> Any:
        present = tuple(a is not None for a in arrays)
        return self._jit(fn, "", st, present)(*[a for a in arrays if a is not None])

    def value_and_grad(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        present = (True, *(a is not None for a in arrays))
        return self._jit(fn, "vjp", st, present)(z, *[a for a in arrays if a is not None])

    def value_and_grad_flagged(self, fn: Any, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any, Any]:
        """value_and_grad of fn returning (value, value-check flags), the flags read from the same
        program: one dispatch and one wait instead of two."""
        present = (True, *(a is not None for a in arrays))
        return self._jit(fn, "vjp_aux", st, present)(z, *[a for a in arrays if a is not None])

    # ---- ops
    def stack(self, xs: Any) -> Any:
        return jnp.stack(xs)

    def acc_dtype(self, z: Any) -> Any:
        return jnp.float64 if z.dtype == jnp.float64 else jnp.float32

    def wide_dtype(self) -> Any:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def cast(self, x: Any, dtype: Any) -> Any:
        return jnp.asarray(x).astype(dtype)

    where = staticmethod(jnp.where)
    expand = staticmethod(jnp.expand_dims)
    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    tanh = staticmethod(jnp.tanh)
    abs = staticmethod(jnp.abs)
    isfinite = staticmethod(jnp.isfinite)
    maximum = staticmethod(jnp.maximum)
    zeros_like = staticmethod(jnp.zeros_like)
    stop_gradient = staticmethod(jax.lax.stop_gradient)  # type: ignore[assignment]

    def sum(self, x: Any, axis: Any) -> Any:
        return jnp.sum(x, axis=axis)

    def max(self, x: Any, axis: int) -> Any:
        return jnp.max(x, axis=axis)

    def min(self, x: Any, axis: int) -> Any:
        return jnp.min(x, axis=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return jnp.any(x, axis=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return jnp.all(x, axis=axis)

    def count(self, flags: Any, axis: Any) -> Any:
        return jnp.sum(flags, axis=axis, dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        return jnp.take_along_axis(x, jnp.expand_dims(y, k), axis=k).squeeze(k)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse - z[y] with the gradient (softmax - onehot) formed in the same fused pass as the loss
        (a custom JVP: XLA's autodiff of logsumexp would recompute the softmax in the backward);
        the "native" kernel: plain autodiff of the generic formula."""
        if st is not None and st.engine.kernel == "native":
            return _common.nll(self, z, y, keep, k, acc)
        if keep is None:
            keep = jnp.ones(y.shape, bool)
        return _fused_nll(z, y, keep, k, jnp.dtype(acc).name)

    def classdot(self, x: Any, w: Any, k: int) -> Any:
        return jnp.moveaxis(x, k, -1) @ w

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        """g + vals at class y along k (the fused layer's analytic gradient; autodiff elsewhere):
        an iota comparison XLA fuses into the elementwise pass, never a stored one-hot."""
        classes = jax.lax.broadcasted_iota(y.dtype, g.shape, k)
        return g + jnp.where(classes == jnp.expand_dims(y, k), jnp.expand_dims(vals, k).astype(g.dtype), 0)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return jnp.full(jnp.shape(like), value, dtype)

    def true_like(self, like: Any) -> Any:
        return jnp.ones(jnp.shape(like), bool)

    def drop_class(self, z: Any, k: int) -> Any:
        return jnp.take(z, 0, axis=k)

    def size(self, x: Any) -> Any:
        return jnp.asarray(jnp.size(x))

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 in like's integer dtype (a floating like: the default integer type)."""
        dt = None if like is None or not jnp.issubdtype(like.dtype, jnp.integer) else like.dtype
        return jnp.arange(n, dtype=dt)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return jnp.moveaxis(x, src, dst)

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[jnp.arange(h.shape[0]), idx]

    # ---- token-level ops for shift, segments and ragged rows (O(tokens), never the logits)
    def concat(self, xs: Any, axis: int) -> Any:
        return jnp.concatenate(xs, axis=axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return jnp.full_like(x, value)

    def cumsum(self, x: Any, axis: int) -> Any:
        return jnp.cumsum(x, axis=axis, dtype=x.dtype)

    def segment_sum(self, v: Any, j: Any) -> Any:
        return jnp.zeros_like(v).at[jnp.arange(v.shape[0])[:, None], j].add(v)

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        return jnp.take_along_axis(x, idx, axis=axis)

    def flat(self, x: Any) -> Any:
        return jnp.reshape(x, (-1,))

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        return jnp.zeros(int(size), v.dtype).at[idx].set(v)

    def reshape_like(self, x: Any, like: Any) -> Any:
        return jnp.reshape(x, jnp.shape(like))

    def reshape_rows(self, x: Any) -> Any:
        return jnp.reshape(x, (-1, jnp.shape(x)[-1]))

    def pad_stack(self, items: Any, T: int, fill: Any) -> Any:
        if not items:
            return jnp.zeros((0, T), jnp.int32)
        return jnp.stack([jnp.pad(v, [(0, T - v.shape[0])] + [(0, 0)] * (v.ndim - 1), constant_values=fill)
                          for v in items])

    def permute(self, x: Any, perm: Any) -> Any:
        return jnp.transpose(x, perm)

    def zeros_shape(self, shape: Any, like: Any) -> Any:
        return jnp.zeros(shape)

    @staticmethod
    def version() -> str:
        return jax.__version__

    @staticmethod
    def devices() -> list[str]:
        return [f"{d.platform}:{d.id}" for d in jax.devices()]


def _nll_and_grad(z: Any, y: Any, keep: Any, k: int, acc: str) -> tuple[Any, Any]:
    x = z.astype(acc)
    m = jax.lax.stop_gradient(jnp.max(x, axis=k, keepdims=True))
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(x - m)
    s = jnp.sum(e, axis=k, keepdims=True)
    xy = jnp.take_along_axis(x, jnp.expand_dims(y, k), axis=k)
    l = jnp.squeeze(jnp.log(s) - (xy - m), k)  # the max-shifted frame (exact near 1e4)
    classes = jax.lax.broadcasted_iota(y.dtype, x.shape, k)
    onehot = classes == jnp.expand_dims(y, k)  # fused into the elementwise pass, never materialised
    g = e / s - onehot.astype(x.dtype)
    keep_c = jnp.expand_dims(keep, k)
    return jnp.where(keep, l, 0.0), jnp.where(keep_c, g, 0.0)  # exact 0 where rows do not count


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fused_nll(z: Any, y: Any, keep: Any, k: int, acc: str) -> Any:
    return _nll_and_grad(z, y, keep, k, acc)[0]


@_fused_nll.defjvp
def _fused_nll_jvp(k: int, acc: str, primals: Any, tangents: Any) -> Any:
    z, y, keep = primals
    l, g = _nll_and_grad(z, y, keep, k, acc)
    return l, jnp.sum(g * tangents[0].astype(acc), axis=k)


BACKEND = JaxBackend()


# ------------------------------------------------------------------------ the fused output layer
#
# linear_cross_entropy (xseqloss/linear.py): a custom_vjp over a lax.scan of chunks, so XLA holds
# one chunk's logits at a time. The forward forms the gradients with the expected upstream factor;
# the backward returns them scaled when the upstream is a uniform multiple of it, and scans the
# chunks again with the upstream otherwise (a cotangent of reduction="none"). Matmuls take the
# inputs' dtype with a float32 (or wider) result: no float32 copy of a 16-bit weight.


def _linear_parts(kst: Any, acc: Any, chunk: int, wl: str, h2: Any, w: Any, b: Any, y: Any, t: Any,
                  keep: Any) -> Any:
    """The chunk geometry shared by the forward scan and the backward loop: the token arrays
    padded to whole chunks (rows past R never count), the weight, the matmul."""
    R = h2.shape[0]
    n = max(1, -(-R // chunk))
    P = n * chunk - R

    def pad(a: Any, fill: Any) -> Any:
        return None if a is None else jnp.pad(a, [(0, P)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    keep = jnp.ones((R,), bool) if keep is None else keep
    xs = dict(h=pad(h2, 0), y=pad(y, 0), t=pad(t, 0), k=pad(keep, False))
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=acc)
    return n, pad, xs, w, dot


# contracting dimensions, never a transposed copy of the weight (XLA hoists w.T out of the loop as
# a (H, C) copy: 131 MB at 1,024 x 32,000)
_TC = (((1,), (1,)), ((), ()))   # a (t, k) . b (n, k) -> (t, n)
_TN = (((1,), (0,)), ((), ()))   # a (t, k) . b (k, n) -> (t, n)
_TT = (((0,), (0,)), ((), ()))   # a (k, m) . b (k, n) -> (m, n)


# d weight is accumulated CLASS_BLOCK classes at a time, in place: XLA does not fuse a matmul into
# the add that accumulates it, so a whole chunk's d weight term would be a (C, H) temporary, as
# large as d weight itself (131 MB at 32,000 x 1,024). Peak extra memory of forward+backward at
# 8,192 x 1,024 x 32,000: 0.30 L without the blocks, 0.07 L with them (benchmarks/linear_bench.py).
CLASS_BLOCK = 4096


def _add_dw(dw: Any, gw: Any, hc: Any, wl: str, dot: Any) -> Any:
    """dw + the chunk's d weight term (gw: (t, C) the chunk's logit gradient, hc: (t, H)), a block
    of classes at a time. The last block starts at C - CLASS_BLOCK and masks the classes an
    earlier block added."""
    C = gw.shape[1]
    cb = CLASS_BLOCK
    if C <= cb:
        return dw + (dot(gw, hc, _TT) if wl == "CH" else dot(hc, gw, _TT))
    axis = 0 if wl == "CH" else 1

    def block(j: Any, dw: Any) -> Any:
        c0 = j * cb
        start = jnp.minimum(c0, C - cb)
        g = jax.lax.dynamic_slice_in_dim(gw, start, cb, 1)
        g = jnp.where((start + jnp.arange(cb) >= c0)[None, :], g, jnp.zeros((), g.dtype))
        term = dot(g, hc, _TT) if wl == "CH" else dot(hc, g, _TT)
        old = jax.lax.dynamic_slice_in_dim(dw, start, cb, axis)
        return jax.lax.dynamic_update_slice_in_dim(dw, old + term, start, axis)
    return jax.lax.fori_loop(0, -(-C // cb), block, dw)


def _linear_chunk(kst: Any, acc: Any, wl: str, w: Any, b: Any, cw: Any, dot: Any, x: Any, s: Any,
                  dw: Any = None) -> Any:
    """One chunk: its losses, and with a scale ``s`` its d hidden, ``dw`` plus its d weight term,
    and its d bias term."""
    from ..linear import chunk_grad, counted_rows
    hc = counted_rows(BACKEND, x["h"], x["k"])
    z = dot(hc, w, _TC if wl == "CH" else _TN)
    if b is not None:
        z = z + b.astype(acc)
    if s is None:
        return _token_loss_fn()(BACKEND, kst, z, x["y"], x["t"], x["k"], cw, acc, False, k=1, rows_clean=True)[0]
    l, g = chunk_grad(BACKEND, kst, z, x["y"], x["t"], x["k"], cw, acc, s, rows_clean=True)
    gw = g.astype(w.dtype) if w.dtype != acc else g  # the weight's dtype, float32 accumulation
    dh = dot(gw, w, _TN if wl == "CH" else _TC)
    return l, dh, _add_dw(dw, gw, hc, wl, dot), (None if b is None else g.sum(0))


def _linear_scan(kst: Any, acc: Any, chunk: int, wl: str, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                 cw: Any, scale: Any, grads: bool) -> Any:
    """Losses (R,), and with ``grads`` d hidden padded to whole chunks, d weight, d bias."""
    R, H = h2.shape
    n, pad, xs, _, dot = _linear_parts(kst, acc, chunk, wl, h2, w, b, y, t, keep)
    xs = {k: None if v is None else v.reshape((n, chunk) + v.shape[1:]) for k, v in xs.items()}
    if grads:
        xs["s"] = pad(scale, 0).reshape(n, chunk)
        xs["i"] = jnp.arange(n, dtype=jnp.int32)

    def body(carry: Any, x: Any) -> Any:
        if not grads:
            return carry, _linear_chunk(kst, acc, wl, w, b, cw, dot, x, None)
        dh, dw, db = carry
        l, dhc, dw, dbc = _linear_chunk(kst, acc, wl, w, b, cw, dot, x, x["s"], dw)
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dhc.astype(dh.dtype), x["i"] * chunk, 0)
        return (dh, dw, None if db is None else db + dbc), l

    # d hidden is carried and written in place, a chunk at a time, like d weight: as the scan's
    # stacked output it was a temporary that the backward copied into the returned gradient (a
    # d-hidden-sized buffer that grew with the tokens: 64 MB at 16,384 x 1,024)
    init = (jnp.zeros((n * chunk, H), h2.dtype), jnp.zeros(w.shape, acc), None if b is None else jnp.zeros(b.shape, acc))
    carry, out = jax.lax.scan(body, init if grads else None, xs)
    if not grads:
        return out.reshape(-1)[:R]
    dh, dw, db = carry
    return out.reshape(-1)[:R], dh, dw, db


def _linear_again(kst: Any, acc: Any, chunk: int, wl: str, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                  cw: Any, ct: Any, trips: Any, dh: Any, dw: Any, db: Any) -> Any:
    """The chunks again with the cotangent ``ct``, for ``trips`` (n or 0) chunks, accumulating into
    the given buffers: a while loop whose carry is the residuals, so no second set of gradient
    buffers exists (a lax.cond would size both branches' buffers into the program)."""
    n, pad, xs, _, dot = _linear_parts(kst, acc, chunk, wl, h2, w, b, y, t, keep)
    sp = pad(ct, 0)

    def piece(a: Any, i: Any) -> Any:
        return None if a is None else jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, 0)

    def body(state: Any) -> Any:
        i, dh, dw, db = state
        x = {k: piece(v, i) for k, v in xs.items()}
        _, dhc, dw, dbc = _linear_chunk(kst, acc, wl, w, b, cw, dot, x, piece(sp, i), dw)
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dhc.astype(dh.dtype), i * chunk, 0)
        return i + 1, dh, dw, None if db is None else db + dbc

    _, dh, dw, db = jax.lax.while_loop(lambda st: st[0] < trips, body, (jnp.zeros((), jnp.int32), dh, dw, db))
    return dh, dw, db


def _token_loss_fn() -> Any:
    from .._token_loss import token_loss
    return token_loss


@functools.lru_cache(maxsize=256)
def _jax_linear(kst: Any, acc: str, chunk: int, wl: str) -> Any:
    @jax.custom_vjp
    def f(h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, hint: Any) -> Any:
        return _linear_scan(kst, acc, chunk, wl, h2, w, b, y, t, keep, cw, hint, False)

    def fwd(h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, hint: Any) -> Any:
        l, dh, dw, db = _linear_scan(kst, acc, chunk, wl, h2, w, b, y, t, keep, cw, hint, True)
        return l, (dh, dw, db, (h2, w, b, y, t, keep, cw, hint))

    def bwd(res: Any, ct: Any) -> Any:
        dh, dw, db, inputs = res
        h2, w, b, y, t, keep, cw, hint = inputs
        nz = hint != 0
        ratio = jnp.where(nz, ct / jnp.where(nz, hint, 1.0), jnp.nan)
        r = jnp.nanmax(jnp.where(nz, ratio, -jnp.inf)) if hint.size else jnp.zeros((), acc)
        r = jnp.where(jnp.any(nz), r, 0.0)
        uniform = jnp.all(jnp.where(nz, ratio == r, ct == 0))
        # uniform: the formed gradients times r (a scaled loss, the expected upstream); otherwise
        # zeros and every chunk again with the cotangent (reduction="none" with a random one)
        scaled = lambda a: None if a is None else jnp.where(uniform, a * r.astype(a.dtype), jnp.zeros((), a.dtype))  # noqa: E731
        n = max(1, -(-h2.shape[0] // chunk))
        gh, gw, gb = _linear_again(kst, acc, chunk, wl, h2, w, b, y, t, keep, cw, ct,
                                   jnp.where(uniform, 0, n).astype(jnp.int32), scaled(dh), scaled(dw), scaled(db))
        gh = gh[:h2.shape[0]].astype(h2.dtype)
        gw = gw.astype(w.dtype)
        gb = None if gb is None else gb.astype(b.dtype)
        zero = lambda a: None if a is None or not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a)  # noqa: E731
        return gh, gw, gb, None if y is None else zero(y), zero(t), None if keep is None else zero(keep), zero(cw), \
            jnp.zeros_like(hint)

    f.defvjp(fwd, bwd)
    return f


def _linear_token_loss(self: Any, kst: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any,
                       scale_fn: Any, chunk: int, wl: str, want_grad: bool, cp: Any) -> Any:
    if cp is not None:
        from .class_parallel_jax import jax_linear
        return jax_linear(self, kst, h2, w, b, y, t, keep, cw, acc, even_chunk(h2.shape[0], chunk), wl)
    hint = jax.lax.stop_gradient(scale_fn())
    return _jax_linear(kst, jnp.dtype(acc).name, even_chunk(h2.shape[0], chunk), wl)(h2, w, b, y, t, keep, cw, hint)


def _linear_value_and_grad(self: Any, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
    present = tuple(a is not None for a in arrays)
    key = (fn, "linear_vjp", st, b is not None, present)
    f = self._jitted.get(key)
    if f is None:
        def vg(h: Any, w: Any, b: Any, *given: Any) -> Any:
            it = iter(given)
            rest = [next(it) if p else None for p in present]
            out, vjp = jax.vjp(lambda hh, ww, bb: fn(self, st, hh, ww, bb, *rest), h, w, b)
            return out, vjp(jnp.ones_like(out))
        f = self._jitted[key] = jax.jit(vg)
    out, grads = f(h, w, b, *[a for a in arrays if a is not None])
    return out, tuple(grads)


JaxBackend.linear_token_loss = _linear_token_loss  # type: ignore[attr-defined]
JaxBackend.linear_value_and_grad = _linear_value_and_grad  # type: ignore[attr-defined]
JaxBackend.plain_chunk_grad = None  # type: ignore[attr-defined]
