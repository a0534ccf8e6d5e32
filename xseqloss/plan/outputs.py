"""What ``token_stats`` returns (API.md 11): ``TokenStats``, a named tuple of per-token outputs
(a pytree on JAX, a nest on TensorFlow)."""

from __future__ import annotations

from typing import Any, NamedTuple


class TokenStats(NamedTuple):
    """The per-token outputs of ``token_stats`` (the targets' token shape; ``ids_log_prob`` adds the
    k axis); the ones not asked for are None, ``counted`` is always given. A named tuple: a pytree
    on JAX and a nest on TensorFlow."""
    log_prob: Any = None
    entropy: Any = None
    lse: Any = None
    argmax: Any = None
    correct: Any = None
    ids_log_prob: Any = None
    counted: Any = None


def as_stats(out: dict) -> TokenStats:
    return TokenStats(**{name: out.get(name) for name in TokenStats._fields})
