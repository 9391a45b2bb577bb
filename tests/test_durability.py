"""fsync=True, finalize and finalize_async: a save that returned survives a
power cut when asked to. A power cut cannot be staged here, so the tests
check what makes it survive: the order of the system calls (data synced
before the rename, the directory synced after it), traced with strace."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PREEXISTING, assert_nothing_lost, child_env, meta_for, read_bytes
from trinity_stream_saver import finalize, finalize_async, save_safetensors_streaming

ITEMS = [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(4, dtype=torch.bfloat16))]


def saved_correctly(path) -> bool:
    loaded = load_file(path)
    return loaded.keys() == {"a", "b"} and all(torch.equal(loaded[k], v) for k, v in ITEMS)


def test_fsync_save_replaces_the_destination_with_a_complete_file(existing_dest):
    assert save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), fsync=True) == existing_dest
    assert saved_correctly(existing_dest)
    assert not os.path.exists(existing_dest + ".tmp")


def test_fsync_is_off_by_default_and_files_are_identical_either_way(tmp_path):
    plain = save_safetensors_streaming(iter(ITEMS), tmp_path / "plain", meta_for(ITEMS))
    synced = save_safetensors_streaming(iter(ITEMS), tmp_path / "synced", meta_for(ITEMS), fsync=True)
    assert read_bytes(plain) == read_bytes(synced)


def test_finalize_renames_a_rename_false_save_into_place(existing_dest):
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    assert read_bytes(existing_dest) == PREEXISTING
    assert finalize(temp, existing_dest) == existing_dest
    assert saved_correctly(existing_dest)
    assert not os.path.exists(temp)


def test_finalize_accepts_path_objects_and_fsync_false(tmp_path):
    temp = save_safetensors_streaming(iter(ITEMS), tmp_path / "f", meta_for(ITEMS), rename=False)
    assert finalize(tmp_path / "f.tmp", tmp_path / "f", fsync=False) == str(tmp_path / "f")
    assert saved_correctly(tmp_path / "f")
    assert not os.path.exists(temp)


def test_finalize_of_a_missing_temp_file_is_file_not_found_naming_it(existing_dest):
    with pytest.raises(FileNotFoundError) as raised:
        finalize(existing_dest + ".tmp", existing_dest)
    assert raised.value.filename == existing_dest + ".tmp"
    assert read_bytes(existing_dest) == PREEXISTING


def test_finalize_that_cannot_rename_leaves_the_temp_file_in_place(tmp_path):
    temp = save_safetensors_streaming(iter(ITEMS), tmp_path / "f", meta_for(ITEMS), rename=False)
    target = tmp_path / "missing" / "f"
    with pytest.raises(FileNotFoundError) as raised:
        finalize(temp, target)
    assert raised.value.filename == str(target)
    assert saved_correctly(temp)


def test_finalize_async_returns_a_future_of_the_final_path(existing_dest):
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    future = finalize_async(temp, existing_dest)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=60) == existing_dest
    assert saved_correctly(existing_dest)
    assert not os.path.exists(temp)


def test_finalize_async_reports_errors_through_the_future_and_keeps_the_temp_file(tmp_path):
    temp = save_safetensors_streaming(iter(ITEMS), tmp_path / "f", meta_for(ITEMS), rename=False)
    future = finalize_async(temp, tmp_path / "missing" / "f")
    with pytest.raises(FileNotFoundError):
        future.result(timeout=60)
    assert saved_correctly(temp)


def test_finalize_async_runs_requests_in_order(tmp_path):
    futures = []
    for i in range(5):
        items = [("a", torch.full((2, 3), float(i))), ("b", torch.ones(4, dtype=torch.bfloat16))]
        temp = save_safetensors_streaming(iter(items), tmp_path / f"f{i}", meta_for(items), rename=False)
        futures.append(finalize_async(temp, tmp_path / "final"))
    assert [f.result(timeout=60) for f in futures] == [str(tmp_path / "final")] * 5
    assert torch.equal(load_file(tmp_path / "final")["a"], torch.full((2, 3), 4.0))


def test_a_failed_fsync_save_loses_nothing(existing_dest):
    def failing():
        yield ITEMS[0]
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        save_safetensors_streaming(failing(), existing_dest, meta_for(ITEMS), fsync=True)
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# the order of the system calls
# --------------------------------------------------------------------------

_TRACED = r"""
import sys, torch
from trinity_stream_saver import save_safetensors_streaming, finalize
mode, path = sys.argv[1], sys.argv[2]
items = [("a", torch.ones(1024))]
meta = [("a", "F32", [1024])]
if mode == "save":
    save_safetensors_streaming(iter(items), path, meta, fsync=True)
elif mode == "save_no_fsync":
    save_safetensors_streaming(iter(items), path, meta)
else:
    temp = save_safetensors_streaming(iter(items), path, meta, rename=False)
    finalize(temp, path)
"""


def traced_calls(tmp_path, mode: str) -> list[str]:
    """The sync and rename system calls a save makes, in order, with each
    descriptor replaced by the path it was opened for."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    path = str(tmp_path / "model.safetensors")
    log = tmp_path / "strace.log"
    # --seccomp-bpf stops the child only at the traced calls: without it,
    # every system call of `import torch` (tens of thousands) is a round
    # trip through strace.
    result = subprocess.run(
        ["strace", "-f", "--seccomp-bpf", "-y", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         "-o", str(log), sys.executable, "-c", _TRACED, mode, path],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    calls = []
    for line in log.read_text().splitlines():
        match = re.search(r"\b(fsync|fdatasync|rename\w*)\((.*)\)\s*=\s*0", line)
        if match and str(tmp_path) in match.group(2):
            target = "directory" if re.search(re.escape(str(tmp_path)) + r">", match.group(2)) else (
                "temp" if ".tmp" in match.group(2) else "other")
            calls.append(f"{'rename' if match.group(1).startswith('rename') else 'sync'} {target}")
    return calls


@pytest.mark.slow
def test_fsync_save_syncs_data_before_the_rename_and_the_directory_after(tmp_path):
    assert traced_calls(tmp_path, "save") == ["sync temp", "rename temp", "sync directory"]


@pytest.mark.slow
def test_finalize_syncs_data_before_the_rename_and_the_directory_after(tmp_path):
    assert traced_calls(tmp_path, "finalize") == ["sync temp", "rename temp", "sync directory"]


@pytest.mark.slow
def test_a_save_without_fsync_makes_no_sync_calls(tmp_path):
    assert traced_calls(tmp_path, "save_no_fsync") == ["rename temp"]
