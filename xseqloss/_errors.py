"""The two exception classes of the error catalogue (API.md section 2)."""

from __future__ import annotations

__all__ = ["XSeqLossError", "XSeqLossTypeError", "CompiledXSeqLossError", "CompiledXSeqLossTypeError"]


class XSeqLossError(ValueError):
    """A bad value or shape: the message names the argument, the position, the value and the valid range."""

    ag_pass_through = True  # TF autograph re-raises it as itself under tf.function, not as StagingError


class XSeqLossTypeError(TypeError):
    """A bad type or dtype (float targets where indices are expected, integer logits, ...)."""

    ag_pass_through = True


# Static errors under torch.compile (api/compiled.py): dynamo re-raises AssertionError from
# compilation unchanged; these subclasses are our classes first, so ``except XSeqLossError`` and
# the message behave as in eager mode (decisions.md item 23).
class CompiledXSeqLossError(XSeqLossError, AssertionError):
    """XSeqLossError raised while torch.compile traces the call."""


class CompiledXSeqLossTypeError(XSeqLossTypeError, AssertionError):
    """XSeqLossTypeError raised while torch.compile traces the call."""
