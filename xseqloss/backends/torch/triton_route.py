"""Where PyTorch runs its Triton kernel (triton.py, API.md 10): the logits path's chunks
(``covers`` / ``run_triton``) and the fused layer's float32 chunks (``row_kernel``), when the torch
engine is "triton" and the kernel covers the call (index targets; CUDA, or CPU tensors under
``TRITON_INTERPRET=1``). Everything else runs the chunked kernel."""

from __future__ import annotations

from typing import Any

import torch

from ...plan import engine
from . import triton


def covers(st: Any, z: Any, t: Any, gbuf: Any) -> bool:
    """The Triton kernel (triton.py) covers this call: logits with index targets, classes
    last in contiguous rows, float32/16-bit, the gradient (if any) in a buffer of z's dtype; on
    CUDA, or on CPU under TRITON_INTERPRET=1. Everything else runs the chunked kernel."""
    if t is not None or st.opts.inputs != "logits" or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if st.class_parallel is not None:  # its class sums are combined across workers by the chunked kernel
        return False
    if st.opts.k != z.ndim - 1 or not z.is_contiguous():
        return False
    if gbuf is not None and (gbuf.dtype != z.dtype or not gbuf.is_contiguous() or gbuf.shape != z.shape):
        return False
    return triton.available() and (z.device.type == "cuda" or triton._interpret_requested())


def run_triton(st: Any, z: Any, y: Any, keep: Any, cw: Any, acc: Any, gbuf: Any, scale: Any) -> Any:
    """One pass over the logits: per-token losses (float32) and, with gbuf, the gradient times
    ``scale`` written into it (gbuf may be z itself: inplace_backward). The rules (which rows count,
    the coefficient, the NaN marks) arrive as arrays from the core, as for the chunked kernel."""
    C = z.shape[-1]
    tok_shape = z.shape[:-1]
    f = lambda a: None if a is None else a.reshape(-1)  # noqa: E731
    l = triton.token_loss_triton(
        z.reshape(-1, C), f(y).to(torch.int64), f(keep), None if cw is None else cw.to(torch.float32),
        None if scale is None else f(scale).to(torch.float32).contiguous(), eps=float(st.eps),
        z_loss=float(st.opts.z_loss), cap=st.opts.cap, out=None if gbuf is None else gbuf.reshape(-1, C))
    return l.reshape(tok_shape).to(acc)


class TorchTritonRoute:
    def row_kernel(self, rp: Any, z: Any, y: Any, t: Any, keep: Any, cw: Any, acc: Any, scale: Any) -> Any:
        """The Triton kernel on one (rows, C) float32 chunk of the fused layer, its gradient written
        into the chunk, where the torch engine is "triton" and it covers the plan (plan/ops.py)."""
        if (t is not None or rp.class_parallel is not None or acc != torch.float32 or z.dtype != torch.float32
                or engine.current("torch").kernel != "triton"):
            return None
        if not (triton.available() and (z.device.type == "cuda" or triton._interpret_requested())):
            return None
        o = rp.opts
        l = triton.token_loss_triton(z, y.to(torch.int64), keep, None if cw is None else cw.to(torch.float32),
                                     None if scale is None else scale.to(torch.float32).contiguous(),
                                     eps=float(rp.eps), z_loss=float(o.z_loss), cap=o.cap,
                                     out=None if scale is None else z)
        return l, (None if scale is None else z)
