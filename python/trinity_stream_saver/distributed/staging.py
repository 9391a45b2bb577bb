"""Staging: the CPU memory whole tensors are put in before they are
written, reused from one tensor to the next.

Both rely on the writer's contract without overlap: it has written and
released tensor k when it asks for tensor k+1.
"""

from __future__ import annotations

from typing import Optional

import torch


class PinnedRing:
    """Two pinned CPU buffers that GPU tensors are copied into without
    blocking. Two suffice because at most one copy (k+1) is in flight while
    tensor k is written: the reused-buffer contract with
    max_queued_bytes = 0 (R >= 2 + 0 // S)."""

    def __init__(self, nbytes: int):
        self._nbytes = nbytes
        self._buffers: list[Optional[torch.Tensor]] = [None, None]
        self._turn = 0

    def stage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event"]:
        """A CPU view that `tensor` is being copied into, and the event to
        wait on before reading it."""
        slot = self._turn
        self._turn ^= 1
        if self._buffers[slot] is None:
            # Allocated on first use and kept: pinning is slow.
            self._buffers[slot] = torch.empty(self._nbytes, dtype=torch.uint8, pin_memory=True)
        tensor = tensor.contiguous()
        view = self._buffers[slot][: tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return view, done


class Buffer:
    """One CPU buffer, grown to the largest tensor asked of it and reused:
    one buffer holds the tensors in turn, and its pages are touched once
    rather than once a tensor."""

    def __init__(self):
        self._bytes: Optional[torch.Tensor] = None

    def view(self, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        if self._bytes is None or self._bytes.numel() < nbytes:
            self._bytes = None  # the old one is freed before the new is made
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)
