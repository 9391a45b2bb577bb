"""Stream a safetensors checkpoint to disk one tensor at a time.

A drop-in replacement for ``trinity.utils.stream_saver``: the same
signatures, byte-identical files, written from a C++ core straight from
tensor memory. This module only normalises arguments; the checks and the
writing happen in ``trinity_stream_saver._C``.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Optional, Union

import torch

from . import _C

__all__ = [
    "TensorMeta",
    "StateDictMeta",
    "collect_state_dict_meta",
    "finalize",
    "finalize_async",
    "save_safetensors_streaming",
]


class TensorMeta(NamedTuple):
    """Metadata for a single tensor, sufficient to compute its header entry."""

    name: str
    dtype: str
    shape: list[int]


StateDictMeta = list[TensorMeta]



def _unsupported_dtype(name: object, dtype: object) -> ValueError:
    return ValueError(
        f"state_dict_meta entry {name!r} has dtype {dtype!r}, which cannot be "
        f"saved. Use a torch.dtype, its name (e.g. 'bfloat16') or a safetensors "
        f"dtype: {', '.join(_C.supported_dtypes())}."
    )


def _resolve_dtype(name: object, dtype: object) -> str:
    """The safetensors name of a dtype given as torch.bfloat16, "bfloat16" or
    "torch.bfloat16" (safetensors names such as "BF16" never reach here)."""
    if isinstance(dtype, str):
        torch_dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise _unsupported_dtype(name, dtype)
        dtype = torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"state_dict_meta entry {name!r} has a dtype of type "
            f"{type(dtype).__name__}; expected a str or a torch.dtype."
        )
    safetensors_name = _C.safetensors_dtype(dtype)
    if safetensors_name is None:
        raise _unsupported_dtype(name, dtype)
    return safetensors_name


def _check_meta(state_dict_meta: object) -> None:
    # Entries are checked in C++ as they are read: a Python loop over the
    # tens of thousands of entries of a large model costs more than saving
    # its small tensors.
    if isinstance(state_dict_meta, (str, bytes, Mapping)) or not isinstance(
        state_dict_meta, Iterable
    ):
        raise TypeError(
            "state_dict_meta must be a list of TensorMeta or (name, dtype, shape) "
            f"tuples, not {type(state_dict_meta).__name__}."
        )


def _path(argument: str, value: object) -> str:
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{argument} must be a str or os.PathLike of str, not {path!r}.")
    if "\0" in path:
        raise ValueError(f"{argument} {path!r} contains a null byte; no file can have that name.")
    return path


def _file_path(argument: str, value: object) -> str:
    """A path that must name a file: "dir/" would put the temporary file at
    "dir/.tmp", and "" at ".tmp" in the working directory."""
    path = _path(argument, value)
    if not path:
        raise ValueError(f"{argument} is empty; give a file name.")
    if path.endswith(os.sep) or (os.altsep is not None and path.endswith(os.altsep)):
        raise ValueError(
            f"{argument} {path!r} ends with a path separator, so it names a directory; "
            f"give a file name inside it (e.g. {path + 'model.safetensors'!r})."
        )
    return path


def _reject_mapping(tensor_iter: object) -> None:
    # Iterating a dict yields its keys, which would fail on the first item
    # with a less helpful message.
    if isinstance(tensor_iter, Mapping):
        raise TypeError(
            "tensor_iter must yield (name, tensor) pairs, but a dict was passed; "
            "pass state_dict.items() instead."
        )


def _normalise_metadata(metadata: object) -> Optional[list[tuple[str, str]]]:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a dict of str to str, not {type(metadata).__name__}."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str, but has {key!r}: {value!r}; "
                f"convert values with str() first."
            )
    return list(metadata.items())


def save_safetensors_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    filepath: Union[str, os.PathLike],
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    *,
    rename: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
) -> str:
    """Stream-write a safetensors file, holding only one tensor in memory.

    Args:
        tensor_iter: yields ``(name, tensor)`` pairs of CPU tensors. Each
            tensor is released before the next item is requested.
        filepath: destination. Data goes to ``filepath + ".tmp"`` first.
        state_dict_meta: ``(name, dtype, shape)`` for every tensor the
            iterator yields (``TensorMeta`` or plain tuples; dtype as a
            safetensors name, a ``torch.dtype`` or its name). The header
            space is reserved exactly from it.
        rename: if True, atomically replace ``filepath`` with the finished
            file; if False, leave it at ``filepath + ".tmp"`` for the caller.
        metadata: optional ``dict[str, str]`` stored as ``__metadata__``.
        fsync: if True, the data is on disk before the rename and the rename
            is on disk before returning (with ``rename=False``: the data).
        overlap: if True, a C++ thread writes tensor k while the iterator
            produces tensor k+1, so one tensor beyond the one being written
            may be alive; off by default, which holds one tensor at a time.

    Returns:
        ``str(filepath)`` if ``rename`` else the temporary file's path.

    The temporary file is never written through a symbolic link, and a
    second save to the same ``filepath`` while this one runs fails at once
    with ``OSError`` (``EBUSY``) instead of mixing the two; a stale
    temporary file of a killed save is replaced. A symbolic link at
    ``filepath`` is itself replaced, as ``os.replace`` does; a directory,
    device, FIFO or socket there is refused before anything is written.

    On any error the temporary file is removed and a file already at
    ``filepath`` is left untouched.
    """
    _reject_mapping(tensor_iter)
    path = _file_path("filepath", filepath)
    _check_meta(state_dict_meta)
    extra = _normalise_metadata(metadata)
    written = _C.save(
        tensor_iter,
        os.fsencode(path),
        state_dict_meta,
        _resolve_dtype,
        extra,
        bool(rename),
        bool(fsync),
        bool(overlap),
    )
    return path if rename else os.fsdecode(written)


def finalize(
    tmp_path: Union[str, os.PathLike], filepath: Union[str, os.PathLike], *, fsync: bool = True
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
    path = _file_path("filepath", filepath)
    _C.finalize(os.fsencode(temp), os.fsencode(path), bool(fsync))
    return path


def finalize_async(
    tmp_path: Union[str, os.PathLike], filepath: Union[str, os.PathLike], *, fsync: bool = True
) -> concurrent.futures.Future:
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
    path = _file_path("filepath", filepath)
    try:
        return _finalizer().submit(finalize, temp, path, fsync=fsync)
    except RuntimeError:
        # "cannot schedule new futures after (interpreter) shutdown": the
        # promise to finish before exit is kept by finishing now.
        done: concurrent.futures.Future = concurrent.futures.Future()
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


def collect_state_dict_meta(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
) -> StateDictMeta:
    """Iterate once and return the metadata of every tensor that can be saved.

    Tensors of dtypes safetensors cannot store are skipped. No tensor is
    held after its entry is made.
    """
    _reject_mapping(tensor_iter)
    meta: StateDictMeta = []
    for name, tensor in tensor_iter:
        dtype = _C.safetensors_dtype(tensor.dtype)
        if dtype is not None:
            meta.append(TensorMeta(name, dtype, list(tensor.shape)))
        del tensor
    return meta
