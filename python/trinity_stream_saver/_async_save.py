"""save_model_streaming_async: save_model_streaming on a background
thread, from a snapshot of the model, so that training goes on while the
checkpoint is written.

This module orchestrates only: which tensors are saved comes from the
synchronous save's own rules (``distributed.entries``: state dict order, tied
weights once, every argument checked), the copies from ``_staging``, and
the bytes from the public ``save_sharded_streaming`` plus the config, which
is what ``save_model_streaming`` writes in a single process. It adds the
order around them: one save a time per folder, the staging memory lent to
one save at a time, the optimizer hook, and the wait at interpreter exit.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch

from . import _staging
from . import _async_distributed
from ._async_running import _claim, _interrupted_at_exit, _interruptible, _start, _unclaim
from ._arguments import _normalise_metadata, _path
from ._sharded import save_sharded_streaming
# The synchronous save's preparation and config writing, reused so that
# both saves choose the same tensors and write the same files.
from ._state_dict import check_cast_target, saved_dtype
from .distributed import entries as state_dict
from .distributed.assignment import writer_ranks as checked_writer_ranks
from .distributed.hf_config import config_files
from .distributed.phases import Ranks


class AsyncSave(concurrent.futures.Future):
    """The Future of ``save_model_streaming_async``.

    Its result is what ``save_model_streaming`` returns (the index's or the
    single file's path); an error of the save is raised by ``result()``. A
    save that has started cannot be cancelled (``cancel()`` returns False).

    The snapshot: the save reads the model's tensors until
    ``wait_for_snapshot()`` returns True, and only then may anything change
    them in place (an optimizer step, ``load_state_dict``, ``.copy_()``
    under ``no_grad``). With full staging that is before the call returns.
    """

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory
        self._snapshot = threading.Event()
        self._abort = threading.Event()  # Ctrl-C while the interpreter waits at exit
        self._ring: Optional[_staging.StagingRing] = None
        # Running from the start: nothing can cancel a save once staging began.
        self.set_running_or_notify_cancel()

    def snapshot_taken(self) -> bool:
        """Whether the save has copied every tensor (or stopped, failing),
        so that the model may change."""
        return self._snapshot.is_set()

    def wait_for_snapshot(self, timeout: Optional[float] = None) -> bool:
        """Waits until ``snapshot_taken()``; True unless `timeout` (seconds)
        ran out first. A save that fails also ends its snapshot (it no
        longer reads the model); its error comes from ``result()``."""
        return self._snapshot.wait(timeout)

    def _stop(self, error: BaseException) -> None:
        self._abort.set()
        ring = self._ring
        if ring is not None:
            ring.stop(error)


# The staging memory, lent to one save at a time (see StagingArena).
_arena = _staging.StagingArena()

def _write_files(items, directory: str, meta: list, options: dict) -> str:
    """The files of a single-process save_model_streaming, from CPU tensors
    in state dict order (a seam the tests slow down)."""
    return save_sharded_streaming(items, directory, meta, **options)


def _check_max_staging_bytes(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_staging_bytes must be an int of bytes or None, not {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"max_staging_bytes must not be negative, but is {value}.")
    return value


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not callable(getattr(optimizer, "register_step_pre_hook", None)):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (it needs register_step_pre_hook), not "
            f"{type(optimizer).__name__}."
        )


def _wait_before_step(optimizer, save: AsyncSave) -> None:
    """A step pre-hook that waits for the snapshot, once. It cannot remove
    itself while the optimizer iterates its pre-hooks (the dict would change
    under the loop), so it registers a post-hook that removes both: the
    post-hook is then the last one, the only one that may remove itself."""
    handles = []

    def remove_both(*_):
        for handle in handles:
            handle.remove()

    def wait(*_):
        save.wait_for_snapshot()
        if len(handles) == 1:
            handles.append(optimizer.register_step_post_hook(remove_both))

    handles.append(optimizer.register_step_pre_hook(wait))


def _staged_entries(model, dtype) -> list[_staging.StagedEntry]:
    return [_staging.entry(name, tensor, saved_dtype(tensor.dtype, dtype))
            for name, tensor in state_dict.entries(model)]


def _buffers_now(model, entries: Sequence[_staging.StagedEntry]) -> dict[int, torch.Tensor]:
    """Copies of a module's buffers (the entries that are not parameters),
    taken at the call: a forward pass in training mode changes some of them
    (BatchNorm's running statistics), and they are small."""
    if not isinstance(model, torch.nn.Module):
        return {}
    ready = {}
    with torch.no_grad():
        for index, e in enumerate(entries):
            if not isinstance(e.tensor, torch.nn.Parameter):
                ready[index] = _staging._whole(e.tensor).to("cpu", e.dtype, copy=True)
    return ready


def save_model_streaming_async(
    model: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    save_directory: Union[str, os.PathLike],
    *,
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
    fsync: bool = False,
    process_group=None,
    writer_ranks: Optional[Sequence[int]] = None,
    progress: bool = False,
    max_staging_bytes: Optional[int] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> AsyncSave:
    """``save_model_streaming`` in the background: the same files, from the
    model as it is at the call, while training goes on.

    Full staging (``max_staging_bytes=None``, the default): every tensor is
    copied into CPU staging memory (pinned, copied without blocking, for a
    GPU model) before the call returns; the model may then change at once.
    The staging memory is kept for the next save: a later save of the same
    model allocates nothing.

    Bounded staging (``max_staging_bytes=N``): the call returns at once and
    the parameters are copied in the background, in state dict order,
    through a ring of N bytes (a tensor larger than N is staged alone, in a
    ring of its size), each as the writer frees room. Until
    ``future.wait_for_snapshot()`` returns:

    - allowed: forward and backward passes, ``zero_grad()``, anything that
      reads the parameters or changes only their ``.grad``; the module's
      buffers are copied at the call, so training-mode forward passes that
      update them (BatchNorm) are allowed too (a state dict given as a
      mapping has no buffers: all its tensors are staged in the background);
    - not allowed: anything that changes a parameter in place: an optimizer
      step, ``load_state_dict``, ``p.copy_()`` / ``p.add_()`` under
      ``no_grad``, ``model.to()``, ``model.half()``. A change torch can see
      (the tensor's version counter) fails the save with ``ValueError``
      naming the tensor; a change through ``.data`` or raw memory cannot be
      seen and would be saved half changed.

    ``optimizer=``: its next ``step()`` waits for the snapshot first (a step
    pre-hook, removed after that step). With full staging nothing waits.

    One save at a time per folder: a save to a folder that an asynchronous
    save is still writing raises ``OSError`` (``EBUSY``) at once. Saves to
    other folders may start; their staging waits for the memory of the one
    before (with full staging the call waits; with bounded staging the
    snapshot does), so the staging memory is never held twice. At
    interpreter exit, running saves finish before the process ends; a
    Ctrl-C while it waits for them aborts them (nothing published, no
    temporary file left).

    Every other argument is ``save_model_streaming``'s. In a single
    process, ``EBUSY`` and a ``save_directory`` that is no path
    (``TypeError``, ``ValueError``) are raised at once; every other error
    comes through the Future, and a failed save leaves the folder as
    ``save_model_streaming`` leaves it.

    Across torch.distributed ranks it is a collective, like the
    synchronous save: every rank of `process_group` calls it with the same
    arguments, and each stages its own share (its piece of each tensor
    split by FSDP2's ``fully_shard`` or ``Shard(dim)`` on a one-dimensional
    mesh, and the whole tensors it writes). Any error on any rank, at the
    call (a busy folder included) or in the background, fails every rank's
    Future with the same ``DistributedSaveError``, and no index is written.
    The background work uses two gloo groups of its own, made at the first
    call and reused, so that it never interleaves with the training's
    collectives. With bounded staging each rank stages its share through
    its own ring while the pieces travel to their writers, and the
    snapshot is taken on each rank when its share has been copied.

    config.json (transformers models) is written from the model's config
    after the shards and index, as by ``save_model_streaming``.
    """
    directory = _path("save_directory", save_directory)
    save = AsyncSave(directory)

    def check_options() -> Optional[int]:
        bound = _check_max_staging_bytes(max_staging_bytes)
        _check_optimizer(optimizer)
        _normalise_metadata(metadata)
        return bound

    try:
        ranks = Ranks(process_group)
    except Exception as error:
        save._snapshot.set()
        save.set_exception(error)
        return save
    if ranks.size > 1:
        _async_distributed.start(
            save, ranks, model, directory, arena=_arena, max_staging_bytes=max_staging_bytes,
            check_options=check_options, dtype=dtype, metadata=metadata,
            writer_ranks=writer_ranks, max_shard_size=max_shard_size,
            filename_pattern=filename_pattern, fsync=fsync, progress=progress)
        if max_staging_bytes is not None and optimizer is not None and not save.done():
            _wait_before_step(optimizer, save)
        return save
    key = _claim(directory, save)
    try:
        bound = check_options()
        # The synchronous save's argument checks, made at the call.
        if dtype is not None:
            check_cast_target(dtype)
        checked_writer_ranks(writer_ranks, ranks.size)
        entries = _staged_entries(model, dtype)
        config = config_files(model, dtype)  # as it is now: training may change the model
        meta = [(e.name, e.dtype, list(e.tensor.shape)) for e in entries]
        options = dict(max_shard_size=max_shard_size, filename_pattern=filename_pattern,
                       metadata=metadata, fsync=fsync, progress=progress)
        pinned = _staging.needs_pinned_memory(entries)

        def write(items) -> str:
            written = _write_files(_interruptible(items, save), directory, meta, options)
            if config is not None:
                config.save(directory)
            return written

        if bound is None:
            work = _stage_all_now(save, entries, pinned, write)
        else:
            work = _stage_through_ring(save, model, entries, pinned, bound, write)
            if optimizer is not None:
                _wait_before_step(optimizer, save)
    except Exception as error:
        _unclaim(key)
        save._snapshot.set()
        save.set_exception(error)
        return save
    except BaseException:
        # A Ctrl-C during the call (waiting for the staging memory, or
        # copying) stops the caller, as it would a synchronous save.
        _unclaim(key)
        save._snapshot.set()
        raise

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # delivered through the Future
            _unclaim(key)
            save._snapshot.set()
            save.set_exception(error)
        else:
            _unclaim(key)
            save.set_result(result)

    _start(run, f"trinity_stream_saver-async-save:{os.path.basename(os.path.normpath(directory))}")
    return save


def _stage_all_now(save: AsyncSave, entries, pinned: bool, write):
    """Full staging: the copies are taken here, on the caller's thread, and
    the returned work writes them (and lends the memory on)."""
    buffer = _arena.acquire(_staging.full_staging_bytes(entries), pinned)
    try:
        staged, copied = _staging.stage_all(entries, buffer)
    except BaseException:
        _arena.release()
        raise
    save._snapshot.set()

    def work() -> str:
        try:
            if copied is not None:
                copied.synchronize()
            return write(staged)
        finally:
            _arena.release()

    return work


def _stage_through_ring(save: AsyncSave, model, entries, pinned: bool, bound: int, write):
    """Bounded staging: the buffers are copied here; the returned work
    takes the ring's memory (waiting for a save ahead), starts the producer
    and writes what it hands over."""
    ready = _buffers_now(model, entries)
    caller_event = None
    if pinned:
        caller_event = torch.cuda.Event()
        caller_event.record()

    def work() -> str:
        capacity = _staging.ring_bytes(entries, bound)
        try:
            buffer = _arena.acquire(capacity, pinned, save._abort)
        except _staging.StagingCancelled:
            raise _interrupted_at_exit() from None
        try:
            ring = _staging.StagingRing(entries, buffer, capacity, ready, caller_event)
            save._ring = ring
            if save._abort.is_set():
                ring.stop(_interrupted_at_exit())

            def produce() -> None:
                try:
                    ring.produce()
                finally:
                    save._snapshot.set()

            producer = threading.Thread(target=produce, daemon=True,
                                        name="trinity_stream_saver-async-staging")
            producer.start()
            try:
                return write(ring)
            finally:
                # A failed write stops the producer; the memory is lent on
                # only once nothing copies into it.
                ring.stop()
                producer.join()
        finally:
            _arena.release()

    return work
