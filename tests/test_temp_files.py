"""The temporary file (``filepath + ".tmp"``) and the destination cannot be
turned against the user: nothing is written through a link, two saves to
one path never write into one file, ``finalize`` never puts an incomplete
file in place, and a destination that is not a file is refused. Each of the
three ways to lose data (a link at the temp path, two saves to one path,
finalize of a cut file) is a test here."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    PREEXISTING,
    SAFETENSORS_TO_TORCH,
    child_env,
    make_tensor,
    meta_for,
    read_bytes,
    run_python,
)
from trinity_stream_saver import _C, finalize, finalize_async, save_safetensors_streaming

ITEMS = [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(4, dtype=torch.bfloat16))]


def saved_correctly(path, items=ITEMS) -> bool:
    loaded = load_file(path)
    return loaded.keys() == {name for name, _ in items} and all(
        torch.equal(loaded[name], tensor) for name, tensor in items
    )


class PausedSave:
    """A save on a thread that yields its first tensor, then waits, inside
    the library with its temporary file open, until released."""

    def __init__(self, path, items=ITEMS, **options):
        self.inside = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.result = None

        def generate():
            yield items[0]
            self.inside.set()
            assert self.release.wait(timeout=60), "the paused save was never released"
            yield from items[1:]

        def run():
            try:
                self.result = save_safetensors_streaming(generate(), path, meta_for(items), **options)
            except BaseException as error:  # noqa: BLE001 - checked by the test
                self.error = error

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.inside.wait(timeout=60), "the paused save never started"

    def finish(self):
        self.release.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


# --------------------------------------------------------------------------
# a symbolic link at <path>.tmp
# --------------------------------------------------------------------------


def test_a_symlink_at_the_temp_path_is_replaced_never_written_through(existing_dest, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"someone's notes")
    os.symlink(victim, existing_dest + ".tmp")
    save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS))
    assert victim.read_bytes() == b"someone's notes"
    assert stat.S_ISREG(os.lstat(existing_dest).st_mode), "the destination became a link"
    assert saved_correctly(existing_dest)
    assert not os.path.lexists(existing_dest + ".tmp")


def test_a_dangling_symlink_at_the_temp_path_creates_nothing_at_its_target(dest, tmp_path):
    target = tmp_path / "elsewhere"
    os.symlink(target, dest + ".tmp")
    temp = save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS), rename=False)
    assert not os.path.lexists(target)
    assert stat.S_ISREG(os.lstat(temp).st_mode)


# --------------------------------------------------------------------------
# two saves to the same path at once
# --------------------------------------------------------------------------


def test_a_second_save_to_a_path_being_saved_fails_fast_and_the_first_succeeds(existing_dest):
    first = PausedSave(existing_dest)
    other = [("a", torch.zeros(2, 3)), ("b", torch.zeros(4, dtype=torch.bfloat16))]
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter(other), existing_dest, meta_for(other))
    assert raised.value.errno == errno.EBUSY
    assert raised.value.filename == existing_dest + ".tmp"
    assert "another save" in str(raised.value)
    assert read_bytes(existing_dest) == PREEXISTING
    assert first.finish() == existing_dest
    assert saved_correctly(existing_dest)
    assert not os.path.lexists(existing_dest + ".tmp")


def test_saves_racing_for_one_path_leave_the_data_of_one_that_succeeded(dest):
    threads = 6
    contents = [[("w", torch.full((1 << 16,), float(i)))] for i in range(threads)]
    succeeded, refused, other = [], [], []
    start = threading.Barrier(threads)

    def save(i):
        start.wait()
        try:
            save_safetensors_streaming(iter(contents[i]), dest, meta_for(contents[i]))
            succeeded.append(i)
        except OSError as error:
            (refused if error.errno == errno.EBUSY else other).append(error)

    workers = [threading.Thread(target=save, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert other == [] and len(succeeded) + len(refused) == threads
    assert succeeded, "no save succeeded"
    assert any(saved_correctly(dest, contents[i]) for i in succeeded), "the file is no successful save's"
    assert not os.path.lexists(dest + ".tmp")


# A save in another process that stops inside the library until its stdin closes.
HOLDING_CHILD = r"""
import sys, torch
from trinity_stream_saver import save_safetensors_streaming
path = sys.argv[1]
def generate():
    yield ("a", torch.zeros(4))
    print("inside", flush=True)
    sys.stdin.read()
    yield ("b", torch.zeros(4))
save_safetensors_streaming(generate(), path, [("a", "F32", [4]), ("b", "F32", [4])])
"""


@pytest.mark.slow
def test_a_save_in_another_process_holds_the_path_until_it_dies(existing_dest):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDING_CHILD, existing_dest],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    try:
        assert child.stdout.readline().strip() == "inside"
        with pytest.raises(OSError) as raised:
            save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS))
        assert raised.value.errno == errno.EBUSY
        assert read_bytes(existing_dest) == PREEXISTING
    finally:
        child.kill()
        child.wait(timeout=60)
    # Killed, the child left its temporary file and no lock: that is debris.
    assert os.path.lexists(existing_dest + ".tmp")
    save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS))
    assert saved_correctly(existing_dest)
    assert not os.path.lexists(existing_dest + ".tmp")


# --------------------------------------------------------------------------
# finalize() of an incomplete file
# --------------------------------------------------------------------------


def cut_in_half(path) -> bytes:
    whole = read_bytes(path)
    os.truncate(path, len(whole) // 2)
    return whole[: len(whole) // 2]


def test_finalize_of_a_cut_temp_file_is_a_value_error_and_touches_nothing(existing_dest):
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    half = cut_in_half(temp)
    with pytest.raises(ValueError) as raised:
        finalize(temp, existing_dest)
    assert temp in str(raised.value) and "not a complete safetensors file" in str(raised.value)
    assert read_bytes(existing_dest) == PREEXISTING
    assert read_bytes(temp) == half


def test_finalize_async_of_a_cut_temp_file_fails_through_the_future(existing_dest):
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    half = cut_in_half(temp)
    error = finalize_async(temp, existing_dest).exception(timeout=60)
    assert isinstance(error, ValueError) and temp in str(error)
    assert read_bytes(existing_dest) == PREEXISTING
    assert read_bytes(temp) == half


def test_finalize_while_a_new_save_writes_the_temp_file_is_refused(existing_dest):
    # The second save to the path starts before the (queued) finalize runs.
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    second = PausedSave(existing_dest, rename=False)
    with pytest.raises(OSError) as raised:
        finalize_async(temp, existing_dest).result(timeout=60)
    assert raised.value.errno == errno.EBUSY and raised.value.filename == temp
    assert read_bytes(existing_dest) == PREEXISTING
    assert second.finish() == temp
    assert finalize(temp, existing_dest) == existing_dest
    assert saved_correctly(existing_dest)


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.mark.parametrize(
    "offset, data, problem",
    [(0, b"\0" * 8, "never finished"), ("end", b"extra", "extra bytes"), (0, b"\xff" * 8, "header length")],
    ids=["header_never_written", "bytes_appended", "length_garbled"],
)
def test_finalize_names_what_is_wrong_with_the_file(existing_dest, offset, data, problem):
    temp = save_safetensors_streaming(iter(ITEMS), existing_dest, meta_for(ITEMS), rename=False)
    patch(temp, os.path.getsize(temp) if offset == "end" else offset, data)
    with pytest.raises(ValueError, match=problem):
        finalize(temp, existing_dest)
    assert read_bytes(existing_dest) == PREEXISTING


def test_finalize_refuses_a_symlink_at_the_temp_path(existing_dest, tmp_path):
    real = save_safetensors_streaming(iter(ITEMS), tmp_path / "real", meta_for(ITEMS))
    os.symlink(real, existing_dest + ".tmp")
    with pytest.raises(OSError) as raised:
        finalize(existing_dest + ".tmp", existing_dest)
    assert raised.value.errno == errno.ELOOP
    assert read_bytes(existing_dest) == PREEXISTING


def test_every_file_a_save_writes_passes_the_finalize_check(tmp_path):
    items = [(name, make_tensor(dtype, (3, 4), seed=i)) for i, (name, dtype) in enumerate(SAFETENSORS_TO_TORCH.items())]
    items.append(("empty", torch.empty(0, 5)))
    temp = save_safetensors_streaming(iter(items), tmp_path / "all", meta_for(items), rename=False)
    _C.check_file(os.fsencode(temp))
    assert finalize(temp, tmp_path / "all") == str(tmp_path / "all")


def test_check_file_raises_value_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_safetensors_streaming(iter(ITEMS), path, meta_for(ITEMS))
    cut_in_half(path)
    with pytest.raises(ValueError) as raised:
        _C.check_file(os.fsencode(path))
    assert str(path) in str(raised.value) and "cut short" in str(raised.value)
    with pytest.raises(FileNotFoundError):
        _C.check_file(os.fsencode(tmp_path / "missing"))


# --------------------------------------------------------------------------
# a FIFO at <path>.tmp
# --------------------------------------------------------------------------

FIFO_CHILD = r"""
import os, sys, torch
from trinity_stream_saver import save_safetensors_streaming
path = sys.argv[1]
os.mkfifo(path + ".tmp")
save_safetensors_streaming(iter([("a", torch.ones(3))]), path, [("a", "F32", [3])])
print("saved", flush=True)
"""


@pytest.mark.slow
def test_a_fifo_at_the_temp_path_is_replaced_without_hanging(dest):
    # In a child: the bug this guards against is a hang that Ctrl-C cannot stop.
    result = run_python(FIFO_CHILD, dest, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "saved"
    assert torch.equal(load_file(dest)["a"], torch.ones(3))
    assert not os.path.lexists(dest + ".tmp")


# --------------------------------------------------------------------------
# a destination that is not a regular file
# --------------------------------------------------------------------------


def test_a_fifo_at_the_destination_is_refused_and_stays(dest):
    os.mkfifo(dest)
    with pytest.raises(FileExistsError) as raised:
        save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS))
    assert raised.value.filename == dest and "FIFO" in str(raised.value)
    assert stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert not os.path.lexists(dest + ".tmp")


def test_a_socket_at_the_destination_is_refused_and_stays(tmp_path):
    dest = str(tmp_path / "s")  # AF_UNIX paths are short
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(dest)
        with pytest.raises(FileExistsError, match="socket"):
            save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS))
    assert stat.S_ISSOCK(os.lstat(dest).st_mode)
    assert not os.path.lexists(dest + ".tmp")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_character_device_at_the_destination_is_refused_and_stays(dest):
    os.mknod(dest, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    with pytest.raises(FileExistsError, match="character device"):
        save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS))
    assert stat.S_ISCHR(os.lstat(dest).st_mode)
    assert not os.path.lexists(dest + ".tmp")


def test_finalize_to_a_fifo_is_refused_and_keeps_the_temp_file(dest):
    temp = save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS), rename=False)
    os.mkfifo(dest)
    with pytest.raises(FileExistsError):
        finalize(temp, dest)
    assert stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert saved_correctly(temp)


def test_a_symlink_at_the_destination_is_replaced_and_its_target_kept(tmp_path):
    target = tmp_path / "target.safetensors"
    target.write_bytes(PREEXISTING)
    dest = tmp_path / "link.safetensors"
    os.symlink(target, dest)
    save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS))
    assert stat.S_ISREG(os.lstat(dest).st_mode)
    assert saved_correctly(dest)
    assert target.read_bytes() == PREEXISTING


# --------------------------------------------------------------------------
# a path that names a directory
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rename", [True, False])
def test_a_filepath_ending_with_a_separator_is_a_value_error(tmp_path, rename):
    directory = str(tmp_path / "checkpoints") + os.sep
    os.mkdir(directory)
    with pytest.raises(ValueError, match="ends with a path separator"):
        save_safetensors_streaming(iter(ITEMS), directory, meta_for(ITEMS), rename=rename)
    assert os.listdir(directory) == []


def test_finalize_to_a_path_ending_with_a_separator_is_a_value_error(dest, tmp_path):
    temp = save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS), rename=False)
    with pytest.raises(ValueError, match="ends with a path separator"):
        finalize(temp, str(tmp_path) + os.sep)
    assert saved_correctly(temp)


def test_finalize_async_to_a_path_ending_with_a_separator_fails_through_the_future(dest, tmp_path):
    temp = save_safetensors_streaming(iter(ITEMS), dest, meta_for(ITEMS), rename=False)
    error = finalize_async(temp, str(tmp_path) + os.sep).exception(timeout=60)
    assert isinstance(error, ValueError) and "ends with a path separator" in str(error)
    assert saved_correctly(temp)


def test_an_empty_filepath_is_a_value_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        save_safetensors_streaming(iter(ITEMS), "", meta_for(ITEMS))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# finalize_async while the interpreter shuts down
# --------------------------------------------------------------------------

AT_EXIT_CHILD = r"""
import atexit, sys, torch
from trinity_stream_saver import finalize_async, save_safetensors_streaming
path = sys.argv[1]
temp = save_safetensors_streaming(iter([("a", torch.ones(3))]), path, [("a", "F32", [3])], rename=False)
atexit.register(lambda: print("finalized", finalize_async(temp, path).result(timeout=60), flush=True))
"""

AFTER_MAIN_CHILD = r"""
import sys, threading, time, torch
from trinity_stream_saver import finalize_async, save_safetensors_streaming
path = sys.argv[1]
temp = save_safetensors_streaming(iter([("a", torch.ones(3))]), path, [("a", "F32", [3])], rename=False)
def late():
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    print("finalized", finalize_async(temp, path).result(timeout=60), flush=True)
threading.Thread(target=late).start()
"""


@pytest.mark.slow
@pytest.mark.parametrize("code", [AT_EXIT_CHILD, AFTER_MAIN_CHILD], ids=["atexit", "after_main_returned"])
def test_finalize_async_during_interpreter_shutdown_still_finalizes(dest, code):
    result = run_python(code, dest, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"finalized {dest}", result.stderr
    assert torch.equal(load_file(dest)["a"], torch.ones(3))
    assert not os.path.lexists(dest + ".tmp")
