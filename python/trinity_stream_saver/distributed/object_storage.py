"""How a rank's shard files land in object storage (``s3://bucket/prefix``,
or any protocol fsspec knows): the storage class of the distributed save
for URLs, beside storage.ShardFiles for folders, with the same phases.
Each file is a multipart upload fed in file order (``_object_save``):
written = every part uploaded, the object not yet visible; commit =
CompleteMultipartUpload; abort = AbortMultipartUpload of every upload not
completed. The first writer rank puts the index, then config.json, once
every rank's objects are listed under the prefix as large as written.

Nothing here knows of ranks: the save's phases (save.py) decide when each
step runs."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from .._object_save import _StoreSave, publish_index, upload_files
from .._object_store import open_store
from .._sharded import ShardPlan
from .storage import not_visible


def object_storage(storage_options: Optional[Mapping[str, Any]], part_size: int,
                   concurrency: int):
    """The storage class for a URL destination, with the save's options."""
    return functools.partial(ShardObjects, storage_options=storage_options,
                             part_size=part_size, concurrency=concurrency)


class ShardObjects:
    """`filenames` of `plan`, uploaded by this rank under the prefix `url`."""

    def __init__(self, plan: ShardPlan, url: str, filenames: list[str], metadata, fsync: bool,
                 *, storage_options: Optional[Mapping[str, Any]], part_size: int,
                 concurrency: int):
        del fsync  # an object is durable once its upload completes
        self._plan = plan
        self._filenames = filenames
        self._metadata = metadata
        self._store, prefix = open_store(url, storage_options, prefix=True)
        self._prefix = prefix + "/"
        self._uploads = _StoreSave(self._store, part_size, concurrency)

    def write(self, items) -> None:
        """Pulls every (name, tensor) of `items` and uploads every part of
        this rank's files; no object appears yet."""
        try:
            upload_files(self._uploads, self._prefix, self._plan, self._filenames, items,
                         self._metadata)
        finally:
            # Every part is sent (or released, after a failure): the upload
            # threads have nothing left to do.
            self._uploads.close()

    def commit(self) -> dict[str, int]:
        """Completes the uploads (the objects appear, in plan order);
        returns the size of each, by file name."""
        self._uploads.complete_all()
        return {upload.key[len(self._prefix):]: upload.size for upload in self._uploads.started}

    def abort(self) -> None:
        """Aborts every upload not completed, so that no parts remain."""
        self._uploads.close()
        for note in self._uploads.abort_all():
            warnings.warn(note, RuntimeWarning, stacklevel=2)

    def finish(self, committed: dict[int, dict[str, int]]) -> str:
        """The index, once `committed` (each rank's commit()) shows that
        every object is under the prefix as this rank lists it; returns the
        index's URL, or the single file's."""
        listed = self._store.sizes(self._prefix)
        missing = not_visible(committed, listed.get)
        if missing:
            raise FileNotFoundError(
                f"{self._store.url(self._prefix)}: {len(missing)} shard objects that the ranks "
                f"uploaded are not listed under this prefix: {', '.join(missing)}. The writer "
                "ranks do not reach the same store (another endpoint, AWS_ENDPOINT_URL, or "
                "account); give every rank the same one, or pass writer_ranks=[0]. No index "
                "was written."
            )
        return publish_index(self._store, self._prefix, self._plan, self._metadata)

    def save_config(self, config) -> None:
        """config.json (and generation_config.json), hf_config.ConfigFiles,
        each put as one object."""
        for name, data in config.contents().items():
            self._store.put(self._prefix + name, data)
