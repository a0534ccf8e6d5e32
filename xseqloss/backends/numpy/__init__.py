"""The NumPy backend: eager, no autodiff (``value_and_grad`` and ``linear_value_and_grad`` form the
gradient analytically, chunk by chunk). Composed from its parts: ``ops`` (conversion, running, array
ops), ``kernels`` (the plain kernel, the default call, the chunked analytic gradient), ``linear``
(the fused layer's loop)."""

from __future__ import annotations

from ...plan.ops import Backend
from .kernels import NumpyKernels
from .linear import NumpyLinear
from .ops import NumpyOps

__all__ = ["NumpyBackend", "BACKEND"]


class NumpyBackend(NumpyOps, NumpyKernels, NumpyLinear, Backend):
    """NumPy arrays, on the CPU."""


BACKEND = NumpyBackend()
