"""One safetensors file: save_safetensors_streaming, and finalize for a
save made with rename=False."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch

from ._arguments import (
    _check_meta,
    _max_queued_bytes,
    _normalise_metadata,
    _path,
    _reject_mapping,
    _resolve_dtype,
)
from ._extension import _C
from ._meta import MetaRow, PathLikeStr
from ._object_save import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, save_file_to_store
from ._object_store import url_protocol
from ._progress import _counted, _progress_bar


def save_safetensors_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    filepath: PathLikeStr,
    state_dict_meta: Iterable[MetaRow],
    *,
    rename: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
    max_queued_bytes: Optional[int] = None,
    progress: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> str:
    """Stream-write a safetensors file, holding only one tensor in memory.

    Args:
        tensor_iter: yields ``(name, tensor)`` pairs of CPU tensors. Each
            tensor is released before the next item is requested.
        filepath: destination. Data goes to ``filepath + ".tmp"`` first.
        state_dict_meta: ``(name, dtype, shape)`` for every tensor the
            iterator yields, in the order it yields them (``TensorMeta`` or
            plain tuples; dtype as a safetensors name, a ``torch.dtype`` or
            its name). The header space is reserved exactly from it. A
            tensor whose dtype or shape differs from its row is written as
            it is, and the file describes it, as long as its header entry
            still fits the reserved space (a row declared ``bfloat16`` for
            a float32 tensor does); one whose entry outgrows it fails the
            save with ``ValueError`` naming it. If the iterator stops
            before it has yielded as many tensors as there are rows, the
            save fails with ``ValueError`` and nothing is written: a
            generator that died early is not a good checkpoint.
        rename: if True, atomically replace ``filepath`` with the finished
            file; if False, leave it at ``filepath + ".tmp"`` for the caller.
        metadata: optional ``dict[str, str]`` stored as ``__metadata__``.
        fsync: if True, the data is on disk before the rename and the rename
            is on disk before returning (with ``rename=False``: the data).
        overlap: if True, a C++ thread writes the tensors already yielded
            while the iterator produces the next ones; off by default, which
            holds one tensor at a time. Tensors under ``_C.INLINE_BYTES``
            (1 MiB), and tensors not in C order, are copied into the saver's
            memory as they are yielded and never held. Larger ones are held
            until written: the one being written, plus a queue of at most
            ``max_queued_bytes``.
        max_queued_bytes: with ``overlap``, the most bytes of tensors
            queued beyond the one being written (a larger tensor still goes,
            alone, once the writer is idle). Default: the largest tensor in
            ``state_dict_meta``; 0 hands over one tensor at a time, which
            holds the least (the tensor being written) but overlaps less
            on streams of mixed sizes. Reused buffers: while the iterator
            produces the next item, the saver holds only the tensor being
            written and the queue, so a ring of ``R`` staging buffers of
            ``S`` bytes each (one tensor per buffer) may be refilled safely
            when ``R >= 2 + max_queued_bytes // S``: 3 buffers by default,
            2 with ``max_queued_bytes=0``. A held tensor that is modified in
            place (which bumps its version) or whose storage is freed or
            resized fails the save with ``ValueError`` naming it; changes
            made behind torch's back (numpy, raw pointers) cannot be seen.
        progress: if True, show a tqdm progress bar in bytes (needs tqdm).
        storage_options, part_size, concurrency: for a URL destination
            (``s3://bucket/key``, or any protocol fsspec knows): options
            for the store (for s3://, boto3 client arguments or s3fs's
            names; else fsspec's), the upload part size in bytes and the
            parts uploading at once. The file is streamed in order, with
            nothing on local disk, and appears only when complete; see
            the README's "Object storage". ``rename`` must be True;
            ``fsync``, ``overlap`` and ``max_queued_bytes`` do not apply
            (the parts upload beside the producer already).

    Returns:
        ``str(filepath)`` if ``rename`` else the temporary file's path.

    The temporary file is never written through a symbolic link, and a
    second save to the same ``filepath`` while this one runs fails at once
    with ``OSError`` (``EBUSY``) instead of mixing the two; a stale
    temporary file of a killed save is replaced. A symbolic link at
    ``filepath`` is itself replaced, as ``os.replace`` does; a directory,
    device, FIFO or socket there is refused before anything is written.

    On any error the temporary file is removed and a file already at
    ``filepath`` is left untouched, except when only the directory sync
    after the rename fails (``fsync=True``): the new file is then in place,
    and the error says so.
    """
    _reject_mapping(tensor_iter)
    path = _path("filepath", filepath)
    _check_meta(state_dict_meta)
    extra = _normalise_metadata(metadata)
    bar = None
    if progress:
        state_dict_meta = list(state_dict_meta)  # read twice: for the total and the save
        bar = _progress_bar(_C.data_size(state_dict_meta, _resolve_dtype), os.path.basename(path))
        tensor_iter = _counted(tensor_iter, bar)
    try:
        # ---- object storage (see _object_save) ----
        if url_protocol(path, "filepath") is not None:
            if not rename:
                raise ValueError(
                    f"rename=False leaves a temporary local file; {path!r} is an object, which "
                    "appears only when its upload completes. Save with rename=True."
                )
            return save_file_to_store(
                tensor_iter, path, list(state_dict_meta), extra, storage_options,
                part_size, concurrency,
            )
        if storage_options is not None:
            raise ValueError(
                f"storage_options applies to URLs (s3://...), but {path!r} is a local path."
            )
        # ---- end of object storage ----
        written = _C.save(
            tensor_iter,
            os.fsencode(path),
            state_dict_meta,
            _resolve_dtype,
            extra,
            bool(rename),
            bool(fsync),
            bool(overlap),
            None if max_queued_bytes is None else _max_queued_bytes(max_queued_bytes),
        )
    finally:
        if bar is not None:
            bar.close()
    return path if rename else os.fsdecode(written)

def finalize(
    tmp_path: PathLikeStr, filepath: PathLikeStr, *, fsync: bool = True
) -> str:
    """Finish a save made with ``rename=False``: check that the temp file is
    a complete safetensors file that no save is writing, with ``fsync`` put
    its data on disk, atomically rename it to ``filepath``, and put the
    rename on disk. Returns ``filepath`` as ``str``.

    A file that is cut short or otherwise incomplete raises ``ValueError``
    naming it and what is wrong; one a save is still writing raises
    ``OSError`` (``EBUSY``). If the rename does not happen, the temp file
    stays where it is and ``filepath`` is untouched.
    """
    temp = _path("tmp_path", tmp_path)
    path = _path("filepath", filepath)
    _C.finalize(os.fsencode(temp), os.fsencode(path), bool(fsync))
    return path

def finalize_async(
    tmp_path: PathLikeStr, filepath: PathLikeStr, *, fsync: bool = True
) -> concurrent.futures.Future[str]:
    """``finalize`` on a background thread, so that training goes on while
    the checkpoint is made durable. Returns a Future of the final path;
    errors surface through it. Finalizations run one at a time, in the order
    they were requested, and complete before the interpreter exits.

    Once the interpreter is shutting down (from an ``atexit`` handler, or a
    thread still running after the main thread returned) no new background
    work can start: the finalization then runs at once, on the calling
    thread, and the Future returned is already done.
    """
    temp = _path("tmp_path", tmp_path)
    path = _path("filepath", filepath)
    try:
        return _finalizer().submit(finalize, temp, path, fsync=fsync)
    except RuntimeError:
        # "cannot schedule new futures after (interpreter) shutdown": the
        # promise to finish before exit is kept by finishing now.
        done: concurrent.futures.Future[str] = concurrent.futures.Future()
        try:
            done.set_result(finalize(temp, path, fsync=fsync))
        except BaseException as error:  # delivered through the Future, as from the pool
            done.set_exception(error)
        return done

_finalizer_lock = threading.Lock()

_finalizer_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

def _finalizer() -> concurrent.futures.ThreadPoolExecutor:
    global _finalizer_pool
    with _finalizer_lock:
        if _finalizer_pool is None:
            _finalizer_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="trinity_stream_saver-finalize"
            )
        return _finalizer_pool


def _forget_finalizer_in_child() -> None:
    """A forked child has no thread of the parent's pool: a finalization
    submitted there would wait forever. It makes its own on first use."""
    global _finalizer_lock, _finalizer_pool
    _finalizer_lock = threading.Lock()
    _finalizer_pool = None


os.register_at_fork(after_in_child=_forget_finalizer_in_child)
