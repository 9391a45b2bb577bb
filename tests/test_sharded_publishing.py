"""How a sharded save publishes into a folder that holds another checkpoint
or another save: the folder lock, the order of the renames and removals
under SIGKILL (strace kills the save at its Nth unlink), the index written
before any shard is renamed, and what the clean-up never removes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import child_env
from trinity_stream_saver import _C, save_model_streaming, save_sharded_streaming

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# Saves `count` tensors of 64 floats (256 bytes), whose values carry `tag`,
# into FOLDER: one shard per tensor with max_shard_size 300, one file with
# "1GB". With a GO file, waits for it after the first tensor, so that the
# parent can act while the save is running.
_SAVE = r"""
import errno, json, os, sys, time, torch
from trinity_stream_saver import save_sharded_streaming
folder, count, tag, max_shard_size, go = sys.argv[1:6]
count, tag = int(count), int(tag)

def tensors():
    for i in range(count):
        yield f"t{i:03d}", torch.full((64,), float(tag * 1000 + i))
        if go != "-" and i == 0:
            print("started", flush=True)
            while not os.path.exists(go):
                time.sleep(0.02)

meta = [(f"t{i:03d}", "F32", [64]) for i in range(count)]
try:
    save_sharded_streaming(tensors(), folder, meta, max_shard_size=int(max_shard_size))
    print(json.dumps({"errno": None}), flush=True)
except OSError as error:
    print(json.dumps({"errno": error.errno, "message": str(error)}), flush=True)
"""

SHARDED, ONE_FILE = 300, 10**9


def save_command(folder: Path, count: int, tag: int, max_shard_size: int, go: str = "-") -> list[str]:
    return [sys.executable, "-c", _SAVE, str(folder), str(count), str(tag), str(max_shard_size), go]


def save(folder: Path, count: int, tag: int, max_shard_size: int) -> None:
    save_sharded_streaming(
        ((f"t{i:03d}", torch.full((64,), float(tag * 1000 + i))) for i in range(count)),
        folder,
        [(f"t{i:03d}", "F32", [64]) for i in range(count)],
        max_shard_size=max_shard_size,
    )


def strace_or_skip() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    return strace


def run_under_strace(inject: str, command: list[str], **popen) -> subprocess.Popen:
    # The injection counts unlinks of every thread (-f). Not --seccomp-bpf,
    # which would spare importing torch the stops at every system call:
    # strace 6.1 injects nothing with it.
    return subprocess.Popen(
        [strace_or_skip(), "-f", "-qq", "-o", os.devnull, "-e", "trace=unlink",
         "-e", f"inject=unlink:{inject}", *command],
        env=child_env(), text=True, **popen)


def loader_view(folder: Path, both_allowed: bool = False) -> dict[str, float]:
    """What a loader finds, as transformers looks: model.safetensors first,
    else the index and every file it names. Fails the test if an index names
    a file that is not there, or (unless `both_allowed`: a save to one file
    killed before it removed the older index) if the folder holds both."""
    single, index = folder / SINGLE, folder / INDEX
    assert both_allowed or not (single.exists() and index.exists()), (
        f"{folder} holds both {SINGLE} and {INDEX}: loaders take the single file, "
        f"whatever the index says ({sorted(p.name for p in folder.iterdir())})")
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
    missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
    assert not missing, f"{INDEX} names files that are gone: {missing}"
    if single.exists():
        return {name: t[0].item() for name, t in load_file(single).items()}
    found: dict[str, float] = {}
    for name in sorted(set(weight_map.values())):
        found.update({n: t[0].item() for n, t in load_file(folder / name).items()})
    assert set(found) == set(weight_map)
    return found


def checkpoint_of(tag: int, count: int) -> dict[str, float]:
    return {f"t{i:03d}": float(tag * 1000 + i) for i in range(count)}


# --------------------------------------------------------------------------
# the folder lock
# --------------------------------------------------------------------------


def wait_for_line(process: subprocess.Popen, expected: str) -> None:
    line = process.stdout.readline().strip()
    assert line == expected, (line, process.stderr.read() if process.poll() is not None else "")


def test_a_second_sharded_save_into_a_folder_being_saved_fails_at_once_with_ebusy(tmp_path):
    folder, go = tmp_path / "ckpt", tmp_path / "go"
    first = subprocess.Popen(save_command(folder, 20, 1, SHARDED, str(go)), env=child_env(),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(first, "started")
        # Other file names (30 shards, not 20): only a folder lock meets them.
        second = subprocess.run(save_command(folder, 30, 2, SHARDED), env=child_env(),
                                capture_output=True, text=True, timeout=120)
    finally:
        go.touch()
        out, err = first.communicate(timeout=120)
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report["errno"] == 16, report  # EBUSY
    assert "another sharded save into this folder" in report["message"]
    assert json.loads(out.strip().splitlines()[-1])["errno"] is None, err
    assert loader_view(folder) == checkpoint_of(1, 20)
    assert not any("of-00030" in p.name for p in folder.iterdir())


_WAIT_THEN_SAVE = _SAVE.replace(
    "try:\n", "print('ready', flush=True)\nwhile not os.path.exists(sys.argv[6]):\n"
    "    time.sleep(0.02)\ntry:\n")


def test_the_folder_stays_locked_through_the_clean_up_of_an_older_checkpoint(tmp_path):
    folder, go = tmp_path / "ckpt", tmp_path / "go"
    save(folder, 30, 0, SHARDED)
    # Ready before the first save reaches its clean-up: torch is imported.
    second = subprocess.Popen(
        [sys.executable, "-c", _WAIT_THEN_SAVE, *save_command(folder, 30, 2, SHARDED)[3:], str(go)],
        env=child_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(second, "ready")
    # The first save re-saves the folder as 20 shards and is held for 10 s
    # at its first unlink, the removal of an older shard after its index.
    first = run_under_strace("delay_enter=10000000:when=1", save_command(folder, 20, 1, SHARDED, "-"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (folder / INDEX).exists() or "of-00020" not in (folder / INDEX).read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        go.touch()
        out, err = second.communicate(timeout=120)
        assert first.poll() is None, "the first save ended before the second one was tried"
    finally:
        go.touch()
        first_out, first_err = first.communicate(timeout=120)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errno"] == 16, report
    assert json.loads(first_out.strip().splitlines()[-1])["errno"] is None, first_err
    assert loader_view(folder) == checkpoint_of(1, 20)


def test_the_folder_lock_is_released_after_a_save_and_after_a_failed_one(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, 3, 0, SHARDED)
    with pytest.raises(ValueError, match="ended without yielding"):
        save_sharded_streaming(iter([]), folder, [("t000", "F32", [64])])
    save(folder, 2, 1, SHARDED)
    assert loader_view(folder) == checkpoint_of(1, 2)


def test_a_model_save_into_a_folder_another_save_holds_fails_with_ebusy_and_leaves_it_as_it_was(
        tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, 3, 0, SHARDED)
    before, names = loader_view(folder), sorted(os.listdir(folder))
    # What a sharded save in another process holds for its whole save.
    held = _C.CheckpointFolderLock(os.fsencode(folder))
    try:
        with pytest.raises(OSError) as caught:
            save_model_streaming({"w": torch.ones(64)}, folder, max_shard_size=300)
        assert caught.value.errno == errno.EBUSY, caught.value
    finally:
        held.release()
    assert loader_view(folder) == before
    assert sorted(os.listdir(folder)) == names  # no temporary file left
    save_model_streaming({"w": torch.ones(64)}, folder, max_shard_size=300)  # released after


# --------------------------------------------------------------------------
# killed during the publishing: a loader never finds a stale or broken
# checkpoint
# --------------------------------------------------------------------------


def save_killed_at_unlink(folder: Path, count: int, max_shard_size: int, unlink: int) -> None:
    process = run_under_strace(f"signal=SIGKILL:when={unlink}",
                               save_command(folder, count, 1, max_shard_size),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=180)
    assert process.returncode != 0 and '"errno": null' not in out, (
        f"the save was not killed at unlink {unlink}: {out} {err[-2000:]}")


@pytest.mark.parametrize("unlink", [1, 5, 30])
def test_a_save_from_shards_to_one_file_killed_in_its_clean_up_leaves_no_broken_index(tmp_path, unlink):
    folder = tmp_path / "ckpt"
    save(folder, 30, 0, SHARDED)
    save_killed_at_unlink(folder, 30, ONE_FILE, unlink)
    # The new single file is in place (the loaders' first choice), and no
    # index survives the shards it names.
    assert loader_view(folder, both_allowed=True) == checkpoint_of(1, 30)


def test_a_save_from_one_file_to_shards_killed_at_the_removal_of_the_old_file_leaves_no_stale_first_choice(
    tmp_path,
):
    folder = tmp_path / "ckpt"
    save(folder, 30, 0, ONE_FILE)
    save_killed_at_unlink(folder, 30, SHARDED, 1)
    # Either the old checkpoint as it was (the index was not published yet)
    # or the new one, never the old single file beside the new index.
    assert loader_view(folder) in (checkpoint_of(0, 30), checkpoint_of(1, 30))


def test_a_save_from_one_file_to_shards_removes_the_old_file_before_publishing_the_index(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, 4, 0, ONE_FILE)
    save(folder, 4, 1, SHARDED)
    assert not (folder / SINGLE).exists()
    assert loader_view(folder) == checkpoint_of(1, 4)


# --------------------------------------------------------------------------
# the index before the shards
# --------------------------------------------------------------------------


def test_a_directory_at_the_index_path_fails_the_save_before_any_shard_is_renamed(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, 4, 0, ONE_FILE)
    (folder / INDEX).mkdir()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(IsADirectoryError) as raised:
        save(folder, 4, 1, SHARDED)
    assert raised.value.filename == str(folder / INDEX)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert {n: t[0].item() for n, t in load_file(folder / SINGLE).items()} == checkpoint_of(0, 4)


# --------------------------------------------------------------------------
# what the clean-up never removes
# --------------------------------------------------------------------------


def test_a_folder_named_like_a_shard_is_left_alone_and_the_save_succeeds(tmp_path):
    folder = tmp_path / "ckpt"
    users = folder / "model-00001-of-00007.safetensors"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    save(folder, 3, 1, SHARDED)
    assert (users / "notes.txt").read_text() == "mine"
    assert loader_view(folder) == checkpoint_of(1, 3)


def test_names_no_save_writes_are_not_removed(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    kept = ["model-00001-of-00002.safetensors.index.json", "model.safetensors.tmp.index.json"]
    for name in kept:
        (folder / name).write_text("{}")
    save(folder, 3, 1, SHARDED)
    for name in kept:
        assert (folder / name).read_text() == "{}"


# --------------------------------------------------------------------------
# empty state dicts and refused patterns
# --------------------------------------------------------------------------


def test_an_empty_state_dict_saves_one_loadable_file_without_tensors(tmp_path):
    written = save_sharded_streaming(iter([]), tmp_path / "ckpt", [])
    assert written == str(tmp_path / "ckpt" / SINGLE)
    assert load_file(written) == {}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [SINGLE]


@pytest.mark.parametrize(
    "pattern, says",
    [
        ("model{suffix}.safetensors.index.json", "'.index.json'"),
        ("model.safetensors.index.json{suffix}", "'.index.json'"),
        ("model{suffix}.safetensors.tmp", "'.tmp'"),
        (".{suffix}.", "names a folder"),
        ("model\udc80{suffix}.safetensors", "UTF-8"),
    ],
)
def test_a_filename_pattern_that_could_overwrite_an_index_a_temp_file_or_a_folder_is_refused(
    tmp_path, pattern, says
):
    folder = tmp_path / "ckpt"
    save(folder, 3, 0, SHARDED)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="filename_pattern") as raised:
        save_sharded_streaming(iter([("t000", torch.ones(64))]), folder, [("t000", "F32", [64])],
                               filename_pattern=pattern)
    assert says in str(raised.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_dangling_symlink_as_save_directory_is_an_error_naming_the_link(tmp_path):
    link = tmp_path / "ckpt"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as raised:
        save(link, 3, 0, SHARDED)
    assert raised.value.filename == str(link)


def test_empty_tensors_are_planned_in_yield_order_where_the_hub_groups_them_as_the_readme_says():
    from huggingface_hub import split_torch_state_dict_into_shards

    from trinity_stream_saver import collect_state_dict_meta, plan_shards

    state_dict = {"a": torch.zeros(0), "b": torch.ones(100), "c": torch.ones(100), "d": torch.zeros(0, 3)}
    hub = split_torch_state_dict_into_shards(state_dict, max_shard_size=500).tensor_to_filename
    ours = plan_shards(collect_state_dict_meta(state_dict.items()), 500).tensor_to_filename
    # The hub takes all empty tensors for one storage and puts "d" with "a".
    assert hub["d"] == hub["a"] != ours["d"] == ours["c"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "zero-size tensors" in readme and "can differ from `save_pretrained`'s" in readme
