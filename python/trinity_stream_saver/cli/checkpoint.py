"""Reading checkpoints as the command line finds them: a torch.save file, a
safetensors file, or a folder of either (single file or sharded with an
index), one tensor at a time.

Tensors are never all in memory: torch.save files are opened with
``torch.load(mmap=True, weights_only=True)`` and safetensors files with
``safe_open``, both of which map the file, so a tensor's bytes are pages of
the file that the kernel reads on demand. A page once read stays in the
process as long as the mapping, so the pages of each tensor are dropped
(``_C.release_file_pages``) when the next one is asked for: the process
holds about one tensor of the file, not all it has read.
Listing a checkpoint (names, dtypes, shapes) reads only its headers or
pickles, never its data.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .._extension import _C
from .._state_dict import split_aliases
from .object_checkpoint import ObjectPath, ObjectTensors, as_path, refuse_remote_torch

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

# What a folder holds, in the order it is looked for: safetensors first,
# since it needs no unpickling and is what a folder holding both is read as.
_FOLDER_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

# Files of a source folder that are weights (of any framework) or their
# indexes: they are not carried over to a converted checkpoint, everything
# else at the top level (config, generation config, tokenizer, chat
# template, custom code, README) is.
_WEIGHT_SUFFIXES = TORCH_SUFFIXES + (
    SAFETENSORS_SUFFIX,
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".pkl",
    ".npz",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the path and what to do."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, as listed before any data is read."""

    name: str
    dtype: str  # the safetensors name ("BF16"), or torch's for dtypes it cannot store
    shape: tuple[int, ...]
    nbytes: int
    file: Path

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """The weight files of a checkpoint, in reading order, and where it lies."""

    path: Path  # as given
    kind: str  # "torch" or "safetensors"
    files: list[Path]
    folder: Optional[Path] = None  # set when the checkpoint was given as a folder or index
    index_metadata: Optional[dict] = None
    #: names left out because they alias a tensor written under another name:
    #: dropped name -> kept name (filled by entries())
    aliases: dict[str, str] = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        """Every tensor to write, in reading order, aliases left out."""
        self.aliases = {}
        found: list[Entry] = []
        for file in self.files:
            if self.kind == "safetensors":
                found.extend(_safetensors_entries(file))
            else:
                contents = load_torch_file(file)
                kept, aliases = split_aliases(contents.items())
                self.aliases.update(aliases)
                found.extend(_torch_entry(name, contents[name], file) for name in kept)
                del contents
        return found

    def tensors(self, *, with_aliases: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the order of entries(), one file open at a time.

        With ``with_aliases``, names that alias an earlier tensor come too
        (with that same tensor), right after it.
        """
        for file in self.files:
            if self.kind == "safetensors":
                yield from _safetensors_tensors(file)
                continue
            contents = load_torch_file(file)
            kept, aliases = split_aliases(contents.items())
            names = list(contents) if with_aliases else kept
            del kept, aliases
            for name in names:
                # The pair is yielded straight from the mapping so that no
                # local of this generator holds the tensor once the saver
                # asks for the next one.
                yield name, contents[name]
                _C.release_file_pages(contents[name])
            del contents

    def side_files(self) -> list[Path]:
        """The non-weight files at the top of the checkpoint's folder."""
        if self.folder is None:
            return []
        return sorted(
            path
            for path in self.folder.iterdir()
            if path.is_file()
            and not path.name.startswith(".")
            and path.suffix not in _WEIGHT_SUFFIXES
            and not path.name.endswith(".index.json")
        )


def open_checkpoint(path: os.PathLike | str) -> Checkpoint:
    """The checkpoint at ``path``: a weight file, an index file, or a folder
    (or, given a URL, an object or a prefix of object storage)."""
    path = path if isinstance(path, ObjectPath) else as_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.is_dir():
        for layout in _FOLDER_LAYOUTS:
            if (path / layout).is_file():
                checkpoint = open_checkpoint(path / layout)
                checkpoint.path, checkpoint.folder = path, path
                return checkpoint
        loose = sorted(path.glob("*" + SAFETENSORS_SUFFIX))
        if loose:
            return Checkpoint(path, "safetensors", loose, folder=path)
        raise CheckpointError(
            f"{path}: no checkpoint in this folder; expected one of "
            f"{', '.join(_FOLDER_LAYOUTS)}, or *.safetensors files."
        )
    if path.name.endswith(".index.json"):
        index = read_index(path)
        for file in index.files:
            if not file.is_file():
                raise CheckpointError(f"{path}: names the file {file.name}, which does not exist.")
        files = index.files
        kind = "safetensors" if all(f.suffix == SAFETENSORS_SUFFIX for f in files) else "torch"
        refuse_remote_torch(path, kind)
        return Checkpoint(path, kind, files, folder=path.parent, index_metadata=index.metadata)
    if path.suffix == SAFETENSORS_SUFFIX:
        return Checkpoint(path, "safetensors", [path])
    if path.suffix in TORCH_SUFFIXES:
        refuse_remote_torch(path, "torch")
        return Checkpoint(path, "torch", [path])
    raise CheckpointError(
        f"{path}: not a checkpoint file; expected a .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or *.index.json file, or a folder."
    )


@dataclass(frozen=True)
class Index:
    """A checkpoint's index (model.safetensors.index.json and the like)."""

    path: Path
    weight_map: dict[str, str]  # tensor name -> file name, each a plain name next to the index
    metadata: Optional[dict]
    #: keys the JSON lists more than once (the last one is kept, as json does)
    duplicates: list[str]

    @property
    def files(self) -> list[Path]:
        return [self.path.parent / name for name in sorted(set(self.weight_map.values()))]


def read_index(path: Path) -> Index:
    """The index at ``path``, with every file it names checked to lie in its
    folder. A checkpoint may be downloaded from anyone: an index naming
    ``../other.safetensors``, an absolute path or a symbolic link out of the
    folder would make ``convert`` copy, and ``verify`` vouch for, files the
    checkpoint does not hold. Raises CheckpointError naming the entry."""
    duplicates: list[str] = []
    try:
        document = json.loads(path.read_bytes(), object_pairs_hook=_pairs_noting(duplicates))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not a checkpoint index: not valid JSON ({error}).") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f'{path}: not a checkpoint index: no "weight_map" object of tensor name to file name.'
        )
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(
                f'{path}: "weight_map" places tensor {name!r} in {file!r}, which is not a file name.'
            )
        _check_next_to(path, file, f"tensor {name!r}")
    metadata = document.get("metadata")
    return Index(path, weight_map, metadata if isinstance(metadata, dict) else None, duplicates)


def _pairs_noting(duplicates: list[str]):
    """A json object_pairs_hook that builds dicts as json does and appends
    to ``duplicates`` every key an object lists more than once."""

    def pairs(items: list[tuple[str, object]]) -> dict:
        found = dict(items)
        if len(found) != len(items):
            seen: set[str] = set()
            duplicates.extend(key for key, _ in items if key in seen or seen.add(key))
        return found

    return pairs


def _check_next_to(index: Path, name: str, what: str) -> None:
    """Raises CheckpointError unless ``name`` is a plain file name whose file
    lies in the index's folder. A symbolic link is followed only into that
    folder, or, in a Hugging Face cache snapshot (``snapshots/<revision>/``),
    into the repository's ``blobs/``, where the hub keeps the files it links."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CheckpointError(
            f"{index}: places {what} in {name!r}, which is not a plain file name; an index may "
            f"only name files in its own folder. Do not use a checkpoint whose index reaches "
            f"outside its folder."
        )
    file = index.parent / name
    if not file.is_symlink():
        return
    folder = Path(os.path.realpath(index.parent))
    allowed = [folder]
    if folder.parent.name == "snapshots":
        allowed.append(folder.parent.parent / "blobs")
    target = Path(os.path.realpath(file))
    if not any(target.parent == place for place in allowed):
        raise CheckpointError(
            f"{index}: places {what} in {name}, a symbolic link to {target}, outside the "
            f"checkpoint's folder; an index may only name files in its own folder."
        )


# --------------------------------------------------------------------------
# torch.save files
# --------------------------------------------------------------------------


def load_torch_file(path: Path) -> Mapping[str, torch.Tensor]:
    """A torch.save state dict, memory-mapped, as safely as torch can load it."""
    try:
        contents = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next(
            (line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused to unpickle it ({reason}). "
            f"The file holds Python objects besides tensors, and loading it with "
            f"weights_only=False would run any code they carry. If you trust the file, "
            f"re-save its state dict alone: torch.save(torch.load(path, weights_only=False)"
            f"[...state dict...], new_path), then convert new_path."
        ) from None
    except RuntimeError as error:
        if "mmap can only be used" not in str(error):
            raise CheckpointError(f"{path}: torch.load failed: {error}") from None
        raise CheckpointError(
            f"{path}: not a zip-format torch.save file (torch's pre-1.6 format, or not a "
            f"torch checkpoint at all), so it cannot be memory-mapped. Re-save it with "
            f"torch.save(torch.load(path, weights_only=True), new_path) and convert new_path."
        ) from None
    if not isinstance(contents, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(contents).__name__}, not a state dict (a dict of "
            f"tensor name to tensor)."
        )
    for name, value in contents.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; a "
                f"state dict maps str names to tensors. Save model.state_dict() (or the "
                f"entry that holds it) on its own."
            )
    return contents


def _torch_entry(name: str, tensor: torch.Tensor, file: Path) -> Entry:
    dtype = _C.safetensors_dtype(tensor.dtype) or str(tensor.dtype).removeprefix("torch.")
    return Entry(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), file)


# --------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file."""

    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, in file order
    metadata: Optional[dict]
    length: int = 0  # N, the header's bytes after the 8 of its length


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a complete safetensors file. Anything else gets a
    ValueError naming the file and what is wrong, from the format layer's
    check (header length and JSON, dtypes, byte lengths, offsets, file size)."""
    if isinstance(path, ObjectPath):
        raw = path.read_header()  # range requests, the same checks
    else:
        _C.check_file(os.fsencode(path))
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            raw = file.read(length)
    duplicates: list[str] = []
    try:
        header = json.loads(raw, object_pairs_hook=_pairs_noting(duplicates))
    except ValueError as error:  # text that is not UTF-8 (a UnicodeDecodeError)
        raise ValueError(f"{path}: the header is not UTF-8 JSON ({error}).") from None
    if duplicates:
        # json keeps the last, the safetensors library refuses the file, and
        # other readers keep the first: the file means different things to each.
        raise ValueError(
            f"{path}: the header lists {duplicates[0]!r} more than once; readers disagree on "
            f"which one holds, so the file is ambiguous. Re-save it from its source."
        )
    metadata = header.pop("__metadata__", None)
    return SafetensorsHeader(header, metadata, len(raw))


def _safetensors_entries(path: Path) -> list[Entry]:
    header = read_safetensors_header(path)
    ordered = sorted(header.tensors.items(), key=lambda item: tuple(item[1]["data_offsets"]))
    return [
        Entry(
            name,
            info["dtype"],
            tuple(info["shape"]),
            info["data_offsets"][1] - info["data_offsets"][0],
            path,
        )
        for name, info in ordered
    ]


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # In file order, from our own reading of the header: safe_open's
    # offset_keys() is missing from older safetensors (0.5.3 among them).
    names = [entry.name for entry in _safetensors_entries(path)]
    with safe_open_file(path) as file:
        for name in names:
            tensor = file.get_tensor(name)
            yield name, tensor
            # A view of the mapping holds no memory of its own; its pages do.
            _C.release_file_pages(tensor)
            del tensor


def safe_open_file(path: Path):
    """``safetensors.safe_open(path)`` for torch tensors on the CPU."""
    if isinstance(path, ObjectPath):
        header = read_safetensors_header(path)
        return ObjectTensors(path, header.tensors, 8 + header.length)
    try:
        import safetensors
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            f"{path}: reading safetensors files needs the safetensors package; "
            f"pip install safetensors (or trinity_stream_saver[cli])."
        ) from None
    version = tuple(int(part) for part in safetensors.__version__.split(".")[:2]
                    if part.isdigit())
    if version < OLDEST_SAFETENSORS:
        raise CheckpointError(
            f"{path}: reading safetensors files needs safetensors "
            f"{'.'.join(map(str, OLDEST_SAFETENSORS))} or newer, but {safetensors.__version__} "
            "is installed; pip install -U safetensors.")
    return safe_open(path, framework="pt", device="cpu")


#: The oldest safetensors the command line is tested with (cli extra's floor).
OLDEST_SAFETENSORS = (0, 4)
