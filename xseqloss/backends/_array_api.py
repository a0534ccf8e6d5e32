"""The ops NumPy and JAX share: both follow the NumPy array API (``xp``), so each op is written once
here over ``xp`` and each of the two backends adds only what differs (conversion, running, dtypes,
scatter)."""

from __future__ import annotations

import math
from typing import Any


class ArrayApiOps:
    xp: Any = None  # numpy or jax.numpy

    def where(self, c: Any, a: Any, b: Any) -> Any:
        return self.xp.where(c, a, b)

    def expand(self, x: Any, axis: int) -> Any:
        return self.xp.expand_dims(x, axis)

    def exp(self, x: Any) -> Any:
        return self.xp.exp(x)

    def log(self, x: Any) -> Any:
        return self.xp.log(x)

    def tanh(self, x: Any) -> Any:
        return self.xp.tanh(x)

    def abs(self, x: Any) -> Any:
        return self.xp.abs(x)

    def isfinite(self, x: Any) -> Any:
        return self.xp.isfinite(x)

    def isfinite_any_dtype(self, x: Any) -> Any:
        return self.xp.isfinite(x)

    def maximum(self, x: Any, v: float) -> Any:
        return self.xp.maximum(x, v)

    def zeros_like(self, x: Any) -> Any:
        return self.xp.zeros_like(x)

    def nonzero(self, m: Any) -> Any:
        return m if m.dtype == self.xp.bool_ else m != 0

    def stack(self, xs: list) -> Any:
        return self.xp.stack(xs)

    def acc_dtype(self, z: Any) -> Any:
        return self.xp.float64 if z.dtype == self.xp.float64 else self.xp.float32

    def dtype(self, x: Any) -> Any:
        return x.dtype

    def sum(self, x: Any, axis: Any) -> Any:
        return self.xp.sum(x, axis=axis)

    def max(self, x: Any, axis: Any) -> Any:
        return self.xp.max(x, axis=axis)

    def min(self, x: Any, axis: Any) -> Any:
        return self.xp.min(x, axis=axis)

    def any(self, x: Any, axis: Any) -> Any:
        return self.xp.any(x, axis=axis)

    def all(self, x: Any, axis: Any) -> Any:
        return self.xp.all(x, axis=axis)

    def take(self, vec: Any, idx: Any) -> Any:
        return vec[idx]

    def take_class(self, x: Any, y: Any, k: int) -> Any:
        return self.xp.take_along_axis(x, self.xp.expand_dims(y, k), axis=k).squeeze(k)

    def reshape_class(self, w: Any, k: int, ndim: int) -> Any:
        shape = [1] * ndim
        shape[k] = -1
        return w.reshape(shape)

    def full_tokens(self, like: Any, value: float, dtype: Any) -> Any:
        return self.xp.full(self.xp.shape(like), value, dtype)

    def true_like(self, like: Any) -> Any:
        return self.xp.ones(self.xp.shape(like), bool)

    def drop_class(self, z: Any, k: int) -> Any:
        return self.xp.take(z, 0, axis=k)

    def dim(self, x: Any, axis: int) -> int:
        return x.shape[axis]

    def ndim(self, x: Any) -> int:
        return x.ndim

    def size_of(self, x: Any) -> int:
        return int(self.xp.size(x))

    def moveaxis(self, x: Any, src: int, dst: int) -> Any:
        return self.xp.moveaxis(x, src, dst)

    def permute(self, x: Any, perm: Any) -> Any:
        return self.xp.transpose(x, perm)

    def concat(self, xs: list, axis: int) -> Any:
        return self.xp.concatenate(xs, axis=axis)

    def full_like(self, x: Any, value: Any) -> Any:
        return self.xp.full_like(x, value)

    def gather_along(self, x: Any, idx: Any, axis: int) -> Any:
        return self.xp.take_along_axis(x, idx, axis=axis)

    def flat(self, x: Any) -> Any:
        return self.xp.reshape(x, (-1,))

    def reshape_like(self, x: Any, like: Any) -> Any:
        return self.xp.reshape(x, self.xp.shape(like))

    def reshape_rows(self, x: Any) -> Any:
        shape = self.xp.shape(x)  # rows counted, not -1: an H of 0 leaves -1 undetermined
        return self.xp.reshape(x, (math.prod(shape[:-1]), shape[-1]))

    def argmax(self, x: Any, k: int) -> Any:
        return self.xp.argmax(x, axis=k)  # the first maximal index (NumPy and JAX both)

    def pick_step(self, h: Any, idx: Any) -> Any:
        return h[self.xp.arange(h.shape[0]), idx]

    def to_numpy(self, x: Any) -> Any:
        import numpy as np
        return np.asarray(x)

    def any_true(self, x: Any) -> bool:
        return bool(self.xp.any(x))
