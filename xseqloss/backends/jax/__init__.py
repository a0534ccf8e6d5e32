"""The JAX backend: pure, every call one cached ``jax.jit`` program per plan; works under jit, vmap
and grad. Composed from its parts: ``ops`` (conversion, running, array ops, the plain kernel with
its custom JVP), ``stats`` (token_stats under a custom VJP), ``linear`` / ``linear_stats`` (the fused
layer's loop and its custom VJPs), ``class_parallel``
(classes split over a mesh axis), ``collectives`` (tokens split over a mesh axis)."""

from __future__ import annotations

from ...plan.ops import Backend
from .class_parallel import JaxClassParallel
from .collectives import JaxCollectives
from .linear import JaxLinear
from .linear_stats import JaxLinearStats
from .ops import JaxOps
from .stats import JaxStats

__all__ = ["JaxBackend", "BACKEND"]


class JaxBackend(JaxOps, JaxStats, JaxLinear, JaxLinearStats, JaxClassParallel, JaxCollectives, Backend):
    """jax.Array (and tracers) on any device or sharding."""


BACKEND = JaxBackend()
