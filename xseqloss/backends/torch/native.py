"""PyTorch's default-call kernel (``Backend.default_token_loss``).

For the default call (``CallPlan.default_call``) F.cross_entropy(ignore_index=...) means exactly
what we mean per token; at small sizes one native op beats the ~30 ops of the general core (each
eager op costs a few microseconds of dispatch). On CPU its kernel checks every label that is not
the ignore value against [0, C) and raises, which is our label check for free: on a bad label this
returns None and the general path raises our error (or, with validate=False, marks the token NaN).
On CUDA a bad label is a device-side assert, so there the general path runs. Large inputs keep the
fused path: F.cross_entropy materialises its log-softmax (3x the logits in forward+backward). The
reduction and the ``empty`` rule are the core's (``core.reduction.default``).
"""

from __future__ import annotations

from typing import Any

import torch

from .ops import NO_IGNORE, cross_entropy


class TorchNative:
    def default_token_loss(self, st: Any, z: Any, y: Any) -> Any:
        kernel = st.engine.kernel
        if (kernel in ("chunked", "triton") or (kernel == "auto" and z.numel() > st.engine.native_max_elements)
                or z.dtype not in (torch.float32, torch.float64) or z.device.type != "cpu" or z.numel() == 0):
            return None
        k = st.opts.k
        ig = st.ignore[0] if st.ignore else NO_IGNORE  # no ignore value: a value no other label equals
        if not st.ignore and bool((y == NO_IGNORE).any()):
            return None
        keep = (y != ig) if st.ignore else None
        if keep is not None and torch.is_grad_enabled() and z.requires_grad and not bool(torch.isfinite(z).all()):
            # an ignored row gives exactly 0 gradient whatever it holds: log_softmax's backward gives
            # 0 - exp(out) * 0 there, exactly 0 for finite rows but NaN for a row holding NaN or inf
            z = torch.where(keep.unsqueeze(k), z, 0.0)
        try:
            return cross_entropy(z, y, ig, "none", st.C, k), keep
        except IndexError:  # a label out of range ("Target 7 is out of bounds"): the general path says which
            return None
