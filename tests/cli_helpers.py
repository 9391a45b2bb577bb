"""Helpers for the command-line tests: running the CLI (in this
interpreter, or as a user does in a fresh one), a tiny transformers model
built from a config (no download), the source layouts `convert` reads, and
raw safetensors files for corrupting."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

from conftest import child_env


# Files a model folder carries besides its weights; the CLI must copy them.
SIDE_FILES = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": b'{"model_max_length": 128}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>"}\n',
    "tokenizer.model": b"\x00sentencepiece model bytes\xff",
}


PROG = "python -m trinity_stream_saver"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m trinity_stream_saver ARGS`, run in this interpreter:
    `cli.main` with stdout and stderr captured, and its exit status as a
    fresh interpreter would end with it (usage errors and --help exit
    through SystemExit). A fresh interpreter costs seconds (it imports
    torch); run_cli_subprocess keeps one real run per command."""
    from trinity_stream_saver.cli import main

    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv, prog=PROG)
        except SystemExit as exit:
            status = _exit_status(exit.code)
    return subprocess.CompletedProcess([PROG, *argv], status, stdout.getvalue(), stderr.getvalue())


def _exit_status(code) -> int:
    """The status an interpreter ends with for SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_cli_subprocess(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m trinity_stream_saver ARGS` in a fresh interpreter, as a
    user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "trinity_stream_saver", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def write_model_folder(model, folder: Path) -> None:
    """config.json, generation_config.json and tokenizer files, no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    for name, content in SIDE_FILES.items():
        (folder / name).write_bytes(content)


def make_source(layout: str, model, root: Path) -> Path:
    """Writes `model` in one of the layouts `convert` reads; returns SRC."""
    folder = root / layout
    state_dict = model.state_dict()
    if layout in ("bin_file", "pt_file", "pth_file"):
        folder.mkdir(parents=True)
        source = folder / ("model." + layout.split("_")[0])
        torch.save(state_dict, source)
        return source
    write_model_folder(model, folder)
    if layout == "bin_folder":
        torch.save(state_dict, folder / "pytorch_model.bin")
    elif layout == "sharded_bin_folder":
        _save_sharded_bin(state_dict, folder, shards=3)
    elif layout == "safetensors_file":
        model.save_pretrained(folder)
        return folder / "model.safetensors"
    elif layout == "safetensors_folder":
        model.save_pretrained(folder, max_shard_size="200KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        raise AssertionError(f"unknown layout {layout}")
    return folder


def _save_sharded_bin(state_dict, folder: Path, shards: int) -> None:
    """pytorch_model-0000k-of-0000n.bin files and pytorch_model.bin.index.json,
    as transformers 4 wrote them."""
    names = list(state_dict)
    weight_map = {}
    size = 0
    for k in range(shards):
        part = names[k::shards]
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({name: state_dict[name].clone() for name in part}, folder / file)
        for name in part:
            weight_map[name] = file
            size += state_dict[name].numel() * state_dict[name].element_size()
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------
# raw safetensors files
# --------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header dict with __metadata__, data bytes) of a safetensors file."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def copy_tree(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination
