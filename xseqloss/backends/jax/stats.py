"""JAX's part of token_stats (API.md 11): the core's per-token outputs (core/stats.py) under a
``custom_vjp`` whose backward is the core's analytic gradient (exact for the entropy where p -> 1
and at -inf logits, where autodiff of the formula would give 0 * inf = NaN); the temperature gets a
zero cotangent."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ...core.stats import DIFFERENTIABLE, stats_rows, stats_vjp


@functools.lru_cache(maxsize=256)
def _with_vjp(ops: Any, st: Any, acc: str, number: float | None) -> Any:
    dt = jnp.dtype(acc)

    def temp_of(temp: Any) -> Any:
        return number if temp is None else temp

    @jax.custom_vjp
    def f(z: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        return stats_rows(ops, st, z, y, ids, keep, temp_of(temp), dt)[0]

    def fwd(z: Any, y: Any, ids: Any, keep: Any, temp: Any) -> Any:
        out, saved = stats_rows(ops, st, z, y, ids, keep, temp_of(temp), dt)
        return out, (z, y, ids, keep, temp, saved)

    def bwd(res: Any, cts: Any) -> Any:
        z, y, ids, keep, temp, saved = res
        ct = {n: c for n, c in cts.items() if n in DIFFERENTIABLE}
        g = stats_vjp(ops, st, z, y, ids, keep, temp_of(temp), dt, saved, ct).astype(z.dtype)
        return g, None, None, None, None if temp is None else jnp.zeros_like(temp)

    f.defvjp(fwd, bwd)
    return f


class JaxStats:
    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        number = temp if isinstance(temp, float) else None
        return _with_vjp(self, st, jnp.dtype(acc).name, number)(z, y, ids, keep, None if number is not None else temp)

    def stats_vjp(self, fwd: Any, vjp: Any, st: Any, arrays: tuple, cts: dict) -> Any:
        names = tuple(cts)
        present = tuple(a is not None for a in arrays[1:])
        key = (fwd, "stats_vjp", st, present, names)
        f = self._jitted.get(key)
        if f is None:
            def g(z: Any, ct: Any, *given: Any) -> Any:
                it = iter(given)
                rest = [next(it) if p else None for p in present]
                _, pull = jax.vjp(lambda zz: {n: fwd(self, st, zz, *rest)[n] for n in names}, z)
                return pull(ct)[0]
            f = self._jitted[key] = jax.jit(g)
        return f(arrays[0], {n: jnp.asarray(c) for n, c in cts.items()}, *[a for a in arrays[1:] if a is not None])
