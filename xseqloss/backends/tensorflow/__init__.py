"""The TensorFlow backend: eager calls run the core as one traced ``tf.function`` per plan and
signature; inside the caller's graph (``tf.function``, ``jit_compile``, Keras ``fit``) it is traced
into it. Composed from its parts: ``ops`` (conversion, running, array ops, the native per-token
loss), ``xla`` (the plain kernel and the fused forward+backward, XLA-compiled), ``linear`` (the
fused layer's loop and its custom gradient), ``ragged`` (RaggedTensor), ``collectives`` (the
replica context's all-reduce)."""

from __future__ import annotations

from ...plan.ops import Backend
from .collectives import TensorflowCollectives
from .linear import TensorflowLinear
from .ops import TensorflowOps
from .ragged import TensorflowRagged
from .xla import TensorflowXla

__all__ = ["TensorflowBackend", "BACKEND"]


class TensorflowBackend(TensorflowOps, TensorflowXla, TensorflowLinear, TensorflowRagged, TensorflowCollectives,
                        Backend):
    """tf.Tensor and tf.Variable (and RaggedTensor logits), eager or traced."""


BACKEND = TensorflowBackend()
