"""Sharded Hugging Face checkpoints: the shard plan and
save_sharded_streaming, composed from the C++ core's phases."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch

from ._arguments import (
    _check_meta,
    _normalise_metadata,
    _parse_size,
    _path,
    _reject_mapping,
    _resolve_dtype,
)
from ._extension import _C
from ._meta import MetaRow, PathLikeStr
from ._object_save import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, save_sharded_to_store
from ._object_store import url_protocol
from ._progress import _counted, _progress_bar


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
    _plan: _C.ShardPlan = dataclasses.field(repr=False, compare=False)
    # The rows planned, in state_dict_meta's order: what an object-store
    # upload sends each file's header from (_object_save.upload_files).
    _rows: list[MetaRow] = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def is_sharded(self) -> bool:
        return len(self.filename_to_tensors) > 1

    @property
    def index_filename(self) -> Optional[str]:
        """"model.safetensors.index.json" for a sharded plan, else None."""
        return self._plan.index_filename if self.is_sharded else None

    @property
    def file_sizes(self) -> dict[str, int]:
        """Bytes of tensor data in each file, in plan order."""
        return {filename: size for filename, _, size in self._plan.files}

def plan_shards(
    state_dict_meta: Iterable[MetaRow],
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
    try:
        filename_pattern.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"filename_pattern {filename_pattern!r} cannot be encoded as UTF-8 ({error.reason} at "
            f"position {error.start}); the index names files in UTF-8, use a str of text."
        ) from None
    rows = list(state_dict_meta)
    plan = _C.plan_shards(rows, _resolve_dtype, _parse_size(max_shard_size), filename_pattern)
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
        _rows=rows,
    )

def save_sharded_streaming(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
    save_directory: PathLikeStr,
    state_dict_meta: Iterable[MetaRow],
    *,
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    fsync: bool = False,
    overlap: bool = False,
    progress: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
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
        storage_options, part_size, concurrency: for a URL prefix
            (``s3://bucket/ckpt``, or any protocol fsspec knows), as in
            ``save_safetensors_streaming``. No object appears before every
            shard is uploaded; the index comes last (see the README's
            "Object storage"). ``fsync`` and ``overlap`` do not apply.

    Returns:
        The index's path, or the single file's path when everything fits in
        one file.

    Every file is written under a temporary name; only after the last
    tensor are they renamed, then the index written, then files of an older
    checkpoint with the same pattern that the new one does not name
    removed. A failure before the renames leaves the folder as it was,
    without temporary files (a folder the save created stays, empty).
    """
    _reject_mapping(tensor_iter)
    directory = _path("save_directory", save_directory)
    extra = _normalise_metadata(metadata)
    _check_meta(state_dict_meta)
    plan = plan_shards(state_dict_meta, max_shard_size, filename_pattern)
    bar = None
    if progress:
        bar = _progress_bar(plan.metadata["total_size"], os.path.basename(os.path.normpath(directory)))
        tensor_iter = _counted(tensor_iter, bar)
    try:
        # ---- object storage (see _object_save) ----
        if url_protocol(directory, "save_directory") is not None:
            return save_sharded_to_store(
                tensor_iter, directory, plan, extra, storage_options, part_size, concurrency
            )
        if storage_options is not None:
            raise ValueError(
                f"storage_options applies to URLs (s3://...), but {directory!r} is a local path."
            )
        # ---- end of object storage ----
        written = _C.save_sharded(
            tensor_iter, os.fsencode(directory), plan._plan, extra, bool(fsync), bool(overlap)
        )
    finally:
        if bar is not None:
            bar.close()
    return os.fsdecode(written)


# The phases of a sharded save, for the distributed save (which writes some
# files of a plan on each rank, then finishes on one).


def _sharded_writer(plan: ShardPlan, directory: str, filenames: list[str],
                    metadata: Optional[list[tuple[str, str]]], fsync: bool) -> _C.ShardedWriter:
    """The C++ writer of `filenames` of `plan` in `directory`: write(), then
    commit() (returns the final paths) or abort()."""
    return _C.ShardedWriter(plan._plan, os.fsencode(directory), filenames, metadata, bool(fsync),
                            False)


def _finish_sharded(plan: ShardPlan, directory: str, metadata: Optional[list[tuple[str, str]]],
                    fsync: bool) -> str:
    """Once every file of `plan` is in place in `directory`: the index (when
    sharded), and an older checkpoint's files removed. Returns the index's
    path, or the single file's."""
    return os.fsdecode(
        _C.finish_sharded_checkpoint(plan._plan, os.fsencode(directory), metadata, None, bool(fsync))
    )
