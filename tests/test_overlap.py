"""overlap=True: a C++ thread writes tensor k while the iterator produces
tensor k+1. The file is the same as without it, at most one tensor beyond
the one being written is held, and failures on either side lose nothing."""

from __future__ import annotations

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
)
from trinity_stream_saver import save_safetensors_streaming

MiB = 1 << 20


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


def test_overlap_holds_at_most_one_tensor_beyond_the_one_being_written(dest):
    refs: list[weakref.ref] = []
    alive_at_request: list[list[int]] = []

    def make(i):
        tensor = torch.full((64, 64), float(i))
        refs.append(weakref.ref(tensor))
        return (f"t{i}", tensor)

    def generate(count):
        for i in range(count):
            alive_at_request.append([j for j, ref in enumerate(refs) if ref() is not None])
            yield make(i)

    count = 8
    save_safetensors_streaming(generate(count), dest, [(f"t{i}", "F32", [64, 64]) for i in range(count)], overlap=True)
    for k, alive in enumerate(alive_at_request):
        # When item k is requested, only item k-1 (being written) may be alive.
        assert set(alive) <= {k - 1}, (k, alive)
    assert all(ref() is None for ref in refs)


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
path = sys.argv[1]
row = torch.arange(256, dtype=torch.uint8).repeat(4096)
items = [(f"t{i}", row.expand(512, -1)) for i in range(8)]  # 8 x 512 MiB, zero stride
print("STARTED", flush=True)
try:
    save_safetensors_streaming(iter(items), path, [(n, "U8", list(t.shape)) for n, t in items], overlap=True)
except KeyboardInterrupt:
    print("KEYBOARD_INTERRUPT", os.path.exists(path + ".tmp"), time.monotonic(), flush=True)
    sys.exit(0)
print("FINISHED", flush=True)
"""


def test_ctrl_c_stops_an_overlapped_save_and_removes_the_temp_file(existing_dest):
    child = subprocess.Popen([sys.executable, "-c", _CTRL_C_CHILD, existing_dest],
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
