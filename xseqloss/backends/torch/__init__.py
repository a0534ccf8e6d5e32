"""The PyTorch backend, composed from its parts:

* ``ops``: conversion (side arrays follow the logits' device), running, array ops, the plain kernel;
* ``native``: the default call through F.cross_entropy (small CPU calls);
* ``fused``: the chunked forward+backward of the logits path (its gradient formed in the forward);
* ``buffers``: the reusable CPU gradient buffer;
* ``stats``: token_stats under an autograd Function (the core's analytic gradient);
* ``linear`` / ``linear_stats``: the fused output layer's loop pieces and its custom ops, for the
  loss and for token_stats;
* ``triton`` / ``_triton_kernels`` / ``triton_route``: the Triton kernel and where it runs;
* ``class_parallel``: classes split across workers (process groups, DTensor);
* ``collectives``: tokens split across workers (the global counts);
* ``ragged``: PackedSequence and nested jagged tensors.
"""

from __future__ import annotations

from ...plan.ops import Backend
from . import linear as _linear
from . import linear_stats as _linear_stats
from .buffers import TorchBuffers
from .class_parallel import TorchClassParallel
from .collectives import TorchCollectives
from .fused import TorchFused
from .linear import TorchLinear
from .linear_stats import TorchLinearStats
from .native import TorchNative
from .ops import TorchOps
from .ragged import TorchRagged
from .stats import TorchStats
from .triton_route import TorchTritonRoute

__all__ = ["TorchBackend", "BACKEND"]


class TorchBackend(TorchOps, TorchNative, TorchFused, TorchTritonRoute, TorchBuffers, TorchStats, TorchLinear,
                   TorchLinearStats, TorchClassParallel, TorchCollectives, TorchRagged, Backend):
    """torch.Tensor on any device; torch.compile(fullgraph=True) traces it without a graph break."""


BACKEND = TorchBackend()
_linear.bind(BACKEND)
_linear_stats.bind(BACKEND)
