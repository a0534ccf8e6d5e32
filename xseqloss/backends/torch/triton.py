"""PyTorch CUDA: the per-token cross-entropy and its gradient as one Triton kernel (issue 15).

``token_loss_triton`` is the launcher the torch backend calls for (R, C) row-major logits. The core
(``xseqloss._core``; the formula itself in ``xseqloss._token_loss``) keeps every rule: which rows count (``keep``), the reduction's coefficient and
the token weights (folded by the caller into ``scale``), the smoothing convention (``eps`` arrives
already in the "uniform" convention) and the NaN rule for bad tokens. The kernel only evaluates, per
row, in float32:

    x = cap * tanh(z / cap) (or z), m = max x (0 if -inf), s = sum exp(x - m), lse_s = log s,
    lse = lse_s + m, a = (1 - eps) w_y, b = eps / C, q_c = b w_c + a [c == y], sumq = a + b sum w,
    loss = sumq * lse_s - sum_c q_c (x_c - m) + z_loss w_y lse^2          (0 log 0 = 0 per class)
    grad_c = ((sumq + 2 z_loss w_y lse) exp(x_c - m) / s - q_c) (1 - t_c^2) scale

This module imports neither Triton nor the kernel until the first call (``import xseqloss`` never
imports either); ``available()`` says whether a call can run here. With ``TRITON_INTERPRET=1`` set
before Triton is first imported, the same kernel runs on CPU tensors through Triton's interpreter,
which is how CI checks it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["available", "token_loss_triton", "launch_config"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Block sizes (classes per loop step, a power of two). On the GPU a block of 4096 float32 is 16 KB per
# program per step, enough in flight to stream HBM; C need not be a multiple (masked loads). The
# interpreter runs a block as NumPy arrays program by program, where small blocks keep CPU tests fast
# and still cross block boundaries at small C.
GPU_MAX_BLOCK = 4096
INTERPRET_MAX_BLOCK = 64

# (BLOCK, num_warps) forced for every launch, or None: set by benchmarks/gpu.py's sweep only.
CONFIG_OVERRIDE: tuple[int, int] | None = None

_AVAILABLE: bool | None = None


def available() -> bool:
    """Triton imports here and a call can run: a CUDA device is present, or TRITON_INTERPRET=1
    (CPU tensors through the interpreter)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401  (a broken install can raise anything)
            ok = True
        except Exception:
            ok = False
        _AVAILABLE = ok
    if not _AVAILABLE:
        return False
    return _interpret_requested() or torch.cuda.is_available()


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(C: int, device: Any) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of C classes on ``device``."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    dev = torch.device(device)
    if dev.type == "cpu":
        return min(_next_pow2(C), INTERPRET_MAX_BLOCK), 1
    block = min(_next_pow2(C), GPU_MAX_BLOCK)
    # 4 elements per thread at least (vector loads); more warps for large blocks
    warps = max(1, min(16, block // 256))
    return block, warps


_KERNELS: Any = None


def _kernels() -> Any:
    global _KERNELS
    if _KERNELS is None:
        from . import _triton_kernels  # imports triton; decorated now, in the mode the env gives

        _KERNELS = _triton_kernels
    return _KERNELS


def _check(name: str, t: Any, shape: tuple[int, ...], dtypes: tuple, device: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"token_loss_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"token_loss_triton: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in dtypes:
        raise TypeError(f"token_loss_triton: {name} has dtype {t.dtype}, expected one of {dtypes}")
    if t.device != device:
        raise ValueError(f"token_loss_triton: {name} is on {t.device}, the logits on {device}")
    if not t.is_contiguous():
        raise ValueError(f"token_loss_triton: {name} must be contiguous")


def token_loss_triton(z: Any, y: Any, keep: Any, cw: Any, scale: Any, *, eps: float, z_loss: float,
                      cap: float | None, out: Any) -> Any:
    """Per-row losses (R,) float32 of (R, C) logits ``z``; with ``out`` the gradient, times
    ``scale``, written into it (``out`` may be ``z`` itself: in-place backward).

    z: (R, C) contiguous float32/float16/bfloat16 (float64: TypeError, the caller falls back).
    y: (R,) int64 class ids already clamped into [0, C). keep: (R,) bool or None (all rows count).
    cw: (C,) float32 or None. scale: (R,) float32 or None (1). eps: uniform-convention smoothing.
    z_loss >= 0. cap > 0 or None. out: None or (R, C) of z's dtype, contiguous.
    Rows with keep False give exactly 0 loss and gradient whatever they hold.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"token_loss_triton: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in _DTYPES:
        raise TypeError(f"token_loss_triton: logits of dtype {z.dtype} are not supported "
                        "(float32, float16, bfloat16); use the chunked kernel")
    if z.ndim != 2:
        raise ValueError(f"token_loss_triton: z must be (R, C), got shape {tuple(z.shape)}")
    R, C = z.shape
    dev = z.device
    _check("z", z, (R, C), _DTYPES, dev)
    if C < 1:
        raise ValueError("token_loss_triton: C must be >= 1")
    _check("y", y, (R,), (torch.int64,), dev)
    if keep is not None:
        _check("keep", keep, (R,), (torch.bool,), dev)
    if cw is not None:
        _check("cw", cw, (C,), (torch.float32,), dev)
    if scale is not None:
        _check("scale", scale, (R,), (torch.float32,), dev)
    if out is not None:
        _check("out", out, (R, C), (z.dtype,), dev)
    if cap is not None and not cap > 0:
        raise ValueError(f"token_loss_triton: cap must be > 0 or None, got {cap}")
    if not z_loss >= 0:
        raise ValueError(f"token_loss_triton: z_loss must be >= 0, got {z_loss}")

    loss = torch.empty(R, dtype=torch.float32, device=dev)
    if R == 0:
        return loss
    k = _kernels()
    if dev.type == "cpu" and not k.INTERPRETED:
        # triton.jit fixed the mode when the kernel module was first imported in this process
        raise RuntimeError("token_loss_triton: CPU tensors need Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before xseqloss.backends._triton_kernels is first imported "
                           "(in this process it was imported without it)")
    block, warps = launch_config(C, dev)
    dummy = z  # a pointer for the arguments a variant never reads (its constexpr flag is off)
    args = (z, y, dummy if keep is None else keep.view(torch.uint8), dummy if cw is None else cw,
            dummy if scale is None else scale, loss, dummy if out is None else out,
            C, z.stride(0), 0 if out is None else out.stride(0),
            1.0 - float(eps), float(eps) / C, float(z_loss), 1.0 if cap is None else float(cap))
    flags = dict(HAS_KEEP=keep is not None, HAS_CW=cw is not None, HAS_SCALE=scale is not None,
                 HAS_EPS=float(eps) != 0.0, HAS_Z=float(z_loss) != 0.0, HAS_CAP=cap is not None,
                 WRITE_GRAD=out is not None, BLOCK=block, WHILE_LOOPS=k.INTERPRETED)
    if dev.type == "cuda":
        with torch.cuda.device(dev):  # Triton launches on the current device
            k.token_loss_kernel[(R,)](*args, **flags, num_warps=warps)
    else:
        k.token_loss_kernel[(R,)](*args, **flags)
    if out is not None:
        _bump_versions(out, z)
    return loss


def _bump_versions(out: Any, z: Any) -> None:
    """Tell autograd that ``out`` was written: Triton's stores bypass the version counter, so a
    tensor saved for backward that shares this storage (e.g. a softmax output computed in place)
    would otherwise give a silently wrong gradient (Liger-Kernel issue 272). Every writer of ``out``
    bumps it; when ``z`` aliases ``out`` with a counter of its own, it is bumped too."""
    if out.is_inference():
        return  # inference tensors have no version counter
    before = z._version if not z.is_inference() else None
    torch.autograd.graph.increment_version(out)
    if (before is not None and z is not out and z._version == before
            and z.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()):
        torch.autograd.graph.increment_version(z)
