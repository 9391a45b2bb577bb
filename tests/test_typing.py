"""The package is typed (PEP 561): py.typed and the compiled core's _C.pyi
ship, the public modules pass mypy --strict, and so does a user script
that calls every public function against the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import trinity_stream_saver

pytest.importorskip("mypy", reason="the typing tests need mypy (requirements-dev.txt)")

INSTALLED = os.path.dirname(trinity_stream_saver.__file__)

#: The modules that define the public names (and what they import is
#: followed, silently, for the types it gives them).
PUBLIC_MODULES = [
    "trinity_stream_saver", "trinity_stream_saver._extension", "trinity_stream_saver._meta",
    "trinity_stream_saver._single_file", "trinity_stream_saver._sharded",
    "trinity_stream_saver._async_save", "trinity_stream_saver.distributed",
    "trinity_stream_saver.distributed.save", "trinity_stream_saver.distributed.phases",
    "trinity_stream_saver.distributed.storage",
]

USER_SCRIPT = '''
import concurrent.futures
import os
from pathlib import Path

import torch

from trinity_stream_saver import (
    AsyncSave, DTYPE_TO_SAFETENSORS, DistributedSaveError, ShardPlan, StateDictMeta, TensorMeta,
    collect_state_dict_meta, finalize, finalize_async, plan_shards, save_model_streaming,
    save_model_streaming_async, save_safetensors_streaming, save_sharded_streaming,
)


def main(folder: Path) -> None:
    model = torch.nn.Linear(4, 4)
    items = list(model.state_dict().items())
    meta: StateDictMeta = collect_state_dict_meta(items)
    rows = [TensorMeta(row.name, row.dtype, row.shape) for row in meta]
    as_tuples = [(name, torch.float32, [4, 4]) for name, _ in items[:1]]
    path: str = save_safetensors_streaming(iter(items), folder / "a.safetensors", meta)
    temp: str = save_safetensors_streaming(iter(items), str(folder / "b.safetensors"), rows,
                                           rename=False, metadata={"step": "1"})
    done: concurrent.futures.Future[str] = finalize_async(temp, folder / "b.safetensors")
    final: str = done.result()
    again: str = finalize(temp, final) if os.path.exists(temp) else final
    plan: ShardPlan = plan_shards(as_tuples, max_shard_size="1KB")
    index: str = save_sharded_streaming(iter(items[:1]), folder / "s", as_tuples,
                                        max_shard_size=plan.metadata["total_size"])
    whole: str = save_model_streaming(model, folder / "m", dtype=torch.bfloat16)
    future: AsyncSave = save_model_streaming_async(model, os.fspath(folder / "n"),
                                                   max_staging_bytes=1 << 20)
    snapshot: bool = future.wait_for_snapshot(10.0)
    written: str = future.result()
    names: dict[torch.dtype, str] = DTYPE_TO_SAFETENSORS
    try:
        save_model_streaming({"w": torch.ones(2)}, folder / "d", process_group=None)
    except DistributedSaveError as error:
        failures: dict[int, str] = error.failures
    print(path, again, index, whole, snapshot, written, len(names))


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]))
'''


def run_mypy(*arguments: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           *arguments], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_the_installed_package_ships_its_type_information():
    assert os.path.isfile(os.path.join(INSTALLED, "py.typed"))
    assert os.path.isfile(os.path.join(INSTALLED, "_C.pyi"))


@pytest.mark.slow
def test_the_public_modules_pass_mypy_strict(tmp_path):
    # The installed modules, by name (from a folder of its own, so that
    # the source tree is not what mypy finds).
    modules = [argument for module in PUBLIC_MODULES for argument in ("-m", module)]
    result = run_mypy("--follow-imports=silent", *modules, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_user_script_calling_every_public_function_passes_mypy_strict(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    # From a folder of its own, so that mypy finds the installed package.
    result = run_mypy(str(script), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # The script itself runs, so that what it type-checks is real use.
    (tmp_path / "out").mkdir()
    ran = subprocess.run([sys.executable, str(script), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
