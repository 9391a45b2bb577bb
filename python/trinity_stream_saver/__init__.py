"""Stream a safetensors checkpoint to disk one tensor at a time.

A drop-in replacement for ``trinity.utils.stream_saver``: the same
signatures, byte-identical files, written from a C++ core straight from
tensor memory. This module only normalises arguments; the checks and the
writing happen in ``trinity_stream_saver._C``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple, Optional, Union

import torch

from ._extension import _C

__all__ = [
    "TensorMeta",
    "StateDictMeta",
    "ShardPlan",
    "collect_state_dict_meta",
    "finalize",
    "finalize_async",
    "plan_shards",
    "save_safetensors_streaming",
    "save_sharded_streaming",
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


def _progress_bar(total: int, description: str):
    # tqdm is needed only for progress=True, so it is not a dependency of
    # the package (pip install tqdm, or the "progress" extra).
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress=True shows a tqdm progress bar, but tqdm is not installed; "
            "install it (pip install tqdm) or pass progress=False."
        ) from error
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)


def _item_bytes(item: object) -> int:
    try:
        return int(item[1].nbytes)  # type: ignore[index]
    except Exception:
        return 0  # not a (name, tensor) pair: the saver raises the real error


def _counted(items: Iterable, bar) -> Iterator:
    """`items`, advancing `bar` by each tensor's bytes once the saver asks for
    the next item (the tensor is then written, or being written with
    overlap). The item is dropped before the next is pulled, so the wrapper
    never keeps a tensor alive."""
    for item in items:
        size = _item_bytes(item)
        yield item
        del item
        bar.update(size)


def save_safetensors_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    filepath: Union[str, os.PathLike],
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    *,
    rename: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
    progress: bool = False,
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
        progress: if True, show a tqdm progress bar in bytes (needs tqdm).

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
    bar = None
    if progress:
        state_dict_meta = list(state_dict_meta)  # read twice: for the total and the save
        bar = _progress_bar(_C.data_size(state_dict_meta, _resolve_dtype), os.path.basename(path))
        tensor_iter = _counted(tensor_iter, bar)
    try:
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
    finally:
        if bar is not None:
            bar.close()
    return path if rename else os.fsdecode(written)


# huggingface_hub's units (parse_size_to_int): "5GB" is 5 * 10**9 bytes.
_DECIMAL_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
# Binary units, as transformers also reads them: "5GiB" is 5 * 2**30 bytes.
_BINARY_UNITS = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10}
_MAX_SIZE = (1 << 64) - 1


def _parse_size(max_shard_size: object) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "1.5GB" or
    "2GiB", as huggingface_hub's parse_size_to_int computes them."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise TypeError(
            "max_shard_size must be an int (bytes) or a str such as '5GB', not "
            f"{type(max_shard_size).__name__}."
        )
    if isinstance(max_shard_size, int):
        size = max_shard_size
    else:
        text = max_shard_size.strip()
        for units, width in ((_BINARY_UNITS, 3), (_DECIMAL_UNITS, 2)):
            unit = text[-width:].upper()
            if unit in units:
                try:
                    size = int(float(text[:-width].strip()) * units[unit])
                except (ValueError, OverflowError):
                    raise ValueError(
                        f"max_shard_size {max_shard_size!r} does not start with a number."
                    ) from None
                break
        else:
            raise ValueError(
                f"max_shard_size {max_shard_size!r} has no known unit; use TB, GB, MB, KB "
                "(powers of 10, as huggingface_hub), TiB, GiB, MiB, KiB, or an int of bytes."
            )
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"max_shard_size {max_shard_size!r} must be between 0 and 2**64 - 1 bytes.")
    return size


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which tensor goes into which file: the fields of huggingface_hub's
    ``StateDictSplit`` (``filename_to_tensors``, ``tensor_to_filename``,
    ``metadata`` = ``{"total_size": bytes}``, ``is_sharded``), plus the
    index's ``total_parameters`` and file name."""

    filename_to_tensors: dict[str, list[str]]
    tensor_to_filename: dict[str, str]
    metadata: dict[str, int]
    total_parameters: int
    filename_pattern: str
    # The plan in C++, for the writers.
    _plan: object = dataclasses.field(repr=False, compare=False)

    @property
    def is_sharded(self) -> bool:
        return len(self.filename_to_tensors) > 1

    @property
    def index_filename(self) -> Optional[str]:
        """"model.safetensors.index.json" for a sharded plan, else None."""
        return self._plan.index_filename if self.is_sharded else None


def plan_shards(
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
) -> ShardPlan:
    """The shard plan of a state dict from its metadata alone: the same as
    ``huggingface_hub.split_torch_state_dict_into_shards`` for the same
    names, sizes and order (greedy in order; a tensor larger than
    ``max_shard_size`` gets a file of its own; ``"5GB"`` is 5 * 10**9 bytes;
    files ``filename_pattern.format(suffix="-00001-of-00005")``, or
    ``suffix=""`` for a single file). An empty state dict plans one empty
    file (the hub plans none).
    """
    _check_meta(state_dict_meta)
    if not isinstance(filename_pattern, str):
        raise TypeError(f"filename_pattern must be a str, not {type(filename_pattern).__name__}.")
    plan = _C.plan_shards(state_dict_meta, _resolve_dtype, _parse_size(max_shard_size), filename_pattern)
    filename_to_tensors = {}
    tensor_to_filename = {}
    for filename, names, _ in plan.files:
        filename_to_tensors[filename] = names
        for name in names:
            tensor_to_filename[name] = filename
    return ShardPlan(
        filename_to_tensors=filename_to_tensors,
        tensor_to_filename=tensor_to_filename,
        metadata={"total_size": plan.total_size},
        total_parameters=plan.total_parameters,
        filename_pattern=plan.filename_pattern,
        _plan=plan,
    )


def save_sharded_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    save_directory: Union[str, os.PathLike],
    state_dict_meta: Iterable[Union[TensorMeta, tuple]],
    *,
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
    progress: bool = False,
) -> str:
    """Stream a sharded Hugging Face checkpoint (``model-00001-of-00005.safetensors``
    ... and ``model.safetensors.index.json``) into ``save_directory``, one
    tensor in memory.

    Args:
        tensor_iter, state_dict_meta: as in ``save_safetensors_streaming``;
            the iterator yields the tensors in ``state_dict_meta``'s order.
        save_directory: the folder, created if missing.
        max_shard_size: the largest file, as an int of bytes or a str
            ("5GB" = 5 * 10**9 bytes, as huggingface_hub reads it; "2GiB").
        filename_pattern: file names, with ``{suffix}`` replaced by
            ``-00001-of-00005`` (or nothing for a single file).
        metadata: ``dict[str, str]`` for the index's ``"metadata"``, or the
            single file's ``__metadata__`` next to ``"format": "pt"``.
        fsync: the data is on disk before the renames, and the renames and
            the index before returning.
        overlap: as in ``save_safetensors_streaming``.
        progress: show a tqdm progress bar in bytes (needs tqdm).

    Returns:
        The index's path, or the single file's path when everything fits in
        one file.

    Every file is written under a temporary name; only after the last
    tensor are they renamed, then the index written, then files of an older
    checkpoint with the same pattern that the new one does not name
    removed. A failure before the renames leaves the folder as it was,
    without temporary files.
    """
    _reject_mapping(tensor_iter)
    directory = _path("save_directory", save_directory)
    extra = _normalise_metadata(metadata)
    plan = plan_shards(state_dict_meta, max_shard_size, filename_pattern)
    bar = None
    if progress:
        bar = _progress_bar(plan.metadata["total_size"], os.path.basename(os.path.normpath(directory)))
        tensor_iter = _counted(tensor_iter, bar)
    try:
        written = _C.save_sharded(
            tensor_iter, os.fsencode(directory), plan._plan, extra, bool(fsync), bool(overlap)
        )
    finally:
        if bar is not None:
            bar.close()
    return os.fsdecode(written)


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
    for name, tensor in tensor_iter:
        dtype = _C.safetensors_dtype(tensor.dtype)
        if dtype is not None:
            meta.append(TensorMeta(name, dtype, list(tensor.shape)))
        del tensor
    return meta
