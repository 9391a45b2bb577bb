"""The command line given checkpoints made to mislead it: indexes that reach
outside their folder, a destination with a link or a FIFO planted where
side files are staged, ambiguous headers, a folder holding two
checkpoints, and inputs that used to end in a traceback. Each command runs
in a child process (a FIFO could block it; a crash must not take pytest)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli, run_cli_subprocess

INDEX = "model.safetensors.index.json"


def sharded_folder(folder: Path) -> Path:
    """Two shards and their index, as a downloaded checkpoint would be."""
    folder.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "model-00002-of-00002.safetensors")
    write_index(folder, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    return folder


def write_index(folder: Path, weight_map, text: str | None = None) -> None:
    (folder / INDEX).write_text(
        text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def assert_error(result, *words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for word in words:
        assert word in output, output[-2000:]


# --------------------------------------------------------------------------
# an index may name only files in its own folder
# --------------------------------------------------------------------------


@pytest.fixture
def escaping(tmp_path, request):
    """A checkpoint whose index places tensor "b" in a file outside its folder."""
    secret = tmp_path / "someone_elses.safetensors"
    save_file({"b": torch.full((3,), 7.0)}, secret)
    folder = sharded_folder(tmp_path / "downloaded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    if request.param == "relative":
        entry = "../someone_elses.safetensors"
    elif request.param == "absolute":
        entry = str(secret)
    else:
        entry = "model-00002-of-00002.safetensors"
        (folder / entry).symlink_to(secret)
    write_index(folder, {"a": "model-00001-of-00002.safetensors", "b": entry})
    return folder, entry


@pytest.mark.parametrize("escaping", ["relative", "absolute", "symlink"], indirect=True)
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_an_index_naming_a_file_outside_its_folder_is_refused_naming_the_entry(escaping, command):
    folder, entry = escaping
    assert_error(run_cli(command, folder), INDEX, "tensor 'b'", entry if "/" in entry else "outside")


@pytest.mark.parametrize("escaping", ["relative", "absolute", "symlink"], indirect=True)
def test_convert_does_not_copy_tensors_from_outside_the_source_folder(escaping, tmp_path):
    folder, _ = escaping
    destination = tmp_path / "out"
    assert_error(run_cli("convert", folder, destination, "--no-progress"), "tensor 'b'")
    assert not destination.exists()


def test_a_hugging_face_cache_snapshot_whose_files_link_into_blobs_is_read(tmp_path):
    repository = tmp_path / "models--org--tiny"
    blobs, snapshot = repository / "blobs", repository / "snapshots" / "0123abc"
    source = sharded_folder(tmp_path / "source")
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (blobs / f"blob-{file.name}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob-{file.name}")
    result = run_cli("verify", snapshot)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# convert stages side files as the saver stages its own files
# --------------------------------------------------------------------------


def source_with_config(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    save_file({"a": torch.ones(2)}, source / "model.safetensors")
    (source / "config.json").write_text('{"model_type": "tiny"}')
    return source


def test_a_symlink_planted_at_a_staging_name_is_replaced_not_followed(tmp_path):
    source = source_with_config(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("must not change")
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json.tmp").symlink_to(victim)
    result = run_cli("convert", source, destination, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert victim.read_text() == "must not change"
    assert (destination / "config.json").read_text() == '{"model_type": "tiny"}'
    assert not (destination / "config.json").is_symlink()


@pytest.mark.slow
def test_a_fifo_planted_at_a_staging_name_does_not_block_convert(tmp_path):
    source = source_with_config(tmp_path)
    destination = tmp_path / "out"
    destination.mkdir()
    os.mkfifo(destination / "config.json.tmp")
    # Without the fix the copy opens the FIFO and waits for a reader forever:
    # a child process, so that the hang is a timeout and not a stuck suite.
    result = run_cli_subprocess("convert", source, destination, "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (destination / "config.json").read_text() == '{"model_type": "tiny"}'


# --------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------


def test_verify_flags_a_folder_holding_both_a_single_file_and_an_index(tmp_path):
    folder = sharded_folder(tmp_path / "ckpt")
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, folder / "model.safetensors")
    assert_error(run_cli("verify", folder), "holds both model.safetensors and " + INDEX)


def raw_file(path: Path, header_text: str, data: bytes) -> None:
    text = header_text.encode("utf-8", "surrogateescape")
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "header, duplicated",
    [
        ('{"__metadata__":{"format":"pt"},"__metadata__":{"format":"pt"},'
         '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "'__metadata__'"),
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
         '"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', "'a'"),
    ],
)
def test_verify_flags_a_header_with_a_duplicate_key(tmp_path, header, duplicated):
    raw_file(tmp_path / "model.safetensors", header, b"\x00\x00\x80\x3f")
    assert_error(run_cli("verify", tmp_path / "model.safetensors"), "more than once", duplicated)


# --------------------------------------------------------------------------
# errors, not tracebacks
# --------------------------------------------------------------------------


def test_convert_of_a_checkpoint_without_tensors_writes_an_empty_checkpoint(tmp_path):
    torch.save({}, tmp_path / "empty.bin")
    result = run_cli("convert", tmp_path / "empty.bin", tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_file(tmp_path / "out" / "model.safetensors") == {}


@pytest.mark.parametrize(
    "index_text",
    [
        '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"weight_map": {"a": 5}}',
        '{"weight_map": {"a": ["model.safetensors"]}}',
        '{"weight_map": {"a": null, "b": "model-00001-of-00002.safetensors"}}',
    ],
    ids=["deeply_nested", "int_value", "list_value", "null_value"],
)
@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_a_malformed_index_is_an_error_naming_the_index(tmp_path, index_text, command):
    folder = sharded_folder(tmp_path / "ckpt")
    write_index(folder, None, index_text)
    arguments = [tmp_path / "out", "--no-progress"] if command == "convert" else []
    assert_error(run_cli(command, folder, *arguments), INDEX)


def non_utf8_file(path: Path) -> None:
    # A tensor name with a byte that is not UTF-8 (and a JSON-escaped lone
    # surrogate in the second file): the header is otherwise well formed.
    raw_file(path, '{"a\udcff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 4)


@pytest.mark.parametrize("command", ["inspect", "verify", "convert", "verify-against"])
def test_a_safetensors_file_with_a_name_that_is_not_utf8_is_an_error_naming_the_file(tmp_path, command):
    bad = tmp_path / "bad.safetensors"
    non_utf8_file(bad)
    if command == "verify-against":
        save_file({"a": torch.zeros(1)}, tmp_path / "good.safetensors")
        result = run_cli("verify", tmp_path / "good.safetensors", "--against", bad)
    elif command == "convert":
        result = run_cli("convert", bad, tmp_path / "out", "--no-progress")
    else:
        result = run_cli(command, bad)
    assert_error(result, "bad.safetensors")
