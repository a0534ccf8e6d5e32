"""PyTorch's default-call kernel (``Backend.default_token_loss``).

For the default call (``CallPlan.default_call``) F.cross_entropy(ignore_index=...) means exactly
what we mean per token; at small sizes one native op beats the ~30 ops of the general core (each
eager op costs a few microseconds of dispatch). On CPU its kernel checks every label that is not
the ignore value against [0, C) and raises, which is our label check for free: on a bad label this
returns None and the general path raises our error (or, with validate=False, marks the token NaN).
On CUDA a bad label is a device-side assert, so there the general path runs. Large inputs keep the
fused path: F.cross_entropy materialises its log-softmax (3x the logits in forward+backward). Which
reduction F.cross_entropy applies and the ``empty`` rule are the core's (``core.reduction``'s
``default_native`` and ``default``); the labels are counted on the host (small calls: a NumPy count
costs less than a tensor op).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...core.reduction import default_native
from .ops import NO_IGNORE, cross_entropy


class TorchNative:
    def default_token_loss(self, st: Any, z: Any, y: Any, want_grad: bool = False) -> Any:
        kernel = st.engine.kernel
        if want_grad:  # autograd forms the gradient
            return None
        if (kernel in ("chunked", "triton") or (kernel == "auto" and z.numel() > st.engine.native_max_elements)
                or z.dtype not in (torch.float32, torch.float64) or z.device.type != "cpu" or z.numel() == 0):
            return None
        k = st.opts.k
        ig = st.ignore[0] if st.ignore else NO_IGNORE  # no ignore value: a value no other label equals
        yh = y.numpy()  # the labels on the host without a copy (CPU only, above): small counts cost less there
        if st.ignore:
            n = int(np.count_nonzero(yh != ig))
            if n < yh.size and torch.is_grad_enabled() and z.requires_grad and not bool(torch.isfinite(z).all()):
                # an ignored row gives exactly 0 gradient whatever it holds: log_softmax's backward
                # gives 0 - exp(out) * 0 there, exactly 0 for finite rows but NaN for a row holding
                # NaN or inf
                z = torch.where((y != ig).unsqueeze(k), z, 0.0)
        else:
            if (yh == NO_IGNORE).any():
                return None
            n = yh.size
        try:
            l = cross_entropy(z, y, ig, default_native(st, n), st.C, k)
        except IndexError:  # a label out of range ("Target 7 is out of bounds"): the general path says which
            return None
        return l, n, None
