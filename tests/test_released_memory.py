"""The saver holds about one tensor of memory when the producer makes each
tensor as it is asked for (a .cpu() copy, a gather, a cast), also under
glibc's malloc, which by default keeps the memory of freed tensors: a fresh
process must not grow by more than two tensors and a little slack (the
Python objects and buffers of the save), whatever the save writes.

The same holds for `convert`, whose source is memory-mapped: the pages of
each source tensor are dropped once the saver asks for the next, or the
process would grow by the whole source.

Memory is VmHWM from /proc/self/status of a fresh child process, reset to
VmRSS just before the save (clear_refs), so that importing torch does not
count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import trinity_stream_saver as tss
from conftest import child_env

MiB = 1 << 20
TENSORS = 32
TENSOR_BYTES = 16 * MiB  # bf16, 8 Mi elements
LIMIT_MIB = 2 * TENSOR_BYTES / MiB + 32

CHILD = r"""
import json, os, runpy, sys
import torch
import trinity_stream_saver as tss

how, folder = sys.argv[1], sys.argv[2]
COUNT, ELEMENTS = 32, 8 << 20

def kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def made_when_asked():
    for i in range(COUNT):
        yield f"layer.{i}.weight", torch.full((ELEMENTS,), i, dtype=torch.bfloat16)

meta = [(f"layer.{i}.weight", "BF16", [ELEMENTS]) for i in range(COUNT)]
if how.startswith("convert"):
    # A float32 checkpoint (1 GiB), cast to bf16 tensor by tensor: each
    # cast is a fresh tensor, made when the saver asks for it, and the
    # source's pages, mapped, stay in the process once read unless dropped.
    source_dict = {name: torch.full(shape, i, dtype=torch.float32)
                   for i, (name, _, shape) in enumerate(meta)}
    if how == "convert":
        source = os.path.join(folder, "source.bin")
        torch.save(source_dict, source)
    else:
        from safetensors.torch import save_file
        source = os.path.join(folder, "source.safetensors")
        save_file(source_dict, source)
    del source_dict
elif how == "save_model":
    # A float32 model saved as bf16: each cast is made when it is needed.
    model = {name: torch.full(shape, i, dtype=torch.float32)
             for i, (name, _, shape) in enumerate(meta)}

with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # VmHWM := VmRSS
baseline = kib("VmRSS")
if how == "single":
    tss.save_safetensors_streaming(made_when_asked(), os.path.join(folder, "m.safetensors"), meta)
elif how == "overlap":
    tss.save_safetensors_streaming(made_when_asked(), os.path.join(folder, "m.safetensors"), meta,
                                   overlap=True)
elif how == "sharded":
    tss.save_sharded_streaming(made_when_asked(), folder, meta, max_shard_size=200 * 10**6)
elif how == "save_model":
    tss.save_model_streaming(model, os.path.join(folder, "out"), max_shard_size=200 * 10**6,
                             dtype=torch.bfloat16)
elif how.startswith("convert"):
    sys.argv = ["trinity_stream_saver", "convert", source, os.path.join(folder, "out"),
                "--max-shard-size", "200MB", "--dtype", "bf16", "--no-progress"]
    try:
        runpy.run_module("trinity_stream_saver", run_name="__main__")
    except SystemExit as done:
        assert not done.code, done.code
print(json.dumps({"growth_mib": (kib("VmHWM") - baseline) / 1024}))
"""


def growth_mib(how: str, folder) -> float:
    child = subprocess.run([sys.executable, "-c", CHILD, how, str(folder)], capture_output=True,
                           text=True, timeout=600, env=child_env())
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])["growth_mib"]


@pytest.mark.parametrize("how", ["single", "sharded", "save_model", "convert",
                                 pytest.param("convert_safetensors", marks=pytest.mark.slow)])
def test_a_producer_that_makes_each_tensor_when_asked_costs_about_one_tensor(how, tmp_path):
    growth = growth_mib(how, tmp_path)
    assert growth <= LIMIT_MIB, (
        f"{how}: the process grew by {growth:.0f} MiB saving {TENSORS} tensors of "
        f"{TENSOR_BYTES // MiB} MiB (at most {LIMIT_MIB:.0f} MiB expected)")


def test_overlap_holds_at_most_its_queue_more(tmp_path):
    # Overlap holds the tensor being written and a queue of at most the
    # largest tensor beyond what the in-turn mode holds.
    growth = growth_mib("overlap", tmp_path)
    assert growth <= LIMIT_MIB + 2 * TENSOR_BYTES / MiB, f"overlap grew by {growth:.0f} MiB"


def test_release_file_pages_drops_a_mapped_tensors_pages_and_the_file_reads_back(tmp_path):
    expected = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    torch.save({"w": expected}, tmp_path / "w.bin")
    mapped = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, expected)  # every page read
    released = tss._C.release_file_pages(mapped)
    # The storage's whole pages: all of it but the two partial pages at its ends.
    assert (4 << 20) - 2 * os.sysconf("SC_PAGESIZE") <= released <= 4 << 20
    assert torch.equal(mapped, expected)


def test_release_file_pages_leaves_memory_that_is_not_a_file_mapping_alone():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    assert tss._C.release_file_pages(tensor) == 0
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))
