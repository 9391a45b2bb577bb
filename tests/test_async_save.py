"""save_model_streaming_async: the files of save_model_streaming, from the
model as it was at the call, while training goes on.

Every checkpoint is compared byte for byte with save_model_streaming's of
the same state, saved synchronously just before the asynchronous call. The
background writer is slowed or held (through `_async_work._feed_writer`, the seam
between staging and writing) so that training really runs during the
write; whether something waited is judged from what it observed, never
from elapsed time.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import child_env, mount_tmpfs, tiny_model  # noqa: F401  (fixture)
import trinity_stream_saver
from trinity_stream_saver import AsyncSave, save_model_streaming, save_model_streaming_async
from trinity_stream_saver import _async_work

MODES = {"full": {}, "bounded": {"max_staging_bytes": 64 << 10}}


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def assert_same_checkpoint(actual, expected) -> None:
    got, want = folder_bytes(actual), folder_bytes(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from save_model_streaming's"


def mlp(seed: int = 0) -> torch.nn.Module:
    """Parameters of several sizes and a BatchNorm, whose buffers change in
    every training-mode forward pass."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(),
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8),
    )


def train_step(model, optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    model(torch.randn(32, 64)).square().mean().backward()
    optimizer.step()


def wrap_writer(monkeypatch, wrap) -> None:
    """The background writer gets `wrap(items)` instead of the staged items."""
    monkeypatch.setattr(_async_work, "_feed_writer", wrap)


def held_at(gate: threading.Event, held: int):
    """Holds the writer once it has tensor number `held` until `gate` opens."""
    def wrap(items):
        for index, item in enumerate(items):
            if index == held:
                assert gate.wait(60), "the test never released the writer"
            yield item
    return wrap


def held_before_last(gate: threading.Event, count: int):
    """Holds the writer once it has the last of `count` tensors (all of
    them are staged by then) until `gate` opens."""
    return held_at(gate, count - 1)


def slowly(seconds: float):
    def wrap(items):
        for item in items:
            time.sleep(seconds)
            yield item
    return wrap


# --------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_writes_the_files_of_save_model_streaming(tmp_path, mode, dtype):
    # Tied weights, a config, several shards: the choices of the
    # synchronous save (tensors once, config.json, the index).
    model = tiny_model(tied=True)
    expected = save_model_streaming(model, tmp_path / "sync", max_shard_size="100KB", dtype=dtype)
    future = save_model_streaming_async(model, tmp_path / "async", max_shard_size="100KB",
                                        dtype=dtype, **MODES[mode])
    assert isinstance(future, AsyncSave)
    written = future.result(timeout=60)
    assert os.path.relpath(written, tmp_path / "async") == os.path.relpath(expected, tmp_path / "sync")
    assert "config.json" in os.listdir(tmp_path / "async")
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


@pytest.mark.parametrize("mode", MODES)
def test_a_single_file_state_dict(tmp_path, mode):
    # Contiguous (copied as bytes), a transposed view and an offset slice
    # (copied by torch), an empty tensor.
    matrix = torch.arange(48.0).reshape(6, 8)
    state = {"a": torch.arange(10.0), "b": torch.ones(3, 4, dtype=torch.int64),
             "transposed": matrix.t(), "slice": matrix[2:5], "empty": torch.ones(0)}
    expected = save_model_streaming(state, tmp_path / "sync")
    written = save_model_streaming_async(state, tmp_path / "async", **MODES[mode]).result(60)
    assert os.path.basename(written) == os.path.basename(expected) == "model.safetensors"
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


def test_argument_errors_come_through_the_future(tmp_path):
    future = save_model_streaming_async(mlp(), tmp_path, dtype="bfloat16")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        future.result(10)
    assert future.snapshot_taken()
    # The folder is free again.
    assert save_model_streaming_async(mlp(), tmp_path).result(60)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_staging_bytes_is_checked(tmp_path, bad, error):
    with pytest.raises(error, match="max_staging_bytes"):
        save_model_streaming_async(mlp(), tmp_path, max_staging_bytes=bad).result(10)


# --------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_checkpoint_is_the_model_at_the_call_while_training_goes_on(tmp_path, monkeypatch, mode):
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, optimizer)  # optimizer state exists; BatchNorm statistics moved
    save_model_streaming(model, tmp_path / "sync")
    gate = threading.Event()
    count = len(model.state_dict())
    wrap_writer(monkeypatch, held_before_last(gate, count))
    future = save_model_streaming_async(model, tmp_path / "async", optimizer=optimizer,
                                        **MODES[mode])
    try:
        for _ in range(3):
            train_step(model, optimizer)
        # Three steps that changed every parameter and buffer, all while
        # the save was still writing.
        assert not future.done()
    finally:
        gate.set()
    future.result(60)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


def test_full_staging_takes_the_snapshot_before_returning(tmp_path, monkeypatch):
    gate = threading.Event()
    model = mlp()
    wrap_writer(monkeypatch, held_before_last(gate, len(model.state_dict())))
    try:
        future = save_model_streaming_async(model, tmp_path)
        assert future.snapshot_taken()
    finally:
        gate.set()
    future.result(60)


def test_the_optimizer_step_waits_for_the_snapshot(tmp_path, monkeypatch):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    save_model_streaming(model, tmp_path / "sync")
    hooks_before = (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks))
    # The smallest ring (the largest tensor) and a writer held at its first
    # tensor until the step begins, then slow: the snapshot cannot be
    # complete when the step starts.
    gate = threading.Event()
    optimizer.register_step_pre_hook(lambda *_: gate.set())  # runs before the save's hook
    wrap_writer(monkeypatch, lambda items: slowly(0.05)(held_at(gate, 0)(items)))
    future = save_model_streaming_async(model, tmp_path / "async", max_staging_bytes=0,
                                        optimizer=optimizer)
    seen = []
    # Registered after the save's hook, so it runs after it, just before
    # the parameters change.
    optimizer.register_step_pre_hook(lambda *_: seen.append(future.snapshot_taken()))
    try:
        train_step(model, optimizer)
    finally:
        gate.set()
    assert seen == [True]
    future.result(60)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")
    # The save's hooks removed themselves; the test's two stay.
    assert (len(optimizer._optimizer_step_pre_hooks) - 2,
            len(optimizer._optimizer_step_post_hooks)) == hooks_before


def test_forward_passes_that_update_buffers_may_run_before_the_snapshot(tmp_path, monkeypatch):
    # The BatchNorm comes after a tensor the ring cannot take while the
    # writer is held at the first one: its buffers are not staged from the
    # ring before the forward passes change them.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 128),
                                torch.nn.BatchNorm1d(128)).train()
    save_model_streaming(model, tmp_path / "sync")
    gate = threading.Event()
    wrap_writer(monkeypatch, held_at(gate, 0))
    future = save_model_streaming_async(model, tmp_path / "async", max_staging_bytes=0)
    try:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 64))
        assert not future.snapshot_taken()
    finally:
        gate.set()
    future.result(60)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


def test_a_step_before_the_snapshot_fails_the_save_naming_the_tensor(tmp_path, monkeypatch):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gate = threading.Event()
    # The ring holds the largest tensor: with the writer held at the first,
    # the largest cannot be staged before the step.
    wrap_writer(monkeypatch, held_at(gate, 0))
    future = save_model_streaming_async(model, tmp_path, max_staging_bytes=0)  # no optimizer=
    try:
        train_step(model, optimizer)  # does not wait
    finally:
        gate.set()
    with pytest.raises(ValueError, match=r"tensor '\d\.(weight|bias)' was modified in place"):
        future.result(60)
    assert os.listdir(tmp_path) == []


def test_bounded_staging_holds_at_most_the_ring(tmp_path, monkeypatch):
    """The staged tensors the writer gets all lie within max_staging_bytes
    (or the largest tensor, larger here) of one another."""
    model = mlp()
    bound = 40 << 10
    largest = max(t.nbytes for t in model.state_dict().values())
    assert largest > bound
    spans = []
    parameters = dict(model.named_parameters())

    def record(items):
        for name, tensor in items:
            if name in parameters:
                spans.append((tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes))
            yield name, tensor

    wrap_writer(monkeypatch, record)
    save_model_streaming_async(model, tmp_path, max_staging_bytes=bound).result(60)
    assert len(spans) == len(list(model.parameters()))
    assert max(end for _, end in spans) - min(start for start, _ in spans) <= largest + 64


@pytest.mark.parametrize("mode", MODES)
def test_staging_memory_is_reused_by_the_next_save(tmp_path, monkeypatch, mode):
    addresses = []

    def record(items):
        found = []
        for name, tensor in items:
            found.append(tensor.data_ptr())
            yield name, tensor
        addresses.append(found)

    wrap_writer(monkeypatch, record)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        save_model_streaming_async(model, tmp_path / str(step), **MODES[mode]).result(60)
        train_step(model, optimizer)
    assert len(addresses) == 2
    # Parameters (the buffers of bounded staging are copied at the call).
    ring = [i for i, (name, _) in enumerate(model.state_dict().items())
            if name in dict(model.named_parameters())]
    assert [addresses[0][i] for i in ring] == [addresses[1][i] for i in ring]


# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_full_disk_fails_the_future_and_publishes_nothing(tmp_path, mount_tmpfs, mode):
    small = mount_tmpfs(64 << 10)
    model = mlp()  # about 200 KiB
    future = save_model_streaming_async(model, small / "checkpoint", **MODES[mode])
    with pytest.raises(OSError) as raised:
        future.result(60)
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(small / "checkpoint") == []
    assert future.snapshot_taken()


@pytest.mark.parametrize("mode", MODES)
def test_a_writer_error_fails_the_future_and_frees_the_staging(tmp_path, monkeypatch, mode):
    def failing(items):
        for index, item in enumerate(items):
            if index == 3:
                raise OSError(errno.EIO, "injected write error")
            yield item

    wrap_writer(monkeypatch, failing)
    model = mlp()
    future = save_model_streaming_async(model, tmp_path / "failed", max_shard_size="100KB",
                                        **MODES[mode])
    with pytest.raises(OSError, match="injected write error"):
        future.result(60)
    assert os.listdir(tmp_path / "failed") == []
    monkeypatch.undo()
    # The staging memory and the folder are free for the next save.
    save_model_streaming(model, tmp_path / "sync", max_shard_size="100KB")
    save_model_streaming_async(model, tmp_path / "failed", max_shard_size="100KB",
                               **MODES[mode]).result(60)
    assert_same_checkpoint(tmp_path / "failed", tmp_path / "sync")


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------


def test_a_second_save_to_the_same_folder_fails_at_once(tmp_path, monkeypatch):
    gate = threading.Event()
    model = mlp()
    save_model_streaming(model, tmp_path / "sync")
    wrap_writer(monkeypatch, held_before_last(gate, len(model.state_dict())))
    first = save_model_streaming_async(model, tmp_path / "async")
    try:
        with pytest.raises(OSError, match="still running") as raised:
            save_model_streaming_async(model, tmp_path / "async" / ".." / "async")
        assert raised.value.errno == errno.EBUSY
    finally:
        gate.set()
    first.result(60)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")
    # Once it is done, the folder takes a new save.
    monkeypatch.undo()
    save_model_streaming_async(model, tmp_path / "async").result(60)


@pytest.mark.parametrize("mode", MODES)
def test_a_save_to_another_folder_waits_for_the_staging_memory(tmp_path, monkeypatch, mode):
    first_model, second_model = mlp(0), mlp(1)
    save_model_streaming(first_model, tmp_path / "sync0")
    save_model_streaming(second_model, tmp_path / "sync1")
    gate = threading.Event()
    first_written = threading.Event()
    addresses = []

    def held_first(items):
        found = []
        first = not addresses
        for index, (name, tensor) in enumerate(items):
            if first and index == len(first_model.state_dict()) - 1:
                threading.Timer(0.5, gate.set).start()
                assert gate.wait(60)
            found.append(tensor.data_ptr())
            yield name, tensor
        addresses.append(found)
        if first:
            first_written.set()

    wrap_writer(monkeypatch, held_first)
    first = save_model_streaming_async(first_model, tmp_path / "async0", **MODES[mode])
    second = save_model_streaming_async(second_model, tmp_path / "async1", **MODES[mode])
    if mode == "full":
        # The second call copied only once the first write had given the
        # memory back.
        assert first_written.is_set()
    second.result(60)
    first.result(60)
    assert_same_checkpoint(tmp_path / "async0", tmp_path / "sync0")
    assert_same_checkpoint(tmp_path / "async1", tmp_path / "sync1")
    # One staging memory, used in turn: the first parameter (the first
    # entry) is staged at the same address by both saves.
    assert addresses[0][0] == addresses[1][0]


# --------------------------------------------------------------------------
# Interpreter exit and Ctrl-C (child processes)
# --------------------------------------------------------------------------

CHILD = r"""
import atexit, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
import trinity_stream_saver
from trinity_stream_saver import _async_work, save_model_streaming, save_model_streaming_async

folder, mode, ending = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(20)])
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
save_model_streaming(model, os.path.join(folder, "sync"))

def slowly(items):
    for item in items:
        time.sleep(0.1)
        yield item
_async_work._feed_writer = slowly

# Registered after the package's: runs before it waits for the saves.
atexit.register(lambda: print("EXITING", flush=True))
future = save_model_streaming_async(
    model, os.path.join(folder, "async"), optimizer=optimizer,
    max_staging_bytes=None if mode == "full" else 1 << 14)
print("STARTED", flush=True)
if ending == "interrupted":
    while True:  # training, until Ctrl-C
        optimizer.zero_grad()
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
print("END", flush=True)
"""


def start_child(tmp_path, mode: str, ending: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), mode, ending],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env())
    return child


def wait_for_line(child: subprocess.Popen, wanted: str) -> list[str]:
    lines = []
    for line in child.stdout:
        lines.append(line.strip())
        if line.strip() == wanted:
            return lines
    raise AssertionError(f"the child never printed {wanted}: {lines}, {child.stderr.read()}")


@pytest.mark.parametrize("mode", MODES)
def test_the_interpreter_waits_for_a_running_save_at_exit(tmp_path, mode):
    child = start_child(tmp_path, mode, "returns")
    _, stderr = child.communicate(timeout=180)
    assert child.returncode == 0, stderr
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


def interrupt_child(tmp_path, mode: str, ending: str, after_line: str) -> str:
    """Sends the child Ctrl-C once it has printed `after_line` (the save
    then has about 4 s of writing left); its stderr."""
    child = start_child(tmp_path, mode, ending)
    try:
        wait_for_line(child, after_line)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=180)
    finally:
        child.kill()
    return stderr


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_while_training_lets_the_save_finish(tmp_path, mode):
    stderr = interrupt_child(tmp_path, mode, "interrupted", "STARTED")
    assert "KeyboardInterrupt" in stderr
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_while_waiting_at_exit_aborts_the_save_cleanly(tmp_path, mode):
    # Sent once the program has ended (END), while the save waits at exit.
    stderr = interrupt_child(tmp_path, mode, "returns", "END")
    assert "1 asynchronous save(s) aborted at exit; nothing of them was published" in stderr
    # Nothing published, no temporary file left.
    assert os.listdir(tmp_path / "async") == []


# --------------------------------------------------------------------------
# A GPU model (need CUDA: the lent GPU machine runs these through
# benchmarks/device_async.sh; skipped elsewhere)
# --------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device; benchmarks/device_async.sh runs these on the lent GPU machine")


def gpu_train_step(model, optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    model(torch.randn(32, 64, device="cuda")).square().mean().backward()
    optimizer.step()


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_a_gpu_model_gives_the_files_of_the_synchronous_save(tmp_path, mode):
    model = mlp().cuda()
    save_model_streaming(model, tmp_path / "sync")
    save_model_streaming_async(model, tmp_path / "async", **MODES[mode]).result(120)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_the_gpu_snapshot_holds_through_optimizer_steps(tmp_path, monkeypatch, mode):
    model = mlp().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    gpu_train_step(model, optimizer)
    save_model_streaming(model, tmp_path / "sync")
    gate = threading.Event()
    wrap_writer(monkeypatch, held_before_last(gate, len(model.state_dict())))
    future = save_model_streaming_async(model, tmp_path / "async", optimizer=optimizer,
                                        **MODES[mode])
    try:
        for _ in range(3):
            gpu_train_step(model, optimizer)
        torch.cuda.synchronize()
        assert not future.done()
    finally:
        gate.set()
    future.result(120)
    assert_same_checkpoint(tmp_path / "async", tmp_path / "sync")
    # The steps did change the model: a save now differs.
    save_model_streaming(model, tmp_path / "after")
    assert folder_bytes(tmp_path / "after") != folder_bytes(tmp_path / "sync")


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_pinned_staging_is_reused_across_gpu_saves(tmp_path, monkeypatch, mode):
    seen = []

    def record(items):
        found = []
        for name, tensor in items:
            found.append((tensor.data_ptr(), tensor.is_pinned()))
            yield name, tensor
        seen.append(found)

    wrap_writer(monkeypatch, record)
    model = mlp().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        save_model_streaming_async(model, tmp_path / str(step), **MODES[mode]).result(120)
        gpu_train_step(model, optimizer)
    parameters = [i for i, (name, _) in enumerate(model.state_dict().items())
                  if name in dict(model.named_parameters())]
    assert all(seen[0][i][1] for i in parameters), "parameters were not staged in pinned memory"
    assert [seen[0][i] for i in parameters] == [seen[1][i] for i in parameters]
