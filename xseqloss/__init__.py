"""xseqloss: one sequence cross-entropy with one meaning on NumPy, PyTorch, TensorFlow and JAX.

>>> import numpy as np, xseqloss as xsl
>>> logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))   # (N=1, T=2, C=3)
>>> round(float(xsl.sequence_cross_entropy(logits, np.array([[0, 2]]))), 6)  # mean of -log .5, -log .8
0.458145

Importing xseqloss imports no framework; the backend is picked from the logits' type.
"""

from __future__ import annotations

from typing import Any

from ._dispatch import set_backend, use_backend
from ._errors import XSeqLossError, XSeqLossTypeError
from .distributed import ddp_normalizer, global_segment_count, global_sequence_count, global_token_count
from .linear import linear_cross_entropy, linear_value_and_grad
from .loss import segment_count, sequence_cross_entropy, token_count, value_and_grad
from .pool import pool
from .stats import TokenStats, linear_token_stats, linear_token_stats_vjp, token_stats, token_stats_vjp

__version__ = "0.1.0"

__all__ = [
    "sequence_cross_entropy", "value_and_grad", "token_count", "segment_count", "pool",
    "linear_cross_entropy", "linear_value_and_grad", "set_backend", "use_backend",
    "available_backends", "XSeqLossError", "XSeqLossTypeError", "presets", "__version__",
    "global_token_count", "global_segment_count", "global_sequence_count", "ddp_normalizer",
    "token_stats", "token_stats_vjp", "TokenStats", "linear_token_stats", "linear_token_stats_vjp",
]


def available_backends() -> dict[str, dict[str, Any]]:
    """The backends whose framework imports here, with its version and devices.

    This imports the frameworks (it is an explicit question about them).

    >>> import xseqloss as xsl
    >>> "numpy" in xsl.available_backends()
    True
    """
    from . import _dispatch

    found: dict[str, dict[str, Any]] = {}
    for name in _dispatch.BACKENDS:
        try:
            be = _dispatch.load(name)
        except XSeqLossError:
            continue
        found[name] = {"version": be.version(), "devices": be.devices()}
    return found


def __getattr__(name: str) -> Any:  # lazy: presets pulls in nothing heavy, but keep import minimal
    if name == "presets":
        import importlib

        return importlib.import_module(".presets", __name__)
    raise AttributeError(f"module 'xseqloss' has no attribute {name!r}")
