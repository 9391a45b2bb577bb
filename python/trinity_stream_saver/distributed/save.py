"""save_model_streaming: a Hugging Face checkpoint from a model that may be
sharded over torch.distributed ranks (FSDP2, tensor parallel), every rank
writing its share of the shard files.

This module is the save's phases, each closed by one exchange among all
ranks (phases.run_phase), so that a failure on any rank is raised on every
rank before the next phase starts:

1. prepare (local): arguments, the tensors, the plan, the assignment; then
   the ranks compare what they prepared (ranks that would write two
   different checkpoints, or into two different folders, fail here).
2. write: every rank sends its piece of each sharded tensor to the rank
   that writes it, and the writers write their files under temporary
   names, all at once (feed, transport, storage). A rank that fails still
   receives what was sent to it and makes the remaining collectives, so
   that no rank is left waiting.
3. commit: the temporary files take their final names.
4. finish (the first writer rank): checks that every file is in its folder,
   then writes the index and config.json.
Until phase 3 a failure leaves the folder as it was (a folder the save
created stays, empty).

The transport and feed modules are imported when a save runs, not with the
package: they are the ones that use torch.distributed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from .._arguments import _normalise_metadata, _parse_size, _path
from .._meta import PathLikeStr
from .._extension import _C
from .._object_save import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from .._object_store import check_url, url_protocol
from .._progress import _progress_bar
from .._sharded import plan_shards
from .._state_dict import check_cast_target
from . import entries as state_dict
from .assignment import Assignment, writer_ranks as checked_writer_ranks
from .hf_config import config_files
from .phases import Ranks, run_phase
from .storage import ShardFiles, ShardStorage, ShardStorageType

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _Agreement:
    """What every rank must prepare alike; exchanged after phase 1."""

    def __init__(self, digest: str, directory: str, unsendable: list[int]):
        self.digest = digest
        self.directory = directory
        self.unsendable = unsendable  # entries this rank cannot send in place


def _check_agreement(prepared: list[_Agreement], rank: int) -> None:
    """Raises on a rank whose tensors, arguments or folder differ from rank
    0's: the ranks would write parts of two checkpoints, or wait for pieces
    that never come, or write shards where the index is not."""
    mine, first = prepared[rank], prepared[0]
    problems = []
    if mine.digest != first.digest:
        problems.append(
            "its tensors (names, dtypes, shapes after tied weights are removed, how they are "
            "sharded) or arguments (max_shard_size, filename_pattern, writer_ranks, metadata, "
            "dtype) differ from rank 0's")
    if mine.directory != first.directory:
        problems.append(f"its save_directory {mine.directory!r} is not rank 0's "
                        f"{first.directory!r}")
    if problems:
        raise ValueError(
            "; ".join(problems) + "; every rank must save the same model with the same "
            "arguments into the same folder.")


class _RankSave:
    """This rank's part of one save: what each phase does here."""

    def __init__(self, ranks: Ranks, transport_type: Any, storage_type: ShardStorageType,
                 feed_type: Any = None) -> None:
        self._ranks = ranks
        self._transport_type = transport_type
        self._storage_type = storage_type
        self._feed_type = feed_type
        self._storage: Optional[ShardStorage] = None
        self._folder_lock: Optional[_C.CheckpointFolderLock] = None

    def prepare(self, model: Any, save_directory: PathLikeStr, max_shard_size: Union[int, str],
                filename_pattern: str, metadata: Optional[Mapping[str, str]],
                dtype: Optional[torch.dtype], writer_ranks: Optional[Sequence[int]],
                config: Any) -> _Agreement:
        from .transport import layouts

        self.directory = _path("save_directory", save_directory)
        # A URL (s3://bucket/prefix) is a prefix in object storage: no
        # folder to make or lock. An unknown protocol fails here, on every
        # rank, before anything is written.
        self.is_url = url_protocol(self.directory, "save_directory") is not None
        if self.is_url:
            check_url(self.directory, prefix=True)
        if dtype is not None:
            check_cast_target(dtype)
        self.dtype = dtype
        self.config = config_files(model, dtype) if config is _FROM_MODEL else config
        self.extra = _normalise_metadata(metadata)
        writers = checked_writer_ranks(writer_ranks, self._ranks.size)
        self.entries = state_dict.entries(model)
        rows = state_dict.meta(self.entries, dtype)
        self.plan = plan_shards(rows, max_shard_size, filename_pattern)
        self.sizes = state_dict.nbytes(self.entries, dtype)
        self.assignment = Assignment(self.plan, writers, self._ranks.rank, self.sizes)
        self.layouts, unsendable = layouts(self.entries, self._ranks)
        # Ranks that differ in these would write a checkpoint of two
        # different models, or (the layouts) wait for pieces that never come.
        digest = hashlib.sha256(repr((rows, self.layouts, _parse_size(max_shard_size),
                                      filename_pattern, writers, self.extra)).encode()).hexdigest()
        # The path as given (a relative one is the same on nodes whose
        # working directories have the same path): whether it is one folder
        # is what the first writer checks before the index.
        where = self.directory.rstrip("/") if self.is_url else os.path.normpath(self.directory)
        return _Agreement(digest, where, unsendable)

    def agree(self, prepared: list[_Agreement]) -> None:
        from .transport import agreed_layouts

        _check_agreement(prepared, self._ranks.rank)
        self.layouts = agreed_layouts(self.layouts, [report.unsendable for report in prepared])

    @property
    def coordinator(self) -> int:
        return self.assignment.coordinator

    def write(self, progress: bool, fsync: bool) -> None:
        from .feed import Feed

        mine = self.assignment
        feed = (self._feed_type or Feed)(self.entries, self.layouts, mine.writer_of, self._ranks.rank,
                    self._transport_type(self._ranks.resolved_group), self.dtype, self.sizes,
                    mine.largest_mine)
        # First, so that whatever fails after it, the other ranks get this
        # rank's pieces.
        feed.post_sends()
        coordinator = self._ranks.rank == mine.coordinator
        bar = None
        try:
            if progress and coordinator:
                bar = feed.progress = _progress_bar(
                    mine.bytes_mine, os.path.basename(os.path.normpath(self.directory)))
            if (mine.files or coordinator) and not self.is_url:
                os.makedirs(self.directory, exist_ok=True)
            if coordinator and not self.is_url:
                # The folder is this save's until its clean-up is done: a
                # second save into it fails here (EBUSY) instead of removing
                # this one's files. The other ranks write into the held folder.
                self._folder_lock = _C.CheckpointFolderLock(os.fsencode(self.directory))
            if mine.files:
                storage = self._storage = self._storage_type(self.plan, self.directory, mine.files,
                                                             self.extra, fsync)
                storage.write(feed)
            feed.finish()
        except Exception:
            feed.finish_after_failure()
            raise
        finally:
            if bar is not None:
                bar.close()

    def commit(self) -> dict[str, int]:
        return self._storage.commit() if self._storage is not None else {}

    def abort(self) -> None:
        if self._storage is not None:
            self._storage.abort()
        self.release()

    def release(self) -> None:
        if self._folder_lock is not None:
            self._folder_lock.release()

    def finish(self, committed: list[dict[str, int]]) -> Optional[str]:
        if self._ranks.rank != self.coordinator:
            return None
        # The coordinator is a writer rank: it always has files, so storage.
        storage = self._storage
        assert storage is not None, "the first writer rank writes files"
        written = storage.finish(dict(enumerate(committed)))
        if self.config is not None:
            storage.save_config(self.config)
        return written


# The config files written are the model's own, taken when the save starts.
_FROM_MODEL = object()


def _save(model: Any, save_directory: PathLikeStr, transport_type: Any,
          storage_type: ShardStorageType, *, max_shard_size: Union[int, str],
          filename_pattern: str, metadata: Optional[Mapping[str, str]],
          dtype: Optional[torch.dtype], fsync: bool, process_group: Optional[ProcessGroup],
          writer_ranks: Optional[Sequence[int]], progress: bool, config: Any = _FROM_MODEL,
          feed_type: Any = None) -> str:
    """save_model_streaming with the transport and the storage given (the
    classes; the tests give failing and recording ones). `config`: the
    config files to write (hf_config.ConfigFiles, or None for none) when
    they are not `model`'s own (an asynchronous save of staged tensors).
    `feed_type`: a feed.Feed subclass, for tensors that are not all in
    memory when the save starts (the bounded asynchronous save)."""
    ranks = Ranks(process_group)
    part = _RankSave(ranks, transport_type, storage_type, feed_type)
    prepared = run_phase(ranks, "preparing", lambda: part.prepare(
        model, save_directory, max_shard_size, filename_pattern, metadata, dtype, writer_ranks,
        config))
    run_phase(ranks, "comparing what the ranks save", lambda: part.agree(prepared))
    run_phase(ranks, "writing", lambda: part.write(progress, fsync), undo=part.abort)
    committed = run_phase(
        ranks, "renaming the files (files of other ranks may have replaced older ones)",
        part.commit, undo=part.abort)
    try:
        written = run_phase(ranks, "writing the index and config",
                            lambda: part.finish(committed))
    finally:
        part.release()
    index = written[part.coordinator]
    if index is None:  # the coordinator's finish() returns its path
        raise RuntimeError(f"rank {part.coordinator}, the first writer, returned no index")
    return index


def storage_for(save_directory: PathLikeStr, storage_options: Optional[Mapping[str, Any]],
                part_size: int, concurrency: int) -> ShardStorageType:
    """The storage class of a destination: files in a folder, or objects
    under a URL's prefix (with the object store's options)."""
    if url_protocol(os.fspath(save_directory), "save_directory") is not None:
        from .object_storage import object_storage

        objects: ShardStorageType = object_storage(storage_options, part_size, concurrency)
        return objects
    if storage_options is not None:
        raise ValueError(
            f"storage_options applies to URLs (s3://...), but {save_directory!r} is a local path."
        )
    return ShardFiles


def save_model_streaming(
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
) -> str:
    """Save `model` as a Hugging Face checkpoint (shards, index, and a
    transformers model's config.json) in `save_directory`, one full tensor
    in memory at a time.

    When torch.distributed is initialised this is a collective: every rank
    of `process_group` (the default group when None) calls it with the same
    arguments. The shard files are shared among the writer ranks, balanced
    by bytes, and each rank writes only its files, all ranks at once. Each
    DTensor reaches the rank that writes it whole, one at a time in state
    dict order:

    - on CPU, split along one dimension of a one-dimensional mesh over the
      process group (FSDP2's ``fully_shard``, tensor parallel
      ``Shard(dim)``): every rank sends its piece to the writer alone,
      point to point, from the parameter's own memory; the writer receives
      the pieces into one reused buffer. A rank holds its largest tensor
      (and, with ``dtype``, its largest cast; with ``Shard(dim > 0)``, one
      piece more), and receives only what it writes;
    - any other layout (GPU tensors, several mesh dimensions): gathered on
      every rank (FSDP2's ``Shard(0)`` straight into one buffer, others
      with ``full_tensor()``), then dropped where not written.

    By default every rank writes, so every rank must see the same
    ``save_directory`` (a shared filesystem); without one pass
    ``writer_ranks=[0]``. Ranks given different ``save_directory`` values
    fail before writing; before the index is written, the first writer
    rank checks that every file the ranks wrote is in its folder, with
    the size written, and every rank fails if not. A rank that has finished waits for the others
    at the end of the writing, as in torch.distributed.checkpoint: the
    slowest rank's share must be written within the process group's
    timeout. Without torch.distributed it saves in this process.

    Args:
        model: an ``nn.Module`` (plain, FSDP2-sharded or tensor parallel,
            on CPU or GPU) or a mapping of name to tensor (a state dict).
            Tensors that alias one another (tied weights) are saved once,
            under the first name (a name transformers declares as tied to
            another yields to the other, as in save_pretrained).
        save_directory: the folder, created if missing; or a URL prefix in
            object storage (``s3://bucket/run/step-100``, or a protocol
            fsspec knows), where each writer rank uploads its files as
            multipart uploads that appear only once every rank has
            uploaded every part (see the README's "Object storage").
        max_shard_size, filename_pattern, metadata, fsync: as in
            ``save_sharded_streaming``. Only as many ranks write as there
            are files: lower ``max_shard_size`` for more files.
        dtype: cast floating point tensors of 16 bits or more (float16,
            bfloat16, float32, float64) to it, on the rank that writes them,
            once whole; integer, boolean, float8 and other quantized or
            packed tensors keep their dtype. It must be one of those four.
        process_group: the ranks that save; ``writer_ranks`` are ranks in it.
        writer_ranks: the ranks that write files (all when None). The first
            of them writes the index and config.json once every rank has
            succeeded.
        progress: a tqdm bar, on the first writer rank, in the bytes that
            rank writes.
        storage_options, part_size, concurrency: for a URL, as in
            ``save_safetensors_streaming``, on each writer rank.

    Returns:
        The index's path, or the single file's path (the same on every rank).

    Raises:
        DistributedSaveError on every rank when any rank fails, naming the
        failing ranks and their errors; in a single process, the error
        itself (TypeError, ValueError, OSError). A failure before the
        renames leaves the folder as it was, with no temporary files and no
        index (a folder the save created stays, empty). For a URL, a failure
        before the uploads are completed aborts every rank's uploads: no
        new object, no pending multipart upload, no index.

    GPU tensors reach the CPU through two pinned buffers of the largest
    tensor this rank writes, copied without blocking while the previous
    tensor is written.
    """
    from .transport import PointToPoint

    storage = storage_for(save_directory, storage_options, part_size, concurrency)
    return _save(model, save_directory, PointToPoint, storage, max_shard_size=max_shard_size,
                 filename_pattern=filename_pattern, metadata=metadata, dtype=dtype, fsync=fsync,
                 process_group=process_group, writer_ranks=writer_ranks, progress=progress)
