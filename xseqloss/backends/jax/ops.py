"""JAX's ops: conversion (int64 labels that do not fit int32 without x64 are an error, never a
silent truncation), the core run through a cached ``jax.jit`` per plan (op-by-op dispatch costs
~30x more than a jitted call), the array ops that differ from the shared array-API ones, and the
plain kernel (a custom JVP: XLA's autodiff of logsumexp would recompute the softmax)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._errors import XSeqLossError, XSeqLossTypeError
from ...core import common
from .._array_api import ArrayApiOps

_I32 = np.iinfo(np.int32)
_KINDS: dict[Any, str] = {}


_LIMITS = {x64: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for x64, t in ((True, np.int64), (False, np.int32))}


class JaxOps(ArrayApiOps):
    xp = jnp
    name = "jax"
    host_probe = False  # the probe rides in the jitted core
    type_name = "a jax.Array"

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
        xs, ls = x.sharding, like.sharding
        if xs is not ls and xs != ls and x.devices() != like.devices():
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

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(x.shape)

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
        return _LIMITS[bool(jax.config.jax_enable_x64)]

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
    def wide_dtype(self) -> Any:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def cast(self, x: Any, dtype: Any) -> Any:
        return jnp.asarray(x).astype(dtype)

    stop_gradient = staticmethod(jax.lax.stop_gradient)  # type: ignore[assignment]

    def count(self, flags: Any, axis: Any) -> Any:
        return jnp.sum(flags, axis=axis, dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse - z[y] with the gradient (softmax - onehot) formed in the same fused pass as the loss
        (a custom JVP: XLA's autodiff of logsumexp would recompute the softmax in the backward);
        the "native" kernel: plain autodiff of the generic formula."""
        if st is not None and st.engine.kernel == "native":
            return common.nll(self, z, y, keep, k, acc)
        if keep is None:
            keep = jnp.ones(y.shape, bool)
        return _fused_nll(z, y, keep, k, jnp.dtype(acc).name)

    def plain_ce(self, z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None, out: Any = None) -> Any:
        """The plain kernel (plan/ops.py): loss and gradient in one fused XLA pass (no buffer to
        reuse: XLA assigns them)."""
        if keep is None:
            keep = jnp.ones(y.shape, bool)
        l, g = _nll_and_grad(z, y, keep, k, jnp.dtype(acc).name)
        if scale is None:
            return l, None
        g = jnp.where(jnp.expand_dims(keep, k), g * jnp.expand_dims(scale, k).astype(g.dtype), 0.0)
        return l, g.astype(z.dtype)

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        """g + vals at class y along k (the fused layer's analytic gradient; autodiff elsewhere):
        an iota comparison XLA fuses into the elementwise pass, never a stored one-hot."""
        classes = jax.lax.broadcasted_iota(y.dtype, g.shape, k)
        return g + jnp.where(classes == jnp.expand_dims(y, k), jnp.expand_dims(vals, k).astype(g.dtype), 0)

    def size(self, x: Any) -> Any:
        return jnp.asarray(jnp.size(x))

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 in like's integer dtype (a floating like: the default integer type)."""
        dt = None if like is None or not jnp.issubdtype(like.dtype, jnp.integer) else like.dtype
        return jnp.arange(n, dtype=dt)

    def cumsum(self, x: Any, axis: int) -> Any:
        return jnp.cumsum(x, axis=axis, dtype=x.dtype)

    def segment_sum(self, v: Any, j: Any) -> Any:
        return jnp.zeros_like(v).at[jnp.arange(v.shape[0])[:, None], j].add(v)

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        return jnp.zeros(int(size), v.dtype).at[idx].set(v)

    def pad_stack(self, items: Any, T: int, fill: Any) -> Any:
        if not items:
            return jnp.zeros((0, T), jnp.int32)
        return jnp.stack([jnp.pad(v, [(0, T - v.shape[0])] + [(0, 0)] * (v.ndim - 1), constant_values=fill)
                          for v in items])

    def as_index(self, x: Any) -> Any:
        return x.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)

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
