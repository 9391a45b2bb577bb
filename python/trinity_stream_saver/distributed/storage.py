"""How a rank's shard files land in the folder, in the shape of
torch.distributed.checkpoint's StorageWriter: written under temporary
names, renamed on commit or removed on abort; on the first writer rank, the
index once every file is in place. The bytes are the C++ core's
(``_C.ShardedWriter``, ``_C.finish_sharded_checkpoint``).

The save is given the class, so that a test records or fails what it
writes without patching the core."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Callable, Optional, Protocol

import torch

from .._sharded import ShardPlan, _finish_sharded, _sharded_writer


class ShardStorage(Protocol):
    """Where one rank's shard files of a distributed save land (a folder:
    ShardFiles; objects under a URL's prefix: object_storage.ShardObjects).
    Made as ``storage_type(plan, directory, filenames, metadata, fsync)``;
    the save's phases call its methods in this order."""

    def write(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Pulls every (name, tensor) of `items` (this rank's files' tensors,
        in plan order); writes the files, none of them visible yet."""

    def commit(self) -> dict[str, int]:
        """Makes this rank's files visible; returns each one's size by name."""

    def abort(self) -> None:
        """Removes what write() made that commit() did not publish."""

    def finish(self, committed: dict[int, dict[str, int]]) -> str:
        """On the first writer rank, once every rank committed (`committed`:
        each rank's commit()): the index; returns its path or URL."""

    def save_config(self, config: Any) -> None:
        """config.json (and generation_config.json): hf_config.ConfigFiles."""


#: What the save is given: a class (or a factory with the same call).
ShardStorageType = Callable[[ShardPlan, str, list[str], Optional[list[tuple[str, str]]], bool],
                            ShardStorage]


class ShardFiles:
    """`filenames` of `plan`, written by this rank into `directory`."""

    def __init__(self, plan: ShardPlan, directory: str, filenames: list[str],
                 metadata: Optional[list[tuple[str, str]]], fsync: bool) -> None:
        self._plan = plan
        self._directory = directory
        self._metadata = metadata
        self._fsync = fsync
        self._writer = _sharded_writer(plan, directory, filenames, metadata, fsync)

    def write(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Pulls every (name, tensor) of `items`; writes the files under
        temporary names."""
        self._writer.write(items)

    def commit(self) -> dict[str, int]:
        """Renames the files; returns the size of each, by file name."""
        paths = [os.fsdecode(path) for path in self._writer.commit()]
        return {os.path.basename(path): os.stat(path).st_size for path in paths}

    def abort(self) -> None:
        """Removes the temporary files not yet renamed."""
        self._writer.abort()

    def finish(self, committed: dict[int, dict[str, int]]) -> str:
        """The index, once `committed` (each rank's commit()) shows that
        every file is in this rank's folder; returns its path, or the single
        file's."""
        missing = not_visible(committed, lambda name: _size(os.path.join(self._directory, name)))
        if missing:
            raise FileNotFoundError(
                f"{self._directory}: {len(missing)} shard files that the ranks wrote are not in "
                f"this folder: {', '.join(missing)}. The writer ranks do not share this folder "
                "(nodes without a shared filesystem); save to a folder that every writer rank "
                "shares, or pass writer_ranks=[0] so that one rank writes every file. No index "
                "was written."
            )
        return _finish_sharded(self._plan, self._directory, self._metadata, self._fsync)

    def save_config(self, config: Any) -> None:
        """config.json (and generation_config.json): hf_config.ConfigFiles."""
        config.save(self._directory)


def not_visible(committed: dict[int, dict[str, int]],
                size_here: Callable[[str], Optional[int]]) -> list[str]:
    """The files each rank committed that the first writer does not see
    as large as that rank wrote them (`size_here`: a file's size, None if
    absent), each described: ranks on nodes without a shared filesystem
    (or store) write into places of the same name that are not one place,
    and an index published then would name files that are not beside it."""
    missing = []
    for rank, files in sorted(committed.items()):
        for name, size in files.items():
            here = size_here(name)
            if here != size:
                seen = "absent" if here is None else f"{here} bytes"
                missing.append(f"{name} (rank {rank} wrote {size} bytes; here: {seen})")
    return missing


def _size(path: str) -> Optional[int]:
    """The size of the file at `path`, or None if there is none. Opened
    rather than stat()ed: opening makes a network filesystem (NFS) fetch
    the file's current attributes instead of cached ones."""
    try:
        # O_NONBLOCK: a FIFO of that name must not block the save.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)
