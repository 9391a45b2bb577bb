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

from ._extension import _C

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

#: torch dtype -> safetensors dtype name, for every dtype this library saves
#: (the original module's name for the same table).
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {
    dtype: name
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype) and (name := _C.safetensors_dtype(dtype)) is not None
}


def _unsupported_dtype(name: object, dtype: object) -> ValueError:
    return ValueError(
        f"state_dict_meta entry {_C.short_repr(name)} has dtype {_C.short_repr(dtype)}, which cannot be "
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
            f"state_dict_meta entry {_C.short_repr(name)} has a dtype of type "
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
        raise TypeError(f"{argument} must be a str or os.PathLike of str, not {_C.short_repr(path)}.")
    if "\0" in path:
        raise ValueError(
            f"{argument} {_C.short_repr(path)} contains a null byte; no file can have that name."
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
                f"metadata must map str to str, but has {_C.short_repr(key)}: "
                f"{_C.short_repr(value)}; convert values with str() first."
            )
    return list(metadata.items())


def _max_queued_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_queued_bytes must be an int, not {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"max_queued_bytes must not be negative, but is {value}.")
    return min(value, 2**64 - 1)


def save_safetensors_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    filepath: Union[str, os.PathLike],
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    *,
    rename: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
    max_queued_bytes: Optional[int] = None,
) -> str:
    """Stream-write a safetensors file, holding only one tensor in memory.

    Args:
        tensor_iter: yields ``(name, tensor)`` pairs of CPU tensors. Each
            tensor is released before the next item is requested.
        filepath: destination. Data goes to ``filepath + ".tmp"`` first.
        state_dict_meta: ``(name, dtype, shape)`` for every tensor the
            iterator yields, in the order it yields them (``TensorMeta`` or
            plain tuples; dtype as a safetensors name, a ``torch.dtype`` or
            its name). The header space is reserved exactly from it. If the
            iterator stops before it has yielded as many tensors as there
            are rows, the save fails with ``ValueError`` and nothing is
            written: a generator that died early is not a good checkpoint.
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
            ``state_dict_meta``, which keeps the peak memory of the default
            one-at-a-time hand-off. Reused buffers: while the iterator
            produces the next item, the saver holds only the tensor being
            written and the queue, so a ring of ``R`` staging buffers of
            ``S`` bytes each (one tensor per buffer) may be refilled safely
            when ``R >= 2 + max_queued_bytes // S``: 3 buffers by default,
            2 with ``max_queued_bytes=0``. A held tensor that is modified in
            place (which bumps its version) or whose storage is freed or
            resized fails the save with ``ValueError`` naming it; changes
            made behind torch's back (numpy, raw pointers) cannot be seen.

    Returns:
        ``str(filepath)`` if ``rename`` else the temporary file's path.

    On any error the temporary file is removed and a file already at
    ``filepath`` is left untouched.
    """
    _reject_mapping(tensor_iter)
    path = _path("filepath", filepath)
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
        None if max_queued_bytes is None else _max_queued_bytes(max_queued_bytes),
    )
    return path if rename else os.fsdecode(written)


def finalize(
    tmp_path: Union[str, os.PathLike], filepath: Union[str, os.PathLike], *, fsync: bool = True
) -> str:
    """Finish a save made with ``rename=False``: with ``fsync``, put the temp
    file's data on disk, atomically rename it to ``filepath``, and put the
    rename on disk. Returns ``filepath`` as ``str``. If the rename cannot
    happen, the temp file stays where it is.
    """
    temp = _path("tmp_path", tmp_path)
    path = _path("filepath", filepath)
    _C.finalize(os.fsencode(temp), os.fsencode(path), bool(fsync))
    return path


def finalize_async(
    tmp_path: Union[str, os.PathLike], filepath: Union[str, os.PathLike], *, fsync: bool = True
) -> concurrent.futures.Future:
    """``finalize`` on a background thread, so that training goes on while
    the checkpoint is made durable. Returns a Future of the final path;
    errors surface through it. Finalizations run one at a time, in the order
    they were requested, and complete before the interpreter exits.
    """
    temp = _path("tmp_path", tmp_path)
    path = _path("filepath", filepath)
    return _finalizer().submit(finalize, temp, path, fsync=fsync)


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


def _compute_exact_header_size(
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """N: the JSON header length (in bytes, a multiple of 8) that a save of
    ``state_dict_meta`` reserves, as the original module computes it."""
    _check_meta(state_dict_meta)
    return _C.reserved_header_size(state_dict_meta, _resolve_dtype, _normalise_metadata(metadata))


def collect_state_dict_meta(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
) -> StateDictMeta:
    """Iterate once and return the metadata of every tensor that can be saved.

    Tensors of dtypes safetensors cannot store are skipped. No tensor is
    held after its entry is made.
    """
    _reject_mapping(tensor_iter)
    meta: StateDictMeta = []
    # A counter, not enumerate(): enumerate's cached result tuple would keep
    # the previous item alive while the next one is produced.
    index = -1
    for item in tensor_iter:
        index += 1
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"tensor_iter must yield (name, tensor) pairs, but item {index} is "
                f"{type(item).__name__} {_C.short_repr(item)}; pass state_dict.items()."
            )
        name, tensor = item
        del item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"tensor_iter must yield (name, tensor) pairs, but item {index} "
                f"({_C.short_repr(name)}) holds {type(tensor).__name__} instead of a torch.Tensor."
            )
        dtype = _C.safetensors_dtype(tensor.dtype)
        if dtype is not None:
            meta.append(TensorMeta(name, dtype, list(tensor.shape)))
        del tensor
    return meta
