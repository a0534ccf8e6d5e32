"""NumPy's ops: conversion, running the core (eagerly, warnings off), and the array ops that
differ from the shared array-API ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._errors import XSeqLossTypeError
from ...core import common
from .._array_api import ArrayApiOps

_INT64_MAX = np.iinfo(np.int64).max


class NumpyOps(ArrayApiOps):
    xp = np
    name = "numpy"
    type_name = "a NumPy array"
    host_probe = True  # eager: the softmax-input probe reads a few rows on the host

    @staticmethod
    def version() -> str:
        return np.__version__

    @staticmethod
    def devices() -> list[str]:
        return ["cpu"]

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

    def host_view(self, x: Any) -> Any:
        return x

    # ---- running the core
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
    def wide_dtype(self) -> Any:
        return np.float64

    def cast(self, x: Any, dtype: Any) -> Any:
        return np.asarray(x).astype(dtype, copy=False)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def count(self, flags: Any, axis: Any) -> Any:
        return np.sum(flags, axis=axis, dtype=np.int64)

    def add_class(self, g: Any, y: Any, vals: Any, k: int) -> Any:
        yk = np.expand_dims(y, k)
        np.put_along_axis(g, yk, np.take_along_axis(g, yk, axis=k) + np.expand_dims(vals, k), axis=k)
        return g

    def size(self, x: Any) -> Any:
        return np.int64(np.size(x))

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 in like's integer dtype (int64 for a floating like)."""
        return np.arange(n, dtype=np.int64 if like is None or like.dtype.kind not in "iu" else like.dtype)

    def cumsum(self, x: Any, axis: int) -> Any:
        return np.cumsum(x, axis=axis)

    def segment_sum(self, v: Any, j: Any) -> Any:
        out = np.zeros(v.shape, v.dtype)
        np.add.at(out, (np.arange(v.shape[0])[:, None], j), v)
        return out

    def scatter(self, v: Any, idx: Any, size: Any) -> Any:
        out = np.zeros(int(size), v.dtype)
        out[idx] = v
        return out

    def pad_stack(self, items: Any, T: int, fill: Any) -> Any:
        ref = items[0] if items else np.zeros(0, np.int64)
        out = np.full((len(items), T, *np.shape(ref)[1:]), fill, dtype=np.asarray(ref).dtype)
        for i, v in enumerate(items):
            out[i, :len(v)] = v
        return out

    def as_index(self, x: Any) -> Any:
        return np.asarray(x).astype(np.int64)

    def zeros_shape(self, shape: Any, like: Any) -> Any:
        return np.zeros(shape, np.float32)

    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        return common.nll(self, z, y, keep, k, acc, differentiable=False)  # NumPy has no autodiff
