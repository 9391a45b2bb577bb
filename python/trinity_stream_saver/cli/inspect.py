"""``inspect``: what a checkpoint holds (name, dtype, shape, bytes, file),
its totals and metadata, read from headers and pickles without the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .checkpoint import Checkpoint, open_checkpoint, read_safetensors_header


def describe(path: str) -> dict:
    """The data ``inspect`` prints, as a JSON-ready dict."""
    checkpoint = open_checkpoint(path)
    entries = checkpoint.entries()
    base = checkpoint.folder
    tensors = [
        {
            "name": entry.name,
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "bytes": entry.nbytes,
            "file": _relative(entry.file, base),
        }
        for entry in entries
    ]
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.kind,
        "tensors": tensors,
        "totals": {
            "tensors": len(entries),
            "parameters": sum(entry.parameters for entry in entries),
            "bytes": sum(entry.nbytes for entry in entries),
            "files": len(checkpoint.files),
        },
        # Names a torch.save file holds twice (tied weights) are listed once.
        "shared": dict(checkpoint.aliases),
        "metadata": _metadata(checkpoint, base),
        "index_metadata": checkpoint.index_metadata,
    }


def _relative(file: Path, base: Optional[Path]) -> str:
    return str(file.relative_to(base)) if base is not None else file.name


def _metadata(checkpoint: Checkpoint, base: Optional[Path]) -> dict:
    """Each safetensors file's ``__metadata__``, by file."""
    if checkpoint.kind != "safetensors":
        return {}
    return {
        _relative(file, base): read_safetensors_header(file).metadata for file in checkpoint.files
    }


def run(path: str, as_json: bool) -> int:
    report = describe(path)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    rows = [("name", "dtype", "shape", "bytes", "file")]
    rows += [
        (t["name"], t["dtype"], str(t["shape"]), f"{t['bytes']:,}", t["file"])
        for t in report["tensors"]
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.rjust(width) if column == 3 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    totals = report["totals"]
    lines.append("")
    lines.append(
        f"{totals['tensors']:,} tensors, {totals['parameters']:,} parameters, "
        f"{totals['bytes']:,} bytes ({_human(totals['bytes'])}), {totals['files']} "
        f"file{'s' if totals['files'] != 1 else ''} ({report['format']})"
    )
    for alias, kept in report["shared"].items():
        lines.append(f"shared storage: {alias} is {kept}")
    if report["index_metadata"] is not None:
        lines.append(f"index metadata: {json.dumps(report['index_metadata'], sort_keys=True)}")
    for file, metadata in report["metadata"].items():
        lines.append(f"__metadata__ of {file}: {json.dumps(metadata, sort_keys=True)}")
    return "\n".join(lines)


def _human(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    raise AssertionError("unreachable")
