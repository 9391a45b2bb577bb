"""How a rank's shard files land in the folder, in the shape of
torch.distributed.checkpoint's StorageWriter: written under temporary
names, renamed on commit or removed on abort; on the first writer rank, the
index once every file is in place. The bytes are the C++ core's
(``_C.ShardedWriter``, ``_C.finish_sharded_checkpoint``).

The save is given the class, so that a test records or fails what it
writes without patching the core."""

from __future__ import annotations

import os

from .._sharded import ShardPlan, _finish_sharded, _sharded_writer


class ShardFiles:
    """`filenames` of `plan`, written by this rank into `directory`."""

    def __init__(self, plan: ShardPlan, directory: str, filenames: list[str], metadata,
                 fsync: bool):
        self._plan = plan
        self._directory = directory
        self._metadata = metadata
        self._fsync = fsync
        self._writer = _sharded_writer(plan, directory, filenames, metadata, fsync)

    def write(self, items) -> None:
        """Pulls every (name, tensor) of `items`; writes the files under
        temporary names."""
        self._writer.write(items)

    def commit(self) -> list[str]:
        """Renames the files; returns their paths."""
        return [os.fsdecode(path) for path in self._writer.commit()]

    def abort(self) -> None:
        """Removes the temporary files not yet renamed."""
        self._writer.abort()

    def finish(self) -> str:
        """The index, once every rank has committed its files; returns its
        path, or the single file's."""
        return _finish_sharded(self._plan, self._directory, self._metadata, self._fsync)
