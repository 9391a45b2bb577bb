"""The rules a saved state dict follows are one, whichever way it is saved:
``convert`` (a torch.save file) and ``save_model_streaming`` (a state dict)
keep the same names of aliased tensors and cast the same tensors."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from trinity_stream_saver import save_model_streaming
from trinity_stream_saver.cli import main


def mixed_state_dict() -> dict:
    """Full-precision weights, float8 weights with their scale, an integer
    buffer, a tied pair and two slices of one fused matrix."""
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(6, 4, generator=generator)
    fused = torch.randn(8, 4, generator=generator)
    return {
        "embed.weight": embed,
        "head.weight": embed,  # tied: saved once
        "q.weight": fused[:4],  # slices of one storage: each saved
        "k.weight": fused[4:],
        "half.weight": torch.randn(3, generator=generator).to(torch.float16),
        "quantized.weight": torch.randn(5, generator=generator).to(torch.float8_e4m3fn),
        "quantized.scale": torch.ones(1),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def saved_both_ways(tmp_path, dtype: torch.dtype, spelling: str) -> tuple[dict, dict]:
    state = mixed_state_dict()
    torch.save(state, tmp_path / "model.bin")
    assert main(["convert", str(tmp_path / "model.bin"), str(tmp_path / "cli"), "--dtype",
                 spelling, "--no-progress"]) == 0
    save_model_streaming(state, tmp_path / "api", dtype=dtype)
    return (load_file(tmp_path / "cli" / "model.safetensors"),
            load_file(tmp_path / "api" / "model.safetensors"))


def test_convert_and_save_model_streaming_cast_the_same_tensors(tmp_path):
    cli, api = saved_both_ways(tmp_path, torch.bfloat16, "bf16")
    assert {name: t.dtype for name, t in api.items()} == {name: t.dtype for name, t in cli.items()}
    assert api["quantized.weight"].dtype == torch.float8_e4m3fn
    assert api["half.weight"].dtype == api["quantized.scale"].dtype == torch.bfloat16
    assert api["steps"].dtype == torch.int64 and api["mask"].dtype == torch.bool


def test_convert_and_save_model_streaming_keep_the_same_names_of_aliases(tmp_path):
    cli, api = saved_both_ways(tmp_path, torch.float32, "fp32")
    assert list(api) == list(cli)
    assert "head.weight" not in api and {"embed.weight", "q.weight", "k.weight"} <= api.keys()


def test_a_model_without_a_config_warns_once_that_no_config_json_is_written(tmp_path):
    from conftest import run_python

    result = run_python(
        "import sys, torch, warnings\n"
        "from trinity_stream_saver import save_model_streaming\n"
        "warnings.simplefilter('default')\n"
        "for i in range(2):\n"
        "    save_model_streaming(torch.nn.Linear(4, 4), f'{sys.argv[1]}/{i}')\n",
        str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("no config.json") == 1, result.stderr
    assert "Linear saved has no transformers config" in result.stderr
    assert sorted(os.listdir(tmp_path / "0")) == ["model.safetensors"]
