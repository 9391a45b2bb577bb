"""`verify PATH [--against SRC]`: exit 0 for a whole checkpoint; exit 1,
naming the bad file and what is wrong, for each kind of damage a copy or an
interrupted save leaves; `--against` compares the values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import copy_tree, make_source, read_raw, run_cli, run_cli_subprocess, write_raw
from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory) -> Path:
    """A sharded checkpoint written by `convert` (in out/), and its source
    beside it (in bin_folder/)."""
    root = tmp_path_factory.mktemp("converted")
    source = make_source("bin_folder", model, root)
    result = run_cli("convert", source, root / "out", "--max-shard-size", "150KB", "--no-progress")
    assert result.returncode == 0, result.stderr
    return root / "out"


@pytest.fixture
def checkpoint(converted, tmp_path) -> Path:
    """A copy of the converted checkpoint, for a test to damage."""
    return copy_tree(converted, tmp_path / "copy")


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def assert_bad(folder: Path, file: Path | str, *words: str) -> str:
    result = run_cli("verify", folder)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    named = [line for line in bad if str(file) in line]
    assert named, f"no problem names {file}:\n{result.stdout}"
    for word in words:
        assert any(word in line for line in named), f"{word!r} not in {named}"
    return result.stdout


@pytest.mark.slow
def test_a_converted_checkpoint_verifies(converted):
    result = run_cli_subprocess("verify", converted)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK")


def test_a_single_file_verifies(model, tmp_path):
    source = make_source("safetensors_file", model, tmp_path)
    result = run_cli("verify", source)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_truncated_file_is_named(checkpoint):
    shard = shards(checkpoint)[1]
    os.truncate(shard, shard.stat().st_size - 100)
    assert_bad(checkpoint, shard, "cut short")


def test_a_header_length_beyond_the_end_of_the_file_is_named(checkpoint):
    shard = shards(checkpoint)[0]
    blob = bytearray(shard.read_bytes())
    blob[:8] = (len(blob) + 1).to_bytes(8, "little")
    shard.write_bytes(bytes(blob))
    assert_bad(checkpoint, shard, "header length", "beyond")


def test_a_header_that_is_not_json_is_named(checkpoint):
    shard = shards(checkpoint)[0]
    blob = bytearray(shard.read_bytes())
    blob[8] = ord("[")  # the opening brace of the JSON object
    blob[9:12] = b"\x00\x01\x02"
    shard.write_bytes(bytes(blob))
    assert_bad(checkpoint, shard, "JSON")


def _shift_last_tensor(shard: Path, by: int) -> None:
    """Moves the offsets of the file's last tensor by `by` bytes, and the end
    of the data with them, so that the only fault is an overlap (by < 0) or
    a gap (by > 0) before that tensor."""
    header, data = read_raw(shard)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + by, end + by]
    write_raw(shard, header, data + b"\0" * by if by > 0 else data[:by])


def test_overlapping_offsets_are_named(checkpoint):
    shard = next(s for s in shards(checkpoint) if len(read_raw(s)[0]) > 2)
    _shift_last_tensor(shard, -4)
    assert_bad(checkpoint, shard, "overlap")


def test_a_gap_between_offsets_is_named(checkpoint):
    shard = next(s for s in shards(checkpoint) if len(read_raw(s)[0]) > 2)
    _shift_last_tensor(shard, 8)
    assert_bad(checkpoint, shard, "gap")


def test_a_missing_shard_is_named(checkpoint):
    shard = shards(checkpoint)[-1]
    shard.unlink()
    assert_bad(checkpoint, shard, "missing")


def test_a_tensor_missing_from_the_index_is_named(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, file = next(iter(index["weight_map"].items()))
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index, indent=2))
    stdout = assert_bad(checkpoint, checkpoint / file, name)
    assert "does not list" in stdout


def test_a_tensor_the_index_places_in_the_wrong_file_is_named(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = shards(checkpoint)[:2]
    name = next(n for n, f in index["weight_map"].items() if f == first.name)
    index["weight_map"][name] = second.name
    index_path.write_text(json.dumps(index, indent=2))
    assert_bad(checkpoint, second, name, "does not hold")


def test_a_tensor_in_two_shards_is_named_as_duplicated(checkpoint):
    first, second = shards(checkpoint)[:2]
    header, data = read_raw(second)
    extra = next(k for k in read_raw(first)[0] if k != "__metadata__")
    extra_info = read_raw(first)[0][extra]
    start, end = extra_info["data_offsets"]
    header[extra] = {**extra_info, "data_offsets": [len(data), len(data) + end - start]}
    write_raw(second, header, data + read_raw(first)[1][start:end])
    assert_bad(checkpoint, second, extra, "duplicated")


def test_a_wrong_total_size_is_named(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index, indent=2))
    assert_bad(checkpoint, index_path, "total_size")


def test_an_index_that_is_not_json_is_named(checkpoint):
    index_path = checkpoint / "model.safetensors.index.json"
    index_path.write_text('{"weight_map": ')
    assert_bad(checkpoint, index_path, "JSON")


def test_every_bad_file_is_named(checkpoint):
    first, second = shards(checkpoint)[:2]
    os.truncate(first, first.stat().st_size - 1)
    os.truncate(second, 4)
    stdout = assert_bad(checkpoint, first)
    assert str(second) in stdout


# --------------------------------------------------------------------------
# --against
# --------------------------------------------------------------------------


def test_against_the_source_passes_when_every_value_is_equal(converted):
    result = run_cli("verify", converted, "--against", converted.parent / "bin_folder")
    assert result.returncode == 0, result.stdout + result.stderr


def test_against_a_source_with_another_value_names_the_tensor(converted, model, tmp_path):
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    changed = "model.layers.1.mlp.up_proj.weight"
    state_dict[changed][3, 5] += 1
    other = tmp_path / "other.bin"
    torch.save(state_dict, other)
    result = run_cli("verify", converted, "--against", other)
    assert result.returncode == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and changed in bad[0] and "differs" in bad[0]


def test_against_a_source_with_another_tensor_names_it(converted, model, tmp_path):
    state_dict = dict(model.state_dict())
    state_dict["extra.weight"] = torch.zeros(3)
    other = tmp_path / "other.bin"
    torch.save(state_dict, other)
    result = run_cli("verify", converted, "--against", other)
    assert result.returncode == 1
    assert "'extra.weight' is missing" in result.stdout


def test_a_shard_the_index_does_not_name_is_noted_but_not_a_failure(checkpoint):
    # What a crash between an older save's files and the new index leaves:
    # loaders ignore the file, so the checkpoint is whole, but the user hears of it.
    stray = checkpoint / "model-00009-of-00009.safetensors"
    stray.write_bytes(shards(checkpoint)[0].read_bytes())
    result = run_cli("verify", checkpoint)
    assert result.returncode == 0, result.stdout
    assert any(line.startswith("note:") and stray.name in line for line in result.stdout.splitlines())


def test_a_broken_symbolic_link_in_a_folder_without_an_index_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").unlink()
    for shard in shards(checkpoint)[1:]:
        shard.unlink()
    link = checkpoint / "model-extra.safetensors"
    link.symlink_to(checkpoint / "gone.safetensors")
    assert_bad(checkpoint, link, "broken symbolic link")
