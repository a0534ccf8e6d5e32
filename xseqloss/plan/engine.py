"""Which kernel each backend runs, and the sizes its kernels switch at: one place, so that tests,
the conformance suite and benchmarks can force every path and check it (issue 11, API.md 10).

Kernels (``XSEQLOSS_<BACKEND>_KERNEL`` in the environment, read per call, or ``use()``):

* torch: ``auto`` (F.cross_entropy for small default calls on CPU, the chunked fused function for
  other eager calls, inductor's fusion of the generic core under torch.compile), ``native``
  (framework kernels only: F.cross_entropy, and autograd of the generic core for the options it
  lacks), ``chunked`` (the chunked fused function for every eager call), ``triton`` (the Triton
  kernel where it covers the options, on CUDA or under ``TRITON_INTERPRET=1``; else chunked).
* numpy: ``auto`` (a lean whole-array kernel for default calls, the chunked analytic gradient in
  ``value_and_grad``), ``native`` (the generic core on whole arrays), ``chunked`` (the chunked
  analytic gradient; no default-call kernel).
* tensorflow: ``auto`` (the XLA kernel for plain calls on large logits, the native
  SparseSoftmaxCrossEntropyWithLogits otherwise; the fused layer's token_stats chunk kernel by XLA
  on large chunks), ``native`` (never an XLA kernel), ``xla`` (the XLA kernels at every size).
* jax: ``auto`` (the fused custom_jvp nll), ``native`` (autodiff of the generic core).

The sizes (``use(chunk_elements=...)``) exist so that a small input can cross chunk boundaries and
reach the reusable gradient buffer: the conformance suite runs the chunked kernels with tiny
chunks, where a bug at a boundary shows on a 6-class case.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator

from .._errors import XSeqLossError

KERNELS = {"numpy": ("auto", "native", "chunked"), "torch": ("auto", "native", "chunked", "triton"),
           "tensorflow": ("auto", "native", "xla"), "jax": ("auto", "native")}
ENV = {name: f"XSEQLOSS_{name.upper()}_KERNEL" for name in KERNELS}


@dataclass(frozen=True)
class Engine:
    """The kernel and sizes of one backend for one call; part of the call's plan (``CallPlan``), so
    the programs JAX and TensorFlow cache per plan follow a change."""
    kernel: str = "auto"
    chunk_elements: int = 1 << 21      # torch / numpy chunked kernels: ~8 MB of float32 per chunk
    buffer_min_bytes: int = 64 << 20   # torch: the reusable CPU gradient buffer from this size on
    native_max_elements: int = 1 << 16  # torch: F.cross_entropy for default calls up to this size
    xla_min_elements: int = 1 << 22    # tensorflow: the XLA kernel from this size on


DEFAULT = _DEFAULT = Engine()
_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("xseqloss_engine", default=None)
_from_env: dict[tuple[str, str], Engine] = {}


def current(backend: str) -> Engine:
    """The engine of ``backend`` now: ``use()`` overrides, else the environment, else auto."""
    over = _override.get()
    if over is not None and backend in over:
        return over[backend]
    value = os.environ.get(ENV[backend], "")
    if not value:
        return _DEFAULT
    eng = _from_env.get((backend, value))
    if eng is None:
        eng = _from_env[(backend, value)] = Engine(kernel=_check(backend, value.strip().lower(), ENV[backend]))
    return eng


def _check(backend: str, kernel: Any, argument: str) -> str:
    if kernel not in KERNELS[backend]:
        raise XSeqLossError(f"{argument}={kernel!r} is not a {backend} kernel; valid kernels are "
                            f"{list(KERNELS[backend])}")
    return kernel


@contextlib.contextmanager
def use(backend: str, kernel: str | None = None, **sizes: int) -> Iterator[Engine]:
    """Within the block, ``backend`` runs ``kernel`` with these sizes (per thread and async task).

    >>> from xseqloss.internals import engine
    >>> with engine.use("numpy", "chunked", chunk_elements=64) as eng:
    ...     engine.current("numpy").kernel, eng.chunk_elements
    ('chunked', 64)
    >>> engine.current("numpy").kernel
    'auto'
    """
    if backend not in KERNELS:
        raise XSeqLossError(f"backend={backend!r} is not a backend; valid backends are {list(KERNELS)}")
    base = current(backend)
    eng = replace(base, **sizes) if kernel is None else replace(base, kernel=_check(backend, kernel, "kernel"),
                                                                **sizes)
    token = _override.set({**(_override.get() or {}), backend: eng})
    try:
        yield eng
    finally:
        _override.reset(token)
