"""NumPy backend: logsumexp along any class axis; the gradient is analytic (``_loss.token_loss``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import XSeqLossTypeError
from . import _common


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
        return y if y.dtype == np.int64 else y.astype(np.int64)  # an integer cast, never a float one

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

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

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any) -> Any:
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
        return np.arange(n, dtype=np.int64 if like is None else like.dtype)

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return np.moveaxis(x, src, dst)

    def min(self, x: Any, axis: int) -> Any:
        return np.min(x, axis=axis)

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[np.arange(h.shape[0]), idx]


BACKEND = NumpyBackend()


def _version() -> str:
    return np.__version__


NumpyBackend.version = staticmethod(_version)  # type: ignore[attr-defined]
NumpyBackend.devices = staticmethod(lambda: ["cpu"])  # type: ignore[attr-defined]
