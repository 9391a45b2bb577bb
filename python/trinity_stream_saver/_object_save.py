"""Saves into object storage: a single safetensors object or a sharded
checkpoint under a prefix, streamed in order into multipart uploads with
nothing staged on local disk.

Each file is a ``_C.PartUpload``: the C++ writer sends the header (known
from state_dict_meta) and then each tensor's bytes into part buffers from
a bounded pool, with the GIL released; each filled part is uploaded by a
Python thread while the writer fills the next. Publishing follows the
folder save: no object appears before every byte of every file is
uploaded; then the uploads are completed, the index put last, and objects
of an older checkpoint that the new index does not name deleted. Any
failure before the completions aborts every upload of the save.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from ._arguments import _resolve_dtype
from ._extension import _C
from ._object_store import CompletedAfterAll, Store, open_store

#: Default part size and uploads in flight: 64 MiB x 4, so a save holds at
#: most 5 parts (4 uploading, 1 filling) = 320 MiB beside the producer's
#: tensor, whatever the checkpoint's size.
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4


def _positive_int(argument: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, not {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{argument} must be at least {minimum}, not {value}.")
    return value


class _FileUpload:
    """One safetensors file: the C++ writer feeding one upload of the store."""

    def __init__(self, save: "_StoreSave", key: str, rows: list, metadata) -> None:
        self._save = save
        self.key = key
        self._error: Optional[BaseException] = None
        self._error_lock = threading.Lock()
        store = save.store
        total = 8 + _C.reserved_header_size(rows, _resolve_dtype, metadata) + _C.data_size(
            rows, _resolve_dtype
        )
        self.size = total
        self.completed = False
        part_size = save.part_size
        if store.max_parts is not None:
            # Large enough that the whole file fits the store's part count.
            part_size = max(part_size, -(-total // store.max_parts))
        self._parts = None
        self._target = store.start(key)
        save.started.append(self)
        self._parts = _C.PartUpload(
            rows, _resolve_dtype, metadata, store.url(key), part_size,
            save.concurrency + 1, self._queue,
        )

    def _queue(self, number: int, data: memoryview, release) -> None:
        if not self._save.store.parallel_parts:
            self._send(number, data, release)
            return
        self._save.pool.submit(self._send, number, data, release)

    def _send(self, number: int, data: memoryview, release) -> None:
        uploaded = False
        try:
            self._target.upload_part(number, data)
            uploaded = True
        except BaseException as error:  # reported by the writer's thread
            with self._error_lock:
                if self._error is None:
                    self._error = error
        finally:
            del data
            release(uploaded)

    def _upload_error(self) -> Optional[BaseException]:
        with self._error_lock:
            return self._error

    def _call(self, method, *args):
        # The writer reports a failed part as OSError(EIO); the upload's own
        # error says why (credentials, a missing bucket, a server error).
        try:
            return method(*args)
        except OSError:
            error = self._upload_error()
            if error is not None:
                raise error from None
            raise

    def write(self, item, index: int) -> None:
        self._call(self._parts.write, item, index)

    def finish(self) -> None:
        """Sends the last part and waits for every part; the object does not
        exist until complete()."""
        self._call(self._parts.finish)
        self._parts = None  # frees the part buffers

    def complete(self) -> None:
        self._target.complete()
        self.completed = True

    def abort(self) -> None:
        if self._parts is not None:
            # The upload threads read the part buffers until they release them.
            self._parts.wait_until_released()
            self._parts = None
        self._target.abort()


class _StoreSave:
    """The uploads of one save. Used as a context manager, it aborts every
    upload not yet completed on any failure (an exception,
    KeyboardInterrupt); the distributed save, whose phases outlive one
    block, calls abort_all() and close() itself."""

    def __init__(self, store: Store, part_size: int, concurrency: int) -> None:
        self.store = store
        self.part_size = _positive_int("part_size", part_size, store.min_part_size)
        self.concurrency = _positive_int("concurrency", concurrency)
        self.started: list[_FileUpload] = []
        store.connect(self.concurrency)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="trinity_stream_saver-upload"
        )

    def __enter__(self) -> "_StoreSave":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is not None:
                for note in self.abort_all():
                    error.add_note(note)
        finally:
            self.close()

    def close(self) -> None:
        """Waits for the upload threads to end (every part has been sent
        or released once finish() or abort() returned)."""
        self.pool.shutdown(wait=True)

    def abort_all(self) -> list[str]:
        """Aborts every upload not completed (an object completed is in
        place: completing a file replaced the older one of its name).
        Returns a note for each abort that failed; the save's own error is
        the one to raise."""
        notes = []
        for upload in self.started:
            if upload.completed:
                continue
            try:
                upload.abort()
            except CompletedAfterAll as failure:
                notes.append(f"trinity_stream_saver: {failure.strerror}")
            except Exception as failure:
                notes.append(
                    f"trinity_stream_saver: aborting the upload of {self.store.url(upload.key)} "
                    f"also failed ({failure!r}); its parts may remain until the bucket's "
                    "lifecycle rule for incomplete multipart uploads removes them."
                )
        return notes

    def complete_all(self) -> None:
        """Makes every object appear, in the order the uploads are listed."""
        for upload in self.started:
            if not upload.completed:
                upload.complete()


def save_file_to_store(
    tensor_iter: Iterable, url: str, state_dict_meta: list, metadata,
    storage_options: Optional[Mapping[str, Any]], part_size: int, concurrency: int,
) -> str:
    """The object-store branch of save_safetensors_streaming."""
    store, key = open_store(url, storage_options)
    with _StoreSave(store, part_size, concurrency) as save:
        upload = _FileUpload(save, key, state_dict_meta, metadata)
        # Counted by hand: enumerate keeps its last (index, item) pair, and
        # so the tensor, alive while the producer makes the next one.
        index = 0
        for item in tensor_iter:
            upload.write(item, index)
            del item  # nothing of ours holds a tensor while the producer makes the next
            index += 1
        upload.finish()
        save.complete_all()
    return store.url(key)


def save_sharded_to_store(
    tensor_iter: Iterable, url: str, plan, metadata,
    storage_options: Optional[Mapping[str, Any]], part_size: int, concurrency: int,
) -> str:
    """The object-store branch of save_sharded_streaming."""
    store, prefix = open_store(url, storage_options, prefix=True)
    prefix += "/"
    with _StoreSave(store, part_size, concurrency) as save:
        upload_files(save, prefix, plan, list(plan.filename_to_tensors), tensor_iter, metadata)
        save.complete_all()
    return publish_index(store, prefix, plan, metadata)


def upload_files(save: _StoreSave, prefix: str, plan, files: list, tensor_iter: Iterable,
                 metadata) -> None:
    """Uploads `files` of `plan` (in plan order) under `prefix`, from
    `tensor_iter`, which yields their tensors in state_dict_meta's order;
    every upload is finished, none completed: save.complete_all() makes
    them appear."""
    file_metadata = _C.shard_file_metadata(plan._plan, metadata)
    wanted = set(files)
    rows_of: dict[str, list] = {name: [] for name in files}
    file_of_row = []
    for row in plan._rows:
        filename = plan.tensor_to_filename[row[0]]
        if filename in wanted:
            rows_of[filename].append(row)
            file_of_row.append(filename)
    open_uploads: dict[str, _FileUpload] = {}
    written = {name: 0 for name in files}
    row = 0  # counted by hand, as in save_file_to_store
    for item in tensor_iter:
        # Past the last row, the last file's writer refuses the extra tensor.
        filename = file_of_row[min(row, len(file_of_row) - 1)] if file_of_row else files[-1]
        row += 1
        upload = open_uploads.get(filename)
        if upload is None:
            # A file's upload begins with its first tensor, so only the
            # file being filled and a large tensor's file of its own
            # (which the plan puts out of order) hold part buffers at once.
            upload = open_uploads[filename] = _FileUpload(
                save, prefix + filename, rows_of[filename], file_metadata
            )
        upload.write(item, written[filename])
        del item
        written[filename] += 1
        if written[filename] == len(rows_of[filename]):
            upload.finish()
            del open_uploads[filename]
    for filename in files:
        # Files still open when the iterator stopped early, and files
        # never begun (the empty file of an empty state dict, or files
        # the iterator never reached): finish() says what is missing.
        upload = open_uploads.pop(filename, None)
        if upload is None and written[filename] == 0:
            upload = _FileUpload(save, prefix + filename, rows_of[filename], file_metadata)
        if upload is not None:
            upload.finish()
    # In plan order: complete_all goes in this order.
    order = {name: i for i, name in enumerate(files)}
    save.started.sort(key=lambda upload: order[upload.key[len(prefix):]])


def publish_index(store: Store, prefix: str, plan, metadata) -> str:
    """Once every file of `plan` is in place under `prefix`: the folder
    save's order (CheckpointFinisher). First an older single file that
    loaders prefer to any index is deleted (a failure stops here, the new
    index unwritten: loaders still read the older checkpoint whole); then
    the index (when sharded); then the older checkpoint's other objects
    that it does not name. Returns the URL of the index, or of the single
    file."""
    files = list(plan.filename_to_tensors)
    keep = set(files)
    result = store.url(prefix + files[0])
    listed = store.sizes(prefix)
    if plan.is_sharded:
        single = _C.shard_filename(plan.filename_pattern, 1, 1)
        if single in listed and single not in keep:
            try:
                store.delete([prefix + single])
                del listed[single]
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"{error}; it is an older single-file checkpoint, which "
                    f"loaders prefer to an index, so the new index was not written and loaders "
                    f"still read the older checkpoint at {store.url(prefix)}. Delete "
                    f"{store.url(prefix + single)} (or give it up by hand) and save again.",
                ) from error
        store.put(prefix + plan.index_filename, _C.shard_index_json(plan._plan, metadata))
        keep.add(plan.index_filename)
        result = store.url(prefix + plan.index_filename)
    # An older checkpoint's objects the new index does not name (shards of
    # another count): harmless to loaders, which follow the index.
    stale = [
        prefix + name
        for name in listed
        if name not in keep and _C.is_checkpoint_filename(plan.filename_pattern, name)
    ]
    if stale:
        try:
            store.delete(stale)
        except OSError as error:
            raise OSError(
                error.errno,
                f"{error}; the new checkpoint at {store.url(prefix)} is "
                "complete and is the one loaders read; only unused objects of the older "
                "checkpoint remain: delete them by hand.",
            ) from error
    return result
