"""Each tensor is released before the iterator is asked for the next one, so
that only one tensor of the model is alive at a time; writing a tensor never
copies it whole, and the GIL is released while its bytes are written.

The generators below never hold a tensor themselves: each item is built by
a helper that records weak references and returns the (name, tensor) tuple,
which the generator yields directly. So when the generator resumes, the only
references left to the previous tensor are the saver's.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import BENCHMARKS_DIR, bytes_written, run_python
from trinity_stream_saver import _C, save_safetensors_streaming


class Tracker:
    def __init__(self):
        self.refs: list[list[weakref.ref]] = []  # per item: the tensor and its bases
        self.alive_at_request: list[list[int]] = []  # per request: items still alive

    def record(self, *tensors: torch.Tensor) -> None:
        self.refs.append([weakref.ref(t) for t in tensors])

    def alive(self) -> list[int]:
        return [i for i, refs in enumerate(self.refs) if any(ref() is not None for ref in refs)]

    def generate(self, count, make):
        for i in range(count):
            self.alive_at_request.append(self.alive())
            yield make(self, i)
        self.alive_at_request.append(self.alive())


def contiguous_item(tracker: Tracker, i: int):
    tensor = torch.full((64, 64), float(i))
    tracker.record(tensor)
    return (f"t{i}", tensor)


def transposed_item(tracker: Tracker, i: int):
    base = torch.full((32, 48), float(i))
    view = base.t()
    tracker.record(view, base)
    return (f"t{i}", view)


def strided_bfloat16_item(tracker: Tracker, i: int):
    base = torch.full((40, 40), float(i), dtype=torch.bfloat16)
    view = base[::2, 1::3]
    tracker.record(view, base)
    return (f"t{i}", view)


def conj_item(tracker: Tracker, i: int):
    base = torch.full((8, 8), complex(i, 1), dtype=torch.complex64)
    view = base.conj()
    tracker.record(view, base)
    return (f"t{i}", view)


def requires_grad_item(tracker: Tracker, i: int):
    leaf = torch.full((16, 16), float(i), requires_grad=True)
    result = (leaf * 2).t()  # a non-leaf view with an autograd graph
    tracker.record(result, leaf)
    return (f"t{i}", result)


def scalar_item(tracker: Tracker, i: int):
    tensor = torch.tensor(float(i), dtype=torch.bfloat16)
    tracker.record(tensor)
    return (f"t{i}", tensor)


MAKERS = {
    "contiguous": (contiguous_item, [64, 64], "F32"),
    "transposed": (transposed_item, [48, 32], "F32"),
    "strided_bfloat16": (strided_bfloat16_item, [20, 13], "BF16"),
    "conj_view": (conj_item, [8, 8], "C64"),
    "requires_grad": (requires_grad_item, [16, 16], "F32"),
    "zero_dim": (scalar_item, [], "BF16"),
}

COUNT = 5


def run_save(dest, kind, **kwargs):
    make, shape, dtype = MAKERS[kind]
    tracker = Tracker()
    meta = [(f"t{i}", dtype, shape) for i in range(COUNT)]
    save_safetensors_streaming(tracker.generate(COUNT, make), dest, meta, **kwargs)
    return tracker


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_each_tensor_is_released_before_the_next_is_requested(dest, kind):
    tracker = run_save(dest, kind)
    # At request i, nothing yielded before may still be alive.
    assert tracker.alive_at_request == [[] for _ in range(COUNT + 1)]


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_last_tensor_is_released_when_save_returns(dest, kind):
    tracker = run_save(dest, kind)
    assert tracker.alive() == []


def test_tensors_are_released_with_rename_false(dest):
    tracker = run_save(dest, "transposed", rename=False)
    assert tracker.alive_at_request == [[] for _ in range(COUNT + 1)]
    assert tracker.alive() == []


def test_released_tensors_were_still_written_correctly(dest):
    run_save(dest, "transposed")
    loaded = load_file(dest)
    for i in range(COUNT):
        assert torch.equal(loaded[f"t{i}"], torch.full((48, 32), float(i)))


def test_tensors_are_released_after_a_failed_save(dest):
    tracker = Tracker()
    meta = [("t0", "F32", [64, 64]), ("t1", "F32", [64, 64])]

    def generate():
        yield contiguous_item(tracker, 0)
        yield ("t1", "not a tensor")

    with pytest.raises(TypeError):
        save_safetensors_streaming(generate(), dest, meta)
    gc.collect()
    assert tracker.alive() == []


def test_tracker_detects_a_tensor_kept_alive(dest):
    # The check above must be able to fail: an iterator that keeps every
    # tensor (like a list) is reported.
    tracker = Tracker()
    kept = []

    def keeping(tracker, i):
        item = contiguous_item(tracker, i)
        kept.append(item)
        return item

    meta = [(f"t{i}", "F32", [64, 64]) for i in range(3)]
    save_safetensors_streaming(tracker.generate(3, keeping), dest, meta)
    assert tracker.alive_at_request == [[], [0], [0, 1], [0, 1, 2]]


# --------------------------------------------------------------------------
# no full copy of a tensor is made while writing it
# --------------------------------------------------------------------------

_PEAK_MEMORY_CHILD = r"""
import sys, torch
from peak_memory import memory_baseline, peak_kib
from trinity_stream_saver import save_safetensors_streaming
MiB = 1 << 20
kind, path = sys.argv[1], sys.argv[2]
if kind == "contiguous":
    tensor = torch.ones(256 * MiB, dtype=torch.uint8)
elif kind == "expanded":
    tensor = torch.arange(256, dtype=torch.uint8).repeat(4096).expand(256, -1)
elif kind == "transposed":
    tensor = torch.ones(16 * MiB, 16, dtype=torch.uint8).t()
before, _ = memory_baseline()
save_safetensors_streaming(iter([("t", tensor)]), path, [("t", "U8", list(tensor.shape))])
print((peak_kib() - before) * 1024, tensor.numel())
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["contiguous", "expanded", "transposed"])
def test_writing_a_large_tensor_needs_at_most_one_chunk_of_extra_memory(tmp_path, kind):
    result = run_python(_PEAK_MEMORY_CHILD, kind, str(tmp_path / "big.safetensors"), paths=[BENCHMARKS_DIR])
    assert result.returncode == 0, result.stderr[-2000:]
    growth, size = map(int, result.stdout.split())
    assert size >= 4 * _C.CHUNK_BYTES
    # A contiguous copy would add `size` bytes; the staging buffer is one
    # chunk, the file buffer a few MiB.
    assert growth <= _C.CHUNK_BYTES + (32 << 20), f"peak memory grew by {growth >> 20} MiB for a {size >> 20} MiB tensor"


def test_other_python_threads_run_while_a_tensor_is_written(dest):
    # 512 MiB from a 1 MiB row: writing it takes a while, holding it does not.
    tensor = torch.arange(256, dtype=torch.uint8).repeat(4096).expand(512, -1)
    total = tensor.numel()
    errors = []

    def run():
        try:
            save_safetensors_streaming(iter([("t", tensor)]), dest, [("t", "U8", list(tensor.shape))])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    seen_mid_write = []
    while thread.is_alive():
        size = bytes_written(tid=thread.native_id)
        # This line runs only if the saver released the GIL while writing.
        if _C.CHUNK_BYTES <= size < total:
            seen_mid_write.append(size)
        time.sleep(0.001)
    thread.join()
    assert errors == []
    assert seen_mid_write, "the main thread never ran while the tensor was being written"
