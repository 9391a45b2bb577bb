"""save_model_streaming_async: save_model_streaming on a background
thread, from a snapshot of the model, so that training goes on while the
checkpoint is written.

This module is the public function, its Future and the optimizer hook:
what each rank stages and how the background save writes it is
``_async_work``'s, the copies ``_staging``'s, the running saves and the
wait at interpreter exit ``_async_running``'s, and the bytes the
synchronous save's own (``distributed.save``), so that both saves choose
the same tensors and write the same files.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from . import _async_work, _staging
from ._arguments import _normalise_metadata, _path
from ._object_save import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from ._meta import PathLikeStr
from .distributed.phases import Ranks

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.utils.hooks import RemovableHandle


class AsyncSave(concurrent.futures.Future[str]):
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


def _wait_before_step(optimizer: torch.optim.Optimizer, save: AsyncSave) -> None:
    """A step pre-hook that waits for the snapshot, once. It cannot remove
    itself while the optimizer iterates its pre-hooks (the dict would change
    under the loop), so it registers a post-hook that removes both: the
    post-hook is then the last one, the only one that may remove itself."""
    handles: list[RemovableHandle] = []

    def remove_both(*_: object) -> None:
        for handle in handles:
            handle.remove()

    def wait(*_: object) -> None:
        save.wait_for_snapshot()
        if len(handles) == 1:
            handles.append(optimizer.register_step_post_hook(remove_both))

    handles.append(optimizer.register_step_pre_hook(wait))


def save_model_streaming_async(
    model: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    save_directory: PathLikeStr,
    *,
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
    fsync: bool = False,
    process_group: Optional[ProcessGroup] = None,
    writer_ranks: Optional[Sequence[int]] = None,
    progress: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
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
    as it was at the call, after the shards and index, as by
    ``save_model_streaming``. A URL destination (``s3://bucket/prefix``,
    with ``storage_options``, ``part_size``, ``concurrency``) is written as
    ``save_model_streaming`` writes it.
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
    _async_work.start(
        save, ranks, model, directory, arena=_arena, check_options=check_options, dtype=dtype,
        writer_ranks=writer_ranks, max_shard_size=max_shard_size,
        filename_pattern=filename_pattern, storage_options=storage_options, part_size=part_size,
        concurrency=concurrency, metadata=metadata, fsync=fsync, progress=progress)
    if max_staging_bytes is not None and optimizer is not None and not save.done():
        _wait_before_step(optimizer, save)
    return save
