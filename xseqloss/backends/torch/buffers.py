"""PyTorch's reusable CPU gradient buffers (API.md 1, "Memory"): a fresh 1 GB gradient every step
would pay ~0.2-0.4 s of page faults on first touch on CPU, more than the loss itself."""

from __future__ import annotations

from typing import Any

import torch


class _BufferCache:
    """A few reusable CPU gradient buffers (``SLOTS``).

    PyTorch's CPU allocator returns large blocks to the OS on free, so every step's fresh 1 GB
    gradient would pay ~0.2-0.4 s of page faults on first touch (more than the loss itself). A slot
    keeps a large buffer and hands it out again only when nothing else references its storage: not
    the user (``z.grad``), not a pending backward (``ctx``), not a view. One slot is not enough:
    the previous step's gradient is often still alive while the next one forms (``zero_grad``
    after the forward, a leaf's ``.grad`` read after the step, two heads on the same logits in one
    backward, an A/B comparison), and each such step then paid a fresh buffer (2.2x the step's
    time at 4 x 2,048 x 32,000). Two slots cover those; a third concurrent gradient gets a plain
    buffer. At most ``SLOTS`` buffers stay allocated between calls; on CUDA the caching allocator
    already does this. ``xseqloss.torch.empty_cache()`` releases them.
    """

    SLOTS = 2

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.raws: list = [None] * self.SLOTS
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
            free = None  # a slot to (re)fill: empty, or holding an idle buffer of another size
            for i, raw in enumerate(self.raws):
                if raw is None:
                    free = i if free is None else free
                    continue
                if self._uses(raw) != self.idle:
                    continue  # in use
                if raw.dtype == z.dtype and n <= raw.numel() <= 2 * n:
                    # a new tensor object over the storage (never the slot's own): autograd then
                    # adopts it as .grad without a copy, and the storage's use count tells when it
                    # is free again
                    return raw[:n].view(z.shape)
                free = i
            if free is None:  # every slot in use
                return torch.empty_like(z)
            self.raws[free] = None  # release the old one (if any) before allocating
            raw = self.raws[free] = torch.empty(n, dtype=z.dtype)
            return raw[:n].view(z.shape)

    def clear(self) -> None:
        with self.lock:
            self.raws = [None] * self.SLOTS


try:
    _BUFFERS: Any = _BufferCache()
except Exception:  # pragma: no cover - a torch without storage use counts: plain buffers
    _BUFFERS = None


def gradient_buffer(z: Any, st: Any) -> Any:
    return torch.empty_like(z) if _BUFFERS is None else _BUFFERS.get(z, st.engine.buffer_min_bytes)


class TorchBuffers:
    def empty_cache(self) -> None:
        """Release the reusable CPU gradient buffers (reallocated on the next large backward)."""
        empty_cache()


def empty_cache() -> None:
    """Release the reusable CPU gradient buffers (reallocated on the next large backward)."""
    if _BUFFERS is not None:
        _BUFFERS.clear()


