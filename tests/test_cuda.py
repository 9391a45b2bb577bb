"""Saving what a GPU training job hands over: tensors copied from the GPU as
they are requested (the real slow producer), in pinned memory, and
non-blocking copies. Skipped, saying why, where torch sees no CUDA device
(as on CI, whose torch is a CPU build); run on the lent GPU machine by
benchmarks/device_check.sh."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_tensors_identical, make_tensor, meta_for, read_header
from trinity_stream_saver import save_safetensors_streaming

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.uint8,
          torch.float8_e4m3fn]
SHAPES = [(257, 129), (3, 5, 7), (1,), (0, 4), (4096, 1024)]


def gpu_state_dict() -> dict[str, torch.Tensor]:
    tensors = {}
    for index, dtype in enumerate(DTYPES):
        for number, shape in enumerate(SHAPES):
            tensors[f"layer.{index}.{number}"] = make_tensor(dtype, shape, seed=index * 10 + number).cuda()
    # A transposed GPU tensor: .cpu() keeps its strides, so the saver gets a
    # non-contiguous CPU tensor.
    tensors["transposed"] = make_tensor(torch.bfloat16, (384, 640), seed=99).cuda().t()
    return tensors


@pytest.mark.parametrize("overlap", [False, True], ids=["in_turn", "overlap"])
def test_tensors_copied_from_the_gpu_as_requested_are_saved_bit_exact(tmp_path, overlap):
    on_gpu = gpu_state_dict()
    expected = {name: tensor.cpu() for name, tensor in on_gpu.items()}
    path = str(tmp_path / "model.safetensors")

    requested = []

    def copies():
        for name, tensor in on_gpu.items():
            requested.append(name)
            yield name, tensor.cpu()

    save_safetensors_streaming(copies(), path, meta_for(expected.items()), overlap=overlap)

    assert requested == list(on_gpu)
    assert list(read_header(path).entries) == list(on_gpu)
    loaded = load_file(path)
    for name, tensor in expected.items():
        assert_tensors_identical(loaded[name], tensor)


@pytest.mark.parametrize("overlap", [False, True], ids=["in_turn", "overlap"])
def test_non_blocking_copies_into_a_ring_of_reused_pinned_buffers_are_saved_bit_exact(tmp_path, overlap):
    """The producer of a fast checkpointer: each GPU tensor copied without
    blocking into one of a ring of pinned buffers, the copy waited for
    before the tensor is yielded. The ring follows the saver's contract:
    R >= 2 + max_queued_bytes // S buffers, 3 with the default queue (the
    largest tensor), so a buffer is never refilled while the saver holds it."""
    shape = (2048, 2048)
    on_gpu = [make_tensor(torch.bfloat16, shape, seed=seed).cuda() for seed in range(6)]
    buffers = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(3)]
    assert buffers[0].is_pinned()
    path = str(tmp_path / "model.safetensors")

    def copies():
        stream = torch.cuda.current_stream()
        for index, source in enumerate(on_gpu):
            buffer = buffers[index % len(buffers)]
            buffer.copy_(source, non_blocking=True)
            stream.synchronize()
            yield f"w{index}", buffer

    meta = [(f"w{index}", "BF16", list(shape)) for index in range(len(on_gpu))]
    save_safetensors_streaming(copies(), path, meta, overlap=overlap)

    loaded = load_file(path)
    for index, source in enumerate(on_gpu):
        assert_tensors_identical(loaded[f"w{index}"], source.cpu())
