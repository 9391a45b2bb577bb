"""`convert SRC DST`: every source layout becomes a sharded safetensors
checkpoint that transformers loads with identical logits; the side files
come along; shared storage is written once; bad sources get clear errors
and leave nothing behind. Run in this interpreter (cli.main), and as a
user runs it, in a fresh one, for the progress bar and the console script."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_helpers import SIDE_FILES, make_source, run_cli, run_cli_subprocess, write_model_folder
from conftest import child_env, load_logits, logits, tiny_model

LAYOUTS = [
    "bin_file",
    "pt_file",
    "pth_file",
    "bin_folder",
    "sharded_bin_folder",
    "safetensors_file",
    "safetensors_folder",
]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                assert name not in found, f"{name} is stored twice"
                found[name] = handle.get_tensor(name)
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_source_layout_converts_and_loads_with_identical_logits(layout, model, tmp_path):
    source = make_source(layout, model, tmp_path / "src")
    destination = tmp_path / "out"
    result = run_cli("convert", source, destination, "--max-shard-size", "150KB")
    assert result.returncode == 0, result.stderr
    if not source.is_dir():
        write_model_folder(model, destination)  # a lone weight file brings no config
    assert (destination / "model.safetensors.index.json").exists()
    assert len(list(destination.glob("model-*-of-*.safetensors"))) > 1
    torch.testing.assert_close(load_logits(destination), logits(model), rtol=0, atol=0)


def test_a_single_shard_is_model_safetensors_without_index(model, tmp_path):
    source = make_source("bin_folder", model, tmp_path / "src")
    result = run_cli("convert", source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*")) == ["model.safetensors"]
    torch.testing.assert_close(load_logits(tmp_path / "out"), logits(model), rtol=0, atol=0)


def test_the_other_files_of_a_source_folder_come_along(model, tmp_path):
    source = make_source("sharded_bin_folder", model, tmp_path / "src")
    (source / "README.md").write_text("model card\n")
    destination = tmp_path / "out"
    assert run_cli("convert", source, destination).returncode == 0
    for name in ["config.json", "generation_config.json", "README.md", *SIDE_FILES]:
        assert (destination / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(destination.glob("*.bin")), "torch weight files must stay behind"
    assert not (destination / "pytorch_model.bin.index.json").exists()
    assert not list(destination.glob("*.tmp"))


def test_tensors_sharing_storage_are_written_once(tmp_path):
    tied = tiny_model(tied=True)
    state_dict = tied.state_dict()
    assert state_dict["lm_head.weight"].data_ptr() == state_dict["model.embed_tokens.weight"].data_ptr()
    source = make_source("bin_folder", tied, tmp_path / "src")
    destination = tmp_path / "out"
    result = run_cli("convert", source, destination)
    assert result.returncode == 0, result.stderr
    stored = stored_tensors(destination)
    # As save_pretrained does: the first name is kept, the alias dropped.
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    assert set(stored) == set(state_dict) - {"lm_head.weight"}
    assert "lm_head.weight" in result.stdout  # the user is told
    torch.testing.assert_close(load_logits(destination), logits(tied), rtol=0, atol=0)


def test_different_views_of_one_storage_are_each_written(tmp_path):
    fused = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    source = tmp_path / "fused.pt"
    torch.save({"q": fused[:2], "k": fused[2:], "all": fused, "again": fused}, source)
    assert run_cli("convert", source, tmp_path / "out").returncode == 0
    stored = stored_tensors(tmp_path / "out")
    assert sorted(stored) == ["all", "k", "q"]
    torch.testing.assert_close(stored["q"], fused[:2], rtol=0, atol=0)
    torch.testing.assert_close(stored["k"], fused[2:], rtol=0, atol=0)
    torch.testing.assert_close(stored["all"], fused, rtol=0, atol=0)


def test_dtype_casts_floating_tensors_and_keeps_the_others(tmp_path):
    source = tmp_path / "mixed.pt"
    tensors = {
        "weight": torch.randn(8, 8, dtype=torch.float32),
        "positions": torch.arange(8),
        "mask": torch.ones(8, dtype=torch.bool),
    }
    torch.save(tensors, source)
    result = run_cli("convert", source, tmp_path / "out", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "(200 bytes)" in result.stdout  # 64 BF16 + 8 int64 + 8 bool
    stored = stored_tensors(tmp_path / "out")
    assert stored["weight"].dtype == torch.bfloat16
    torch.testing.assert_close(stored["weight"], tensors["weight"].bfloat16(), rtol=0, atol=0)
    assert torch.equal(stored["positions"], tensors["positions"])
    assert torch.equal(stored["mask"], tensors["mask"])


def test_a_refused_pickle_gets_a_clear_message_and_leaves_nothing(tmp_path):
    source = tmp_path / "pickled.bin"
    torch.save({"weight": torch.ones(2), "optimizer": {"step": slice(1, 2)}}, source)
    destination = tmp_path / "out"
    result = run_cli("convert", source, destination)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(source) in result.stderr
    assert "weights_only" in result.stderr and "trust" in result.stderr
    assert not destination.exists()


def test_a_legacy_torch_save_file_gets_a_clear_message(tmp_path):
    source = tmp_path / "legacy.bin"
    torch.save({"weight": torch.ones(2)}, source, _use_new_zipfile_serialization=False)
    result = run_cli("convert", source, tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(source) in result.stderr and "Re-save" in result.stderr


def test_converting_into_the_source_folder_is_refused(model, tmp_path):
    source = make_source("safetensors_folder", model, tmp_path / "src")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    result = run_cli("convert", source, source)
    assert result.returncode == 1
    assert "source" in result.stderr
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.slow
def test_the_progress_bar_counts_bytes(model, tmp_path):
    source = make_source("bin_folder", model, tmp_path / "src")
    result = run_cli_subprocess("convert", source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    # stderr is a pipe, as in a training log: progress lines, not a bar
    # redrawn with carriage returns; the last one says 100%.
    assert any("(100%) in" in line for line in result.stderr.splitlines()), result.stderr
    assert "\r" not in result.stderr


def test_no_progress_prints_no_bar(model, tmp_path):
    source = make_source("bin_folder", model, tmp_path / "src")
    result = run_cli("convert", source, tmp_path / "out", "--no-progress")
    assert result.returncode == 0
    assert "%" not in result.stderr


@pytest.mark.slow
def test_the_console_script_converts(model, tmp_path):
    script = shutil.which("trinity-stream-saver", path=os.path.dirname(sys.executable))
    assert script is not None, "pip install the package: it provides the trinity-stream-saver script"
    source = make_source("bin_folder", model, tmp_path / "src")
    import subprocess

    result = subprocess.run(
        [script, "convert", str(source), str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(load_logits(tmp_path / "out"), logits(model), rtol=0, atol=0)


def test_a_converted_index_lists_every_tensor_with_its_total_size(model, tmp_path):
    source = make_source("bin_file", model, tmp_path / "src")
    assert run_cli("convert", source, tmp_path / "out", "--max-shard-size", "100000").returncode == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    state_dict = model.state_dict()
    assert set(index["weight_map"]) == set(state_dict)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state_dict.values()
    )


def test_a_conversion_that_fails_after_copying_side_files_leaves_the_destination_as_it_was(
    model, tmp_path, monkeypatch
):
    from trinity_stream_saver.cli import convert as convert_module

    source = make_source("bin_folder", model, tmp_path)
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text('{"old": true}\n')
    before = {path.name: path.read_bytes() for path in destination.iterdir()}

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "save_sharded_streaming", failing_save)
    with pytest.raises(OSError, match="No space left"):
        convert_module.convert(str(source), str(destination), progress=False)
    assert {path.name: path.read_bytes() for path in destination.iterdir()} == before


def test_a_side_file_that_cannot_be_copied_leaves_the_destination_as_it_was(
    model, tmp_path, monkeypatch
):
    from trinity_stream_saver.cli import convert as convert_module

    source = make_source("bin_folder", model, tmp_path)
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "model.safetensors").write_bytes(b"an older checkpoint")
    before = {path.name: path.read_bytes() for path in destination.iterdir()}
    copies = []

    def failing_copy(source_file, target_file):
        copies.append(target_file.name)
        if len(copies) == 2:
            raise OSError(5, "Input/output error")
        target_file.write(source_file.read())

    monkeypatch.setattr(convert_module.shutil, "copyfileobj", failing_copy)
    with pytest.raises(OSError, match="Input/output error"):
        convert_module.convert(str(source), str(destination), progress=False)
    assert len(copies) == 2
    assert {path.name: path.read_bytes() for path in destination.iterdir()} == before


@pytest.mark.slow
def test_convert_and_verify_work_with_the_oldest_safetensors_of_the_cli_extra(tmp_path):
    """The cli extra's floor (safetensors>=0.4), installed beside the
    package from the package index into a folder of its own."""
    import subprocess
    import sys

    from trinity_stream_saver.cli.checkpoint import OLDEST_SAFETENSORS

    oldest = ".".join(map(str, OLDEST_SAFETENSORS)) + ".0"
    target = tmp_path / "site"
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), f"safetensors=={oldest}"], capture_output=True, text=True,
        timeout=300)
    if fetched.returncode != 0:
        pytest.skip(f"safetensors {oldest} could not be installed from the package index: "
                    f"{fetched.stderr.strip()[-300:]}")
    torch.manual_seed(0)
    from safetensors.torch import save_file

    (tmp_path / "src").mkdir()
    save_file({"a": torch.randn(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)},
              str(tmp_path / "src" / "model.safetensors"))
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])  # the old one first
    code = ("import safetensors, sys\n"
            "from trinity_stream_saver.cli import main\n"
            "print(safetensors.__version__)\n"
            "sys.exit(main(sys.argv[1:2] + ['--no-progress'] + sys.argv[2:4]) or "
            "main(['verify', sys.argv[3], '--against', sys.argv[2]]))\n")
    result = subprocess.run([sys.executable, "-c", code, "convert", str(tmp_path / "src"),
                             str(tmp_path / "out"), ], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == oldest
    assert "values equal to" in result.stdout
