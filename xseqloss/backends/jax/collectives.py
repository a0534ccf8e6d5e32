"""JAX's collectives for tokens split across workers (API.md 9.1; the counts themselves are
xseqloss/distributed.py): ``jax.lax.psum`` over a named axis inside shard_map / pmap."""

from __future__ import annotations

from typing import Any

import jax

from ..._errors import XSeqLossError


class JaxCollectives:
    def worker_count(self, group: Any, axis_name: Any) -> Any:
        if axis_name is None:
            return 1
        names = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        return jax.lax.psum(1, names)

    def sum_over_workers(self, fn: str, local: Any, targets: Any, group: Any, axis_name: Any, validate: bool) -> Any:
        return _jax_sum(fn, local(), axis_name)


def _named_axes() -> tuple[Any, ...]:
    """The named axes bound where JAX is tracing now (shard_map, pmap, named vmap), or () when
    that cannot be told (a private API: its absence disables only the check, never the count)."""
    try:
        from jax._src import core
        return tuple(core.get_axis_env().axis_sizes)
    except Exception:  # pragma: no cover - other JAX versions
        return ()


def _jax_sum(fn: str, count: Any, axis_name: Any) -> Any:
    if axis_name is None:
        if isinstance(count, jax.core.Tracer):
            axes = _named_axes()
            if axes:
                raise XSeqLossError(
                    f"{fn}: the targets are traced inside a named map over the axes {axes} (shard_map / pmap): "
                    f"pass axis_name= (e.g. axis_name={axes[0]!r}) to sum the count over the workers, or "
                    f"axis_name=() to count this shard only. Under plain jax.jit with sharded global arrays no "
                    f"axis_name is needed")
        return count
    names = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    try:
        return jax.lax.psum(count, names)
    except NameError as exc:
        raise XSeqLossError(
            f"{fn}: axis_name={axis_name!r} is not bound here: call it inside jax.shard_map / jax.pmap over that "
            f"mesh axis; under plain jax.jit with sharded global arrays leave axis_name=None (the count of a "
            f"global array is already global)") from exc
