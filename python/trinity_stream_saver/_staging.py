"""Staging: CPU copies of a model's tensors, taken while training goes on,
that a save writes from instead of the tensors themselves.

This module knows nothing of files, plans or writers: it turns a list of
``StagedEntry`` into CPU tensors, handed over in order, in one of two ways:

- ``stage_all``: every entry at once into one flat buffer (full staging),
  on the caller's thread;
- ``StagingRing``: the entries one after another through a ring of bounded
  bytes, a producer thread copying ahead of the consumer (bounded staging).

Both copy into a ``StagingArena``: one buffer kept from one save to the next
(a later save of the same model allocates nothing, as DCP's ``DefaultStager``
with cached state dicts) and lent to one save at a time, so that a second
save waits for the memory instead of allocating another copy of the model.
A distributed save stages each rank's local pieces through the same objects.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import weakref
from typing import NamedTuple, Optional, Sequence

import torch

from ._state_dict import is_dtensor

# Every staged tensor starts on a cache line, which is also a multiple of
# every element size, so that a byte offset can be viewed as any dtype.
_ALIGNMENT = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


class StagedEntry(NamedTuple):
    """One tensor to stage: its name, the tensor (a parameter, a buffer, a
    DTensor), the dtype it is staged in (the dtype the save writes, so that
    a cast halves the staging memory instead of doubling it), the tensors
    whose version counters tell an in-place change, and those counters
    when the save was asked for."""

    name: str
    tensor: torch.Tensor
    dtype: torch.dtype
    watched: tuple
    version: tuple

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * self.tensor.numel()


def entry(name: str, tensor: torch.Tensor, dtype: torch.dtype,
          owner: Optional[torch.Tensor] = None) -> StagedEntry:
    """`tensor` staged as `dtype`. `owner`: the DTensor whose piece `tensor`
    is. Both a DTensor and its piece are watched: an in-place op on a
    DTensor (an optimizer step) counts on the DTensor alone, since its
    piece is changed below the dispatcher that counts versions, and one on
    the piece itself (``to_local().add_()``) counts on the piece alone."""
    watched = tuple({id(t): t for t in (tensor, _source(tensor), owner) if t is not None}.values())
    return StagedEntry(name, tensor, dtype, watched, _versions(watched))


def _versions(watched: tuple) -> tuple:
    return tuple(t._version for t in watched)


def _source(tensor: torch.Tensor) -> torch.Tensor:
    """The memory a tensor's values are read from: a DTensor's local piece."""
    if is_dtensor(tensor):
        return tensor._local_tensor
    return tensor


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    # A DTensor reaches here only in a group of one, where its local piece
    # is the whole tensor (full_tensor() makes no copy across ranks).
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor.detach()


def needs_pinned_memory(entries: Sequence[StagedEntry]) -> bool:
    """Pinned memory lets GPU tensors be copied without blocking; it is
    slow to allocate and scarce, so only GPU models get it."""
    return any(_source(e.tensor).device.type == "cuda" for e in entries)


def full_staging_bytes(entries: Sequence[StagedEntry]) -> int:
    return sum(_aligned(e.nbytes) for e in entries)


def ring_bytes(entries: Sequence[StagedEntry], max_staging_bytes: int) -> int:
    """A ring of `max_staging_bytes`, or of the largest tensor when that is
    larger: such a tensor is staged alone, once the ring is empty."""
    largest = max((_aligned(e.nbytes) for e in entries), default=0)
    return max(_aligned(max_staging_bytes), largest)


class StagingCancelled(Exception):
    """The save that owned the staging stopped; the producer stops too."""


class StagingArena:
    """One CPU byte buffer, kept between saves and lent to one save at a
    time. ``acquire`` waits while another save holds it (its write is still
    running), then grows it if it is too small; ``release`` lends it on.

    The lock is released by whichever thread ends the save (the background
    writer), not the one that acquired it, hence a plain Lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: Optional[torch.Tensor] = None
        _arenas.add(self)

    def _after_fork_in_child(self) -> None:
        # The parent's save that held the buffer has no thread here: the
        # child's own saves must not wait for it.
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, pinned: bool,
                cancelled: Optional[threading.Event] = None) -> torch.Tensor:
        # Polled, so that a save stopped while it waits (Ctrl-C at exit)
        # gives up instead of waiting for the one ahead of it.
        while not self._lock.acquire(timeout=0.05):
            if cancelled is not None and cancelled.is_set():
                raise StagingCancelled()
        try:
            buffer = self._buffer
            if buffer is None or buffer.numel() < nbytes or (pinned and not buffer.is_pinned()):
                self._buffer = buffer = None  # the old one is freed before the new is made
                self._buffer = buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                                    pin_memory=pinned)
            return buffer
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        self._lock.release()


_arenas: "weakref.WeakSet[StagingArena]" = weakref.WeakSet()


def _reset_arenas_in_child() -> None:
    for arena in list(_arenas):
        arena._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_arenas_in_child)


def _view(buffer: torch.Tensor, offset: int, e: StagedEntry) -> torch.Tensor:
    return buffer[offset: offset + e.nbytes].view(e.dtype).view(e.tensor.shape)


def _has_its_memory(tensor: torch.Tensor) -> bool:
    """Whether the storage still holds every element the tensor views: FSDP
    frees a parameter's storage between uses (``untyped_storage().resize_(0)``),
    and a copy from it would read freed memory (a crash, not an error)."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return True
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    needed = (tensor.storage_offset() + extent) * tensor.element_size()
    return tensor.untyped_storage().nbytes() >= needed


def _check_memory(name: str, tensor: torch.Tensor) -> None:
    """Raises the synchronous save's error for a tensor that lost its memory."""
    if not _has_its_memory(tensor):
        raise ValueError(
            f"tensor {name!r} has lost its memory: its storage was freed or shrunk "
            "(e.g. untyped_storage().resize_(0), as FSDP does between uses) before the "
            "asynchronous save copied it. Save while its storage is allocated (after "
            "the forward and backward passes, not inside them), or wait for "
            "future.wait_for_snapshot() before freeing it."
        )


def _copy_entry(view: torch.Tensor, e: StagedEntry) -> torch.Tensor:
    """Copies entry `e` into `view` at this moment, after checking that
    its memory is still there; returns the tensor copied from."""
    _check_memory(e.name, _source(e.tensor))
    source = _whole(e.tensor)
    _check_memory(e.name, source)
    _copy(view, source)
    return source


def copied_now(e: StagedEntry) -> torch.Tensor:
    """A CPU copy of entry `e` made now, outside the staging memory (a
    module's buffers, which a forward pass may change, at the call)."""
    _check_memory(e.name, _source(e.tensor))
    source = _whole(e.tensor)
    _check_memory(e.name, source)
    return source.to("cpu", e.dtype, copy=True)


def _copy(view: torch.Tensor, source: torch.Tensor) -> None:
    """`source` into `view` (the staged dtype, C order). A CPU tensor that
    needs neither a cast nor a reorder is one memcpy on this thread, with
    the GIL released: ``copy_`` spreads a large copy over the intra-op
    threads, which are the training's own (bounded staging copies while it
    runs), and on a busy host waits on the slowest of them (measured 2-4x
    slower than one memcpy on a loaded 2-core machine); a copy is bound by
    memory bandwidth, not by threads."""
    if (source.device.type == "cpu" and source.layout == torch.strided
            and source.dtype == view.dtype and source.is_contiguous()
            and not source.is_conj() and not source.is_neg()):
        ctypes.memmove(view.data_ptr(), source.data_ptr(), source.nbytes)
    else:
        view.copy_(source, non_blocking=source.device.type == "cuda")


def _check_unchanged(e: StagedEntry) -> None:
    """A tensor changed in place between the call and its copy (an
    optimizer step taken too early) would be saved half old, half new."""
    version = _versions(e.watched)
    if version != e.version:
        raise ValueError(
            f"tensor {e.name!r} was modified in place "
            "before the asynchronous save had copied it; wait for "
            "future.wait_for_snapshot() before an optimizer step or any other in-place change "
            "to the parameters, or pass optimizer= to have its step wait."
        )


def stage_all(entries: Sequence[StagedEntry], buffer: torch.Tensor
              ) -> tuple[list[tuple[str, torch.Tensor]], Optional["torch.cuda.Event"]]:
    """(name, staged copy) of every entry, packed into `buffer`, and the
    CUDA event to wait on before reading them (None without GPU tensors).

    GPU tensors are copied without blocking on the current stream: work
    queued after the call on that stream (the optimizer step) runs after
    the copies, so the snapshot holds even though the call does not wait."""
    staged = []
    on_gpu = False
    offset = 0
    with torch.no_grad():
        for e in entries:
            view = _view(buffer, offset, e)
            source = _copy_entry(view, e)
            on_gpu = on_gpu or source.device.type == "cuda"
            staged.append((e.name, view))
            offset += _aligned(e.nbytes)
    copied = None
    if on_gpu:
        copied = torch.cuda.Event()
        copied.record()
    return staged, copied


class StagingRing:
    """The entries, staged one after another through `capacity` bytes of
    `buffer` and handed over in order.

    ``produce()`` (on its own thread) copies each entry into the ring as
    soon as there is room; iterating (on the writer's thread) yields the
    copies in order. The bytes of a yielded copy are reused once the next
    item is asked for: the writer's contract (it has released a tensor
    before it asks for the next). Entries in `ready` (index -> CPU tensor,
    staged beforehand) are handed over as they are, outside the ring.

    ``stop(error)`` ends both sides: the producer stops at its next copy,
    and the consumer raises `error` (or stops quietly if None).
    ``finished`` is set once the producer no longer reads the model."""

    def __init__(self, entries: Sequence[StagedEntry], buffer: torch.Tensor, capacity: int,
                 ready: Optional[dict[int, torch.Tensor]] = None,
                 caller_stream_event=None):
        self._entries = entries
        self._buffer = buffer
        self._capacity = capacity
        self._ready = ready or {}
        self._caller_event = caller_stream_event  # GPU: the copies start after it
        self._condition = threading.Condition()
        self._staged: collections.deque = collections.deque()  # (name, tensor, in the ring)
        self._in_use: collections.deque = collections.deque()  # ring offsets, in ring order
        self._head = 0  # where the next copy goes
        self._holding_ring_slot = False  # the consumer holds the oldest slot
        self._produced_all = False
        self._error: Optional[BaseException] = None
        self._stopped = False
        self.finished = threading.Event()

    # -- producer ---------------------------------------------------------

    def produce(self) -> None:
        try:
            stream = None
            if needs_pinned_memory(self._entries):
                stream = torch.cuda.Stream()
                if self._caller_event is not None:
                    stream.wait_event(self._caller_event)
            for index, e in enumerate(self._entries):
                if index in self._ready:
                    self._hand_over(e.name, self._ready[index], False)
                    continue
                size = _aligned(e.nbytes)
                offset = self._allocate(size)
                view = _view(self._buffer, offset, e)
                with torch.no_grad():
                    if _source(e.tensor).device.type == "cuda":
                        with torch.cuda.stream(stream):
                            _copy_entry(view, e)
                        stream.synchronize()
                    else:
                        _copy_entry(view, e)
                _check_unchanged(e)
                self._hand_over(e.name, view, size > 0)
            with self._condition:
                self._produced_all = True
                self._condition.notify_all()
        except StagingCancelled:
            pass
        except BaseException as error:  # handed to the writer, which fails with it
            self.stop(error)
        finally:
            self.finished.set()

    def _allocate(self, size: int) -> int:
        """The offset of `size` free bytes, in ring order; waits for the
        consumer to free them. capacity >= every size, and an empty ring
        starts again at 0, so every size fits eventually."""
        with self._condition:
            while True:
                if self._stopped:
                    raise StagingCancelled()
                if size == 0:
                    return 0  # zero bytes take no slot
                offset = self._free_offset(size)
                if offset is not None:
                    self._in_use.append(offset)
                    self._head = offset + size
                    return offset
                self._condition.wait()

    def _free_offset(self, size: int) -> Optional[int]:
        if not self._in_use:
            return 0
        tail = self._in_use[0]
        if self._head > tail:  # free: [head, capacity) and [0, tail)
            if self._head + size <= self._capacity:
                return self._head
            return 0 if size <= tail else None
        if self._head < tail and self._head + size <= tail:  # free: [head, tail)
            return self._head
        return None  # head == tail with slots in use: full

    def _hand_over(self, name: str, tensor: torch.Tensor, in_ring: bool) -> None:
        with self._condition:
            if self._stopped:
                raise StagingCancelled()
            self._staged.append((name, tensor, in_ring))
            self._condition.notify_all()

    # -- consumer ---------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        with self._condition:
            if self._holding_ring_slot:
                self._in_use.popleft()
                self._holding_ring_slot = False
                self._condition.notify_all()
            while not self._staged and not self._produced_all and self._error is None \
                    and not self._stopped:
                self._condition.wait()
            if self._error is not None:
                raise self._error
            if self._stopped or not self._staged:
                raise StopIteration
            name, tensor, in_ring = self._staged.popleft()
            self._holding_ring_slot = in_ring
            return name, tensor

    def stop(self, error: Optional[BaseException] = None) -> None:
        with self._condition:
            if error is not None and self._error is None:
                self._error = error
            self._stopped = True
            self._condition.notify_all()
