"""The one documented internal surface (docs/architecture.md): what the tests, the conformance
suite and the benchmarks use beyond the public API. Nothing here is part of the API contract; it
changes with the package's structure, and only this module's names are promised to the tests.

* ``engine``: which kernel each backend runs and the sizes it switches at (``engine.use(backend,
  kernel, **sizes)`` forces one within a block; ``engine.current(backend)``);
* ``backend(name)``: the backend object (``plan.ops.Backend``: its ops, kernels and hooks);
* ``part(name, part)``: one part of a backend package (``part("torch", "fused")``), for the tests
  that check a part alone or plant a bug in it;
* ``core``: the core's modules (``core.backward``, ``core.token_loss``, ``core.linear`` ...);
* ``contract``: the backend contract (``contract.REQUIRED``, ``contract.HOOKS``);
* ``prepare_call``: a call prepared as ``sequence_cross_entropy`` prepares it (``Call``: its
  backend, plan and arrays); ``prepare_plain(logits, targets, options)``: the same through the
  per-signature cache of calls without side arrays (what the public functions use).

>>> from xseqloss.internals import engine
>>> engine.current("numpy").kernel
'auto'
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from . import _dispatch
from .api.prepare import prepare_call, prepare_plain
from .core import backward, chunks, common, compute, linear, reduction, token_loss, tokens
from .plan import engine
from .plan import ops as contract

__all__ = ["engine", "backend", "part", "core", "contract", "prepare_call", "prepare_plain"]

core = SimpleNamespace(backward=backward, chunks=chunks, common=common, compute=compute, linear=linear,
                       reduction=reduction, token_loss=token_loss, tokens=tokens)


def backend(name: str) -> Any:
    """The backend object of ``name`` ("numpy", "torch", "tensorflow", "jax"); imports its framework."""
    return _dispatch.load(name)


def part(name: str, part: str) -> Any:
    """A part (module) of a backend package, e.g. ``part("torch", "fused")``."""
    return _dispatch.backend_part(name, part)
