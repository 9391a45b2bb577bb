"""`inspect PATH [--json]`: every tensor with dtype, shape, bytes and file,
the totals and the metadata, for files and folders of either format; and
the command line's usage errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import make_source, run_cli, run_cli_subprocess
from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def expected_rows(state_dict) -> dict[str, tuple]:
    return {
        name: (str(tuple(t.shape)), t.numel() * t.element_size())
        for name, t in state_dict.items()
    }


@pytest.mark.parametrize("layout", ["safetensors_folder", "sharded_bin_folder", "bin_file"])
def test_inspect_json_lists_every_tensor_and_the_totals(layout, model, tmp_path):
    source = make_source(layout, model, tmp_path)
    result = run_cli("inspect", source, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    state_dict = model.state_dict()
    rows = {t["name"]: t for t in report["tensors"]}
    assert set(rows) == set(state_dict)
    for name, tensor in state_dict.items():
        assert rows[name]["dtype"] == "F32"
        assert rows[name]["shape"] == list(tensor.shape)
        assert rows[name]["bytes"] == tensor.numel() * tensor.element_size()
    files = {t["file"] for t in report["tensors"]}
    assert report["totals"] == {
        "tensors": len(state_dict),
        "parameters": sum(t.numel() for t in state_dict.values()),
        "bytes": sum(t.numel() * t.element_size() for t in state_dict.values()),
        "files": len(files),
    }


def test_inspect_names_the_file_of_each_tensor_of_a_sharded_checkpoint(model, tmp_path):
    source = make_source("safetensors_folder", model, tmp_path)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    report = json.loads(run_cli("inspect", source, "--json").stdout)
    assert {t["name"]: t["file"] for t in report["tensors"]} == weight_map
    assert report["index_metadata"]["total_size"] == report["totals"]["bytes"]


def test_inspect_shows_the_files_metadata(tmp_path):
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.zeros(2, 3, dtype=torch.bfloat16)}, path, metadata={"format": "pt", "step": "7"})
    report = json.loads(run_cli("inspect", path, "--json").stdout)
    assert report["metadata"] == {"one.safetensors": {"format": "pt", "step": "7"}}
    assert report["tensors"] == [
        {"name": "w", "dtype": "BF16", "shape": [2, 3], "bytes": 12, "file": "one.safetensors"}
    ]
    table = run_cli("inspect", path).stdout
    assert '"step": "7"' in table


def test_inspect_table_has_a_row_per_tensor_and_a_totals_line(model, tmp_path):
    source = make_source("safetensors_folder", model, tmp_path)
    result = run_cli("inspect", source)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "bytes", "file"]
    state_dict = model.state_dict()
    for name, tensor in state_dict.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{tensor.numel() * tensor.element_size():,}" in row
        assert "F32" in row and "model-0000" in row
    total = sum(t.numel() for t in state_dict.values())
    assert any(f"{len(state_dict)} tensors, {total:,} parameters" in line for line in lines)


def test_inspect_lists_tensors_sharing_storage_once(tmp_path):
    weight = torch.ones(4, 4)
    path = tmp_path / "tied.pt"
    torch.save({"embed": weight, "head": weight}, path)
    report = json.loads(run_cli("inspect", path, "--json").stdout)
    assert [t["name"] for t in report["tensors"]] == ["embed"]
    assert report["shared"] == {"head": "embed"}


@pytest.mark.slow
def test_inspect_of_a_missing_path_is_an_error_naming_it(tmp_path):
    result = run_cli_subprocess("inspect", tmp_path / "nowhere")
    assert result.returncode == 1
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["verify"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage:")
    assert (command[0] if command else "convert") in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["unpack", "x"],
        ["convert", "only-source"],
        ["convert", "a", "b", "--dtype", "int3"],
        ["convert", "a", "b", "--max-shard-size", "5 parsecs"],
        ["inspect"],
        ["inspect", "x", "--yaml"],
        ["verify", "x", "--against"],
    ],
)
def test_bad_arguments_get_a_usage_error(arguments):
    result = run_cli(*arguments)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_of_a_damaged_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64)}, path)
    os.truncate(path, path.stat().st_size - 1)
    result = run_cli("inspect", path)
    assert result.returncode == 1
    assert str(path) in result.stderr and "cut short" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_names_the_package_and_its_torch():
    from cli_helpers import run_cli_subprocess

    result = run_cli_subprocess("--version")
    assert result.returncode == 0, result.stderr
    import torch
    from importlib import metadata

    assert result.stdout.strip() == (f"python -m trinity_stream_saver "
                                     f"{metadata.version('trinity_stream_saver')} (torch {torch.__version__})")
