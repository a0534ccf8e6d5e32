"""PyTorch's reusable CPU gradient buffer (API.md 1, "Memory"): a fresh 1 GB gradient every step
would pay ~0.2-0.4 s of page faults on first touch on CPU, more than the loss itself."""

from __future__ import annotations

from typing import Any

import torch


class _BufferCache:
    """One reusable CPU gradient buffer.

    PyTorch's CPU allocator returns large blocks to the OS on free, so every step's fresh 1 GB
    gradient would pay ~0.2-0.4 s of page faults on first touch (more than the loss itself). The
    slot keeps the last large buffer and hands it out again only when nothing else references its
    storage: not the user (``z.grad``), not a pending backward (``ctx``), not a view. On CUDA the
    caching allocator already does this. ``xseqloss.torch.empty_cache()`` releases the slot.
    """

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.raw: Any = None
        probe = torch.empty(1)
        self.idle = self._uses(probe)  # the count when only the slot's own tensor holds the storage

    @staticmethod
    def _uses(t: Any) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def get(self, z: Any, min_bytes: int) -> Any:
        n, nbytes = z.numel(), z.numel() * z.element_size()
        if z.device.type != "cpu" or nbytes < min_bytes or not z.is_contiguous():
            return torch.empty_like(z)
        with self.lock:
            raw = self.raw
            if (raw is None or raw.dtype != z.dtype or not (n <= raw.numel() <= 2 * n)
                    or self._uses(raw) != self.idle):
                raw = self.raw = None  # release the old one (if unused) before allocating
                raw = self.raw = torch.empty(n, dtype=z.dtype)
            # a new tensor object over the storage (never the slot's own): autograd then adopts it
            # as .grad without a copy, and the storage's use count tells when it is free again
            return raw[:n].view(z.shape)

    def clear(self) -> None:
        with self.lock:
            self.raw = None


try:
    _BUFFERS: Any = _BufferCache()
except Exception:  # pragma: no cover - a torch without storage use counts: plain buffers
    _BUFFERS = None


def gradient_buffer(z: Any, st: Any) -> Any:
    return torch.empty_like(z) if _BUFFERS is None else _BUFFERS.get(z, st.engine.buffer_min_bytes)


class TorchBuffers:
    def empty_cache(self) -> None:
        """Release the reusable CPU gradient buffer (it is reallocated on the next large backward)."""
        empty_cache()


def empty_cache() -> None:
    """Release the reusable CPU gradient buffer (it is reallocated on the next large backward)."""
    if _BUFFERS is not None:
        _BUFFERS.clear()


