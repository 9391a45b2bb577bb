"""overlap=True: a C++ thread writes the tensors already yielded while the
iterator produces the next ones. The file is the same as without it; the
saver holds at most the tensor being written plus max_queued_bytes of
queue; a producer that reuses or frees a held tensor gets an error, never a
wrong file or a crash; and failures on either side lose nothing."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    PREEXISTING,
    assert_nothing_lost,
    bytes_written,
    child_env,
    meta_for,
    read_bytes,
    run_python,
)
from trinity_stream_saver import _C, save_safetensors_streaming
from safetensors.torch import load_file as _load

MiB = 1 << 20
# Tensors at or above this reach the worker thread; smaller ones are copied
# on the caller's thread.
LARGE = _C.INLINE_BYTES


def interleaved_items(count: int = 10):
    """Large tensors (held and written by the worker) between small ones
    (copied into batches), and a transposed one (staged on the caller)."""
    items = []
    for i in range(count):
        size = LARGE + 8 * i if i % 3 != 1 else 4096 + i
        items.append((f"t{i}", torch.full((size,), i, dtype=torch.uint8)))
    items.append(("transposed", torch.arange(LARGE // 2, dtype=torch.int32).reshape(512, -1).t()))
    return items


def make_items(count: int = 6):
    return [(f"t{i}", torch.full((256, 1024), float(i))) for i in range(count)]


def test_overlap_writes_the_same_bytes_as_the_default(tmp_path):
    items = make_items() + [("view", torch.arange(12.0).reshape(3, 4).t()), ("scalar", torch.tensor(1.5))]
    plain = save_safetensors_streaming(iter(items), tmp_path / "plain", meta_for(items))
    overlapped = save_safetensors_streaming(iter(items), tmp_path / "overlap", meta_for(items), overlap=True)
    assert read_bytes(overlapped) == read_bytes(plain)


@pytest.mark.parametrize("count", [0, 1])
def test_overlap_handles_empty_and_single_streams(tmp_path, count):
    items = make_items(count)
    path = save_safetensors_streaming(iter(items), tmp_path / "f", meta_for(items), overlap=True)
    assert sorted(load_file(path)) == sorted(name for name, _ in items)


def test_overlap_with_rename_false_leaves_a_complete_temp_file(existing_dest):
    items = make_items(3)
    temp = save_safetensors_streaming(iter(items), existing_dest, meta_for(items), rename=False, overlap=True)
    assert temp == existing_dest + ".tmp"
    assert torch.equal(load_file(temp)["t2"], items[2][1])
    assert read_bytes(existing_dest) == PREEXISTING


@pytest.mark.parametrize("max_queued_bytes", [None, 0, 1 << 30])
def test_overlap_writes_the_same_bytes_for_interleaved_large_and_small_tensors(tmp_path, max_queued_bytes):
    items = interleaved_items()
    plain = save_safetensors_streaming(iter(items), tmp_path / "plain", meta_for(items))
    overlapped = save_safetensors_streaming(
        iter(items), tmp_path / "overlap", meta_for(items), overlap=True, max_queued_bytes=max_queued_bytes
    )
    assert read_bytes(overlapped) == read_bytes(plain)


def _alive_at_each_request(dest, size: int, count: int, **options) -> list[list[int]]:
    refs: list[weakref.ref] = []
    alive_at_request: list[list[int]] = []

    def generate():
        for i in range(count):
            alive_at_request.append([j for j, ref in enumerate(refs) if ref() is not None])
            tensor = torch.full((size,), i, dtype=torch.uint8)
            refs.append(weakref.ref(tensor))
            yield f"t{i}", tensor
            del tensor  # what is still alive is held by the saver

    save_safetensors_streaming(generate(), dest, [(f"t{i}", "U8", [size]) for i in range(count)], overlap=True, **options)
    assert all(ref() is None for ref in refs)
    return alive_at_request


@pytest.mark.parametrize("queued_tensors", [0, 1, 3])
def test_overlap_holds_the_tensor_being_written_and_at_most_max_queued_bytes_more(dest, queued_tensors):
    size = 2 * LARGE
    alive = _alive_at_each_request(dest, size, 12, max_queued_bytes=queued_tensors * size)
    for k, held in enumerate(alive):
        # Only the most recent tensors: one being written, `queued_tensors` queued.
        assert set(held) <= set(range(k - 1 - queued_tensors, k)), (k, held)


def test_overlap_holds_by_default_at_most_the_largest_tensor_beyond_the_one_being_written(dest):
    alive = _alive_at_each_request(dest, 2 * LARGE, 12)
    for k, held in enumerate(alive):
        assert set(held) <= {k - 2, k - 1}, (k, held)


def test_overlap_never_holds_tensors_below_the_inline_threshold(dest):
    alive = _alive_at_each_request(dest, LARGE - 1, 12)
    assert all(held == [] for held in alive), alive


@pytest.mark.parametrize("max_queued_bytes,buffers", [(None, 3), (0, 2), (4 * LARGE, 6)])
def test_a_ring_of_reused_buffers_as_large_as_the_contract_says_writes_every_tensor(
    tmp_path, max_queued_bytes, buffers
):
    size, count = LARGE, 16
    assert buffers == 2 + (max_queued_bytes if max_queued_bytes is not None else size) // size
    ring = [torch.empty(size, dtype=torch.uint8) for _ in range(buffers)]

    def generate():
        for i in range(count):
            buffer = ring[i % buffers]
            buffer.fill_(i)  # the refill a GPU producer does with copy_(non_blocking=True)
            yield f"t{i}", buffer

    meta = [(f"t{i}", "U8", [size]) for i in range(count)]
    path = save_safetensors_streaming(generate(), tmp_path / "f", meta, overlap=True, max_queued_bytes=max_queued_bytes)
    loaded = _load(path)
    for i in range(count):
        assert torch.equal(loaded[f"t{i}"], torch.full((size,), i, dtype=torch.uint8)), i


def test_reusing_a_buffer_that_is_still_held_fails_naming_the_tensor(existing_dest):
    buffer = torch.empty(64 * MiB, dtype=torch.uint8)  # far slower to write than to refill-check

    def generate():
        for i in range(4):
            buffer.fill_(i)
            yield f"t{i}", buffer

    meta = [(f"t{i}", "U8", [64 * MiB]) for i in range(4)]
    with pytest.raises(ValueError, match="'t0' was modified in place while the saver held it"):
        save_safetensors_streaming(generate(), existing_dest, meta, overlap=True)
    assert_nothing_lost(existing_dest)


def test_the_same_tensor_yielded_twice_is_not_a_reuse(tmp_path):
    # Tied weights (lm_head and embed_tokens) share one storage, unchanged.
    tied = torch.full((2 * LARGE,), 7, dtype=torch.uint8)
    items = [("embed", tied), ("lm_head", tied)]
    path = save_safetensors_streaming(iter(items), tmp_path / "f", meta_for(items), overlap=True)
    assert torch.equal(_load(path)["lm_head"], tied)


_FREES_YIELDED_TENSORS = r"""
import sys, torch
from trinity_stream_saver import save_safetensors_streaming
path, layout = sys.argv[1], sys.argv[2]
size, count = 32 << 20, 6
def generate():
    previous = None
    for i in range(count):
        if previous is not None:
            previous.untyped_storage().resize_(0)  # FSDP frees a gathered parameter
        tensor = torch.full((size // 4096, 4096), i, dtype=torch.uint8)
        previous = tensor
        yield f"t{i}", tensor if layout == "contiguous" else tensor.t()
shape = [size // 4096, 4096] if layout == "contiguous" else [4096, size // 4096]
try:
    save_safetensors_streaming(generate(), path, [(f"t{i}", "U8", shape) for i in range(count)], overlap=True)
except ValueError as error:
    print("VALUE_ERROR", error)
    sys.exit(0)
from safetensors.torch import load_file
loaded = load_file(path)
print("OK" if all(bool((loaded[f"t{i}"] == i).all()) for i in range(count)) else "WRONG")
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_producer_that_frees_a_yielded_tensor_gets_an_error_or_a_correct_file_never_a_crash(
    existing_dest, layout
):
    result = run_python(_FREES_YIELDED_TENSORS, existing_dest, layout)
    assert result.returncode == 0, result.stderr[-3000:]
    if layout == "transposed":
        # Staged in the saver's memory as it was yielded: freeing it is harmless.
        assert result.stdout.strip() == "OK", result.stdout
    else:
        assert result.stdout.startswith("VALUE_ERROR tensor 't") and "lost its memory" in result.stdout, result.stdout
        assert_nothing_lost(existing_dest)


def test_a_full_disk_met_on_the_worker_thread_is_enospc_and_loses_nothing(mount_tmpfs):
    dest = str(mount_tmpfs(4 * MiB) / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    items = interleaved_items(12)
    # Every tensor described as empty: only the header is reserved, so the
    # disk fills while the worker writes.
    meta = [(name + "_" * 48, "U8" if t.dtype == torch.uint8 else "I32", [0]) for name, t in items]
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter(items), dest, meta, overlap=True)
    assert raised.value.errno == errno.ENOSPC
    assert_nothing_lost(dest)


def _slow_generator(count: int, produce_seconds: float, samples: list[tuple[int, int]]):
    """Yields `count` 32 MiB tensors, each after a sleep (a stand-in for a
    GPU-to-CPU copy), and records the process's bytes written before and
    after each sleep."""
    for i in range(count):
        before = bytes_written()
        time.sleep(produce_seconds)
        samples.append((before, bytes_written()))
        yield (f"t{i}", torch.full((32 * MiB,), i % 7, dtype=torch.uint8))


def _bytes_written_while_producing(dest, overlap: bool) -> list[int]:
    samples: list[tuple[int, int]] = []
    count = 4
    meta = [(f"t{i}", "U8", [32 * MiB]) for i in range(count)]
    save_safetensors_streaming(_slow_generator(count, 0.3, samples), dest, meta, overlap=overlap)
    return [after - before for before, after in samples]


def test_overlap_writes_while_the_iterator_produces(dest):
    grown = _bytes_written_while_producing(dest, overlap=True)
    # While tensor k+1 was produced, tensor k (32 MiB) was being written.
    assert any(delta >= MiB for delta in grown[1:]), grown


def test_without_overlap_nothing_is_written_while_the_iterator_produces(dest):
    # The control for the test above: the measurement can tell the difference.
    grown = _bytes_written_while_producing(dest, overlap=False)
    assert all(delta < MiB for delta in grown), grown


class ProducerFailure(Exception):
    pass


@pytest.mark.parametrize("position", [0, 1, 3])
def test_overlap_propagates_the_iterators_exception_unchanged(existing_dest, position):
    failure = ProducerFailure("producer failed")
    items = make_items(4)

    def generate():
        for i, item in enumerate(items):
            if i == position:
                raise failure
            yield item

    with pytest.raises(ProducerFailure) as raised:
        save_safetensors_streaming(generate(), existing_dest, meta_for(items), overlap=True)
    assert raised.value is failure
    assert_nothing_lost(existing_dest)


def test_overlap_reports_a_bad_tensor_written_in_the_background(existing_dest):
    items = make_items(2) + [("bad", torch.zeros(4, dtype=torch.complex128))]
    meta = meta_for(make_items(2)) + [("bad", "F32", [4]), ("t2", "F32", [256, 1024])]
    with pytest.raises(ValueError, match="'bad'.*BF16"):
        save_safetensors_streaming(iter(items), existing_dest, meta, overlap=True)
    assert_nothing_lost(existing_dest)


def test_overlap_reports_a_bad_item(existing_dest):
    items = make_items(2) + [("t2", "not a tensor")]
    with pytest.raises(TypeError, match="item 2"):
        save_safetensors_streaming(iter(items), existing_dest, meta_for(make_items(3)), overlap=True)
    assert_nothing_lost(existing_dest)


_CTRL_C_CHILD = r"""
import os, signal, sys, time
import torch
from trinity_stream_saver import save_safetensors_streaming
path, layout = sys.argv[1], sys.argv[2]
row = torch.arange(256, dtype=torch.uint8).repeat(4096)
if layout == "expanded":  # staged on the caller's thread, piece by piece
    items = [(f"t{i}", row.expand(512, -1)) for i in range(8)]  # 8 x 512 MiB, zero stride
else:  # held and written by the worker straight from its memory
    block = row.expand(512, -1).contiguous()
    items = [(f"t{i}", block) for i in range(8)]
print("STARTED", flush=True)
try:
    save_safetensors_streaming(iter(items), path, [(n, "U8", list(t.shape)) for n, t in items], overlap=True)
except KeyboardInterrupt:
    print("KEYBOARD_INTERRUPT", os.path.exists(path + ".tmp"), time.monotonic(), flush=True)
    sys.exit(0)
print("FINISHED", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["expanded", "contiguous"])
def test_ctrl_c_stops_an_overlapped_save_and_removes_the_temp_file(existing_dest, layout):
    child = subprocess.Popen([sys.executable, "-c", _CTRL_C_CHILD, existing_dest, layout],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout.readline().strip() == "STARTED"
        deadline = time.monotonic() + 120
        while bytes_written(child.pid) < 64 * MiB:
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-2000:]
            time.sleep(0.005)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    words = out.split()
    assert words[:2] == ["KEYBOARD_INTERRUPT", "False"], (out, err[-2000:])
    # Stopped within a few chunks' time, long before 4 GiB were written.
    assert float(words[2]) - sent < 10
    assert read_bytes(existing_dest) == PREEXISTING
