"""``convert``: any checkpoint the command line reads, streamed into a sharded
safetensors checkpoint with its index, one tensor in memory."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import save_sharded_streaming
from .._extension import _C
from .._meta import DTYPE_TO_SAFETENSORS
from .._object_store import url_protocol
from .._state_dict import saved_dtype
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

#: --dtype spellings -> (safetensors name, torch dtype): the targets a cast
#: allows (_state_dict.check_cast_target)
DTYPES = {
    "bf16": ("BF16", torch.bfloat16),
    "bfloat16": ("BF16", torch.bfloat16),
    "fp16": ("F16", torch.float16),
    "float16": ("F16", torch.float16),
    "fp32": ("F32", torch.float32),
    "float32": ("F32", torch.float32),
}

# safetensors name -> torch dtype, for the cast rule (saved_dtype), which
# --dtype shares with save_model_streaming's dtype=.
_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_TO_SAFETENSORS.items()}


def convert(
    source: str,
    destination: str,
    *,
    max_shard_size: str = "5GB",
    dtype: Optional[str] = None,
    fsync: bool = False,
    progress: bool = True,
) -> str:
    """Converts ``source`` into the folder ``destination`` (or the object
    storage prefix, given a URL); returns the path of the index (or of the
    single file). A failed conversion leaves the destination as it was (a
    folder it created is removed again)."""
    if url_protocol(os.fspath(source), "SRC") is not None:
        raise CheckpointError(
            f"{source}: convert reads a local checkpoint; download it first (inspect and "
            "verify read object storage)."
        )
    checkpoint = open_checkpoint(source)
    remote = url_protocol(os.fspath(destination), "DST") is not None
    folder = None if remote else Path(destination)
    if not remote:
        _refuse_overlap(checkpoint, folder)
    target = DTYPES[dtype] if dtype is not None else None

    entries = checkpoint.entries()
    storable = set(_C.supported_dtypes())
    unstorable = [entry for entry in entries if entry.dtype not in storable]
    if unstorable:
        entry = unstorable[0]
        raise CheckpointError(
            f"{entry.file}: tensor {entry.name!r} has dtype {entry.dtype}, which safetensors "
            f"cannot store ({len(unstorable)} such tensors)."
        )
    meta = [
        (entry.name, _target_dtype(entry.dtype, target), entry.shape) for entry in entries
    ]
    total = sum(
        entry.nbytes // _TORCH_DTYPES[entry.dtype].itemsize * _TORCH_DTYPES[dtype].itemsize
        for entry, (_, dtype, _) in zip(entries, meta)
    )

    tensors = checkpoint.tensors()
    if target is not None:
        tensors = _cast(tensors, target[1])
    if remote:
        written = _convert_into_store(checkpoint, tensors, destination, meta,
                                      max_shard_size, progress)
        _report(checkpoint, len(entries), total, written)
        return written

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    # The side files are copied under temporary names first and put in
    # place only after the weights: a failed conversion (of the weights or
    # of a copy) leaves nothing new in the destination.
    staged: list[tuple[Path, Path]] = []
    try:
        _stage_side_files(checkpoint, folder, staged, fsync=fsync)
        written = save_sharded_streaming(
            tensors, folder, meta, max_shard_size=max_shard_size, fsync=fsync, progress=progress
        )
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _install_side_files(staged, folder, fsync=fsync)
    _report(checkpoint, len(entries), total, written)
    return written


def _convert_into_store(checkpoint: Checkpoint, tensors, url: str, meta, max_shard_size,
                        progress: bool) -> str:
    """As for a folder: the side files are uploaded first (an upload each,
    invisible until completed) and completed only after the weights' index
    is in place; any failure before aborts them, as the save aborts its own
    uploads. fsync does not apply: an object is durable once completed."""
    from .._object_store import open_store

    store, prefix = open_store(url, None, prefix=True)
    store.connect(1)
    staged = []
    try:
        for path in checkpoint.side_files():
            data = path.read_bytes()
            upload = store.start(f"{prefix}/{path.name}")
            staged.append(upload)
            upload.upload_part(1, memoryview(data))
        written = save_sharded_streaming(
            tensors, url, meta, max_shard_size=max_shard_size, progress=progress
        )
    except BaseException as error:
        for upload in staged:
            try:
                upload.abort()
            except Exception as failure:  # the conversion's own error is the one to raise
                error.add_note(f"aborting the upload of a side file also failed ({failure!r}).")
        raise
    for upload in staged:
        upload.complete()
    return written


def _refuse_overlap(checkpoint: Checkpoint, folder: Path) -> None:
    # Writing into the source folder would let the saver's clean-up of stale
    # shards delete the very files being converted.
    if not folder.exists():
        return
    if any(file.resolve().parent == folder.resolve() for file in checkpoint.files):
        raise CheckpointError(
            f"{folder}: is the folder of the source checkpoint; convert into another folder."
        )


def _target_dtype(dtype: str, target) -> str:
    """The safetensors name a tensor of `dtype` is saved as with --dtype."""
    if target is None:
        return dtype
    return DTYPE_TO_SAFETENSORS[saved_dtype(_TORCH_DTYPES[dtype], target[1])]


def _cast(tensors, dtype: torch.dtype):
    # map() keeps no reference to an item once it has handed it on, so the
    # source tensor and its cast are released before the next is read.
    return map(functools.partial(_cast_item, dtype=dtype), tensors)


def _cast_item(item: tuple[str, torch.Tensor], dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    name, tensor = item
    saved = saved_dtype(tensor.dtype, dtype)
    return (name, tensor.to(saved)) if saved != tensor.dtype else item


def _stage_side_files(checkpoint: Checkpoint, folder: Path, staged: list, *, fsync: bool) -> None:
    """Copies each side file to a temporary name in `folder`, appending
    (temporary, final) to `staged` as it goes; with fsync, as for the
    shards, the data is on disk before the renames."""
    for path in checkpoint.side_files():
        temporary = folder / (path.name + ".tmp")
        staged.append((temporary, folder / path.name))
        with open(path, "rb") as source, os.fdopen(_create_new(temporary), "wb") as copy:
            shutil.copyfileobj(source, copy)
            if fsync:
                copy.flush()
                os.fsync(copy.fileno())


def _create_new(path: Path) -> int:
    """A descriptor of a new, empty file at ``path``, created as the saver
    creates its temporary files: whatever is there (debris of a killed run,
    or a symbolic link or FIFO planted there) is removed, never opened or
    followed, and the file is created with O_EXCL | O_NOFOLLOW."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder is in the way of a temporary file; remove it.") from None
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _install_side_files(staged: list, folder: Path, *, fsync: bool) -> None:
    for temporary, final in staged:
        os.replace(temporary, final)
    if fsync and staged:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _report(checkpoint: Checkpoint, tensors: int, total: int, written: str) -> None:
    print(f"Converted {tensors} tensors ({total:,} bytes) from {checkpoint.path} into {written}.")
    if checkpoint.aliases:
        shared = ", ".join(f"{alias} (= {kept})" for alias, kept in checkpoint.aliases.items())
        print(f"Written once, as they share storage: {shared}.")
    copied = [path.name for path in checkpoint.side_files()]
    if copied:
        print(f"Copied: {', '.join(copied)}.")
    sys.stdout.flush()
