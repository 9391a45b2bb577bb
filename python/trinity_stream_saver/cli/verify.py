"""``verify``: is a safetensors checkpoint whole? Every file is checked by
the C++ format layer as its header is read (``_C.check_file``: header
length and JSON, dtypes, byte lengths, offsets, file size); the index is
checked here against the files' headers. With ``--against``, the values are compared with a source
checkpoint, one tensor at a time."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    open_checkpoint,
    read_index,
    read_safetensors_header,
    safe_open_file,
)
from .object_checkpoint import as_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, where: Path | str, what: str) -> None:
        self.problems.append(f"{where}: {what}")


@dataclass
class Layout:
    """The files to check, and the index naming them if there is one."""

    files: list[Path]
    folder: Path
    index: Optional[Path] = None
    weight_map: Optional[dict[str, str]] = None  # tensor name -> file name
    index_metadata: dict = field(default_factory=dict)


def run(path: str, against: Optional[str]) -> int:
    report = Report()
    headers = check(as_path(path), report)
    if against is not None and headers is not None:
        compare(headers, against, report)
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        for problem in report.problems:
            print(f"BAD {problem}")
        print(f"{path}: {len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}.")
        return 1
    tensors = sum(len(header) for header in headers.values())
    nbytes = sum(_nbytes(info) for header in headers.values() for info in header.values())
    checked = f"{len(headers)} file{'s' if len(headers) != 1 else ''}, {tensors} tensors, {nbytes:,} bytes"
    print(f"OK {path}: {checked}{', values equal to ' + against if against else ''}.")
    return 0


def check(path: Path, report: Report) -> Optional[dict[Path, dict[str, dict]]]:
    """Checks the files and the index; returns each good file's tensors
    (name -> header entry), or None when there is nothing to check."""
    layout = _layout(path, report)
    if layout is None:
        return None
    weight_map = layout.weight_map
    headers: dict[Path, dict[str, dict]] = {}
    for file in layout.files:
        if not file.exists():
            named = [n for n, f in (weight_map or {}).items() if layout.folder / f == file]
            if named:
                report.problem(
                    file,
                    f"missing, but the index places {len(named)} tensors in it (e.g. {named[0]!r}).",
                )
            else:  # a broken symbolic link, as in a half-downloaded cache snapshot
                report.problem(file, "cannot be read: it is a broken symbolic link.")
            continue
        try:
            headers[file] = read_safetensors_header(file).tensors
        except ValueError as error:
            report.problems.append(str(error))
    _check_names(layout, weight_map, headers, report)
    if weight_map is not None:
        _check_totals(layout, headers, report)
    return headers


def _layout(path: Path, report: Report) -> Optional[Layout]:
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            if (path / SINGLE_NAME).exists():
                report.problem(
                    path,
                    f"holds both {SINGLE_NAME} and {INDEX_NAME}: loaders take {SINGLE_NAME} and "
                    f"ignore the index, so one of them is stale (left by an interrupted save?); "
                    f"remove the one that is not the checkpoint you mean.",
                )
            return _indexed_layout(path / INDEX_NAME, report)
        files = sorted(path.glob("*" + SAFETENSORS_SUFFIX))
        if not files:
            report.problem(path, f"no {INDEX_NAME} and no *{SAFETENSORS_SUFFIX} files in this folder.")
            return None
        return Layout(files, path)
    if not path.exists():
        report.problem(path, "no such file or folder.")
        return None
    if path.name.endswith(".index.json"):
        return _indexed_layout(path, report)
    return Layout([path], path.parent)


def _indexed_layout(index: Path, report: Report) -> Optional[Layout]:
    folder = index.parent
    try:
        document = read_index(index)
    except CheckpointError as error:
        report.problems.append(str(error))
        return None
    for name in document.duplicates:
        report.problem(index, f"{name!r} is listed more than once (duplicated).")
    files = document.files
    named = {file.name for file in files}
    stale = sorted(
        file.name for file in folder.glob("*" + SAFETENSORS_SUFFIX) if file.name not in named
    )
    if stale:
        report.notes.append(
            f"{folder}: {', '.join(stale)} not named by {index.name}; loaders ignore "
            f"{'them' if len(stale) > 1 else 'it'} (left by an interrupted or older save?)."
        )
    return Layout(files, folder, index, document.weight_map, document.metadata or {})


def _check_names(layout, weight_map, headers, report) -> None:
    where: dict[str, Path] = {}
    for file, tensors in headers.items():
        for name in tensors:
            if name in where:
                report.problem(file, f"tensor {name!r} is also in {where[name].name} (duplicated).")
            else:
                where[name] = file
            if weight_map is not None and name not in weight_map:
                report.problem(file, f"holds tensor {name!r}, which {layout.index.name} does not list.")
            elif weight_map is not None and layout.folder / weight_map[name] != file:
                report.problem(
                    file, f"holds tensor {name!r}, which {layout.index.name} places in {weight_map[name]}."
                )
    if weight_map is None:
        return
    for name, file_name in weight_map.items():
        file = layout.folder / file_name
        if file in headers and name not in headers[file]:
            report.problem(file, f"does not hold tensor {name!r}, which {layout.index.name} places there.")


def _check_totals(layout, headers, report) -> None:
    weight_map, metadata = layout.weight_map, layout.index_metadata
    if len(headers) != len(layout.files):
        return  # a missing or bad file is already reported; its sizes are unknown
    found = {name: headers[layout.folder / file].get(name) for name, file in weight_map.items()}
    if any(info is None for info in found.values()):
        return
    expected = {
        "total_size": sum(_nbytes(info) for info in found.values()),
        "total_parameters": sum(math.prod(info["shape"]) for info in found.values()),
    }
    for key, value in expected.items():
        if key in metadata and metadata[key] != value:
            report.problem(
                layout.index, f"metadata {key} is {metadata[key]}, but the files hold {value}."
            )


def _nbytes(info: dict) -> int:
    start, end = info["data_offsets"]
    return end - start


# --------------------------------------------------------------------------
# --against
# --------------------------------------------------------------------------


def compare(headers: dict[Path, dict[str, dict]], source: str, report: Report) -> None:
    """Compares every tensor with the source's, holding one of each at a time."""
    location = {name: file for file, tensors in headers.items() for name in tensors}
    try:
        checkpoint = open_checkpoint(source)
        checkpoint.entries()  # finds the source's aliases
    except CheckpointError as error:
        report.problems.append(str(error))
        return
    seen: set[str] = set()
    handles: dict[Path, object] = {}
    try:
        for name, expected in checkpoint.tensors(with_aliases=True):
            if name not in location:
                if name not in checkpoint.aliases:
                    report.problem(source, f"tensor {name!r} is missing from the checkpoint.")
                continue
            seen.add(name)
            file = location[name]
            if file not in handles:
                handles[file] = safe_open_file(file).__enter__()
            actual = handles[file].get_tensor(name)
            difference = _difference(actual, expected)
            if difference:
                report.problem(file, f"tensor {name!r} differs from {source}: {difference}.")
            del actual, expected
    except CheckpointError as error:
        report.problems.append(str(error))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    for name in sorted(set(location) - seen):
        report.problem(location[name], f"tensor {name!r} is not in {source}.")


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {list(actual.shape)}, expected {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        if not (actual.is_floating_point() and expected.is_floating_point()):
            return f"dtype {actual.dtype}, expected {expected.dtype}"
        # A conversion with --dtype: the values must be the source's, cast.
        expected = expected.to(actual.dtype)
    if not torch.equal(_raw(actual), _raw(expected)):
        return "different values"
    return None


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    # Bytes, not values: NaN payloads and -0.0 compare exactly.
    return tensor.contiguous().reshape(-1).view(torch.uint8)
