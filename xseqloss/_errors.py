"""The two exception classes of the error catalogue (API.md section 2)."""

from __future__ import annotations

__all__ = ["XSeqLossError", "XSeqLossTypeError"]


class XSeqLossError(ValueError):
    """A bad value or shape: the message names the argument, the position, the value and the valid range."""

    ag_pass_through = True  # TF autograph re-raises it as itself under tf.function, not as StagingError


class XSeqLossTypeError(TypeError):
    """A bad type or dtype (float targets where indices are expected, integer logits, ...)."""

    ag_pass_through = True
