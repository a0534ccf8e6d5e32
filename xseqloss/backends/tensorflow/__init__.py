"""The TensorFlow backend: eager calls run the core as one traced ``tf.function`` per plan and
signature; inside the caller's graph (``tf.function``, ``jit_compile``, Keras ``fit``) it is traced
into it. Composed from its parts: ``ops`` (conversion, running, array ops, the native per-token
loss), ``xla`` (the plain kernel and the fused forward+backward, XLA-compiled), ``stats``
(token_stats under a custom gradient), ``linear`` / ``linear_stats`` (the fused layer's loop and its
custom gradients), ``ragged`` (RaggedTensor), ``collectives`` (the
replica context's all-reduce)."""

from __future__ import annotations

from ...plan.ops import Backend
from .collectives import TensorflowCollectives
from .linear import TensorflowLinear
from .linear_stats import TensorflowLinearStats
from .ops import TensorflowOps
from .ragged import TensorflowRagged
from .stats import TensorflowStats
from .xla import TensorflowXla

__all__ = ["TensorflowBackend", "BACKEND"]


class TensorflowBackend(TensorflowOps, TensorflowStats, TensorflowXla, TensorflowLinear, TensorflowLinearStats,
                        TensorflowRagged, TensorflowCollectives, Backend):
    """tf.Tensor and tf.Variable (and RaggedTensor logits), eager or traced."""


BACKEND = TensorflowBackend()
