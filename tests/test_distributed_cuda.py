"""save_model_streaming from the GPU: gathered tensors reach the CPU
through the pinned ring (non-blocking copies, events) while the previous
tensor is written. Skipped, saying why, where torch sees no CUDA device (as
on CI, whose torch is a CPU build); run on the lent GPU machine. Needs only
torch and safetensors (no transformers) so that it runs there as it is."""

import json
import multiprocessing
import os

import pytest
import torch
from safetensors.torch import load_file

import distributed_workers as workers
from trinity_stream_saver import save_model_streaming

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def saved_tensors(folder) -> dict:
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def gpu_state_dict() -> dict:
    """Tensors of several sizes and dtypes, more than the ring's two
    buffers, so that each buffer is refilled several times."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index, (shape, dtype) in enumerate([((300, 70), torch.float32), ((4096, 256), torch.bfloat16),
                                            ((3,), torch.int64), ((1000,), torch.float16),
                                            ((512, 512), torch.float32), ((0, 4), torch.float32),
                                            ((2048, 128), torch.float32), ((17,), torch.float32)]):
        tensors[f"t{index}"] = torch.randn(shape, generator=generator).mul(100).to(dtype).cuda()
    tensors["transposed"] = torch.randn((64, 96), generator=generator).cuda().t()
    return tensors


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["as_is", "bfloat16"])
def test_gpu_tensors_are_saved_bit_exact_through_the_pinned_ring(tmp_path, dtype):
    on_gpu = gpu_state_dict()
    save_model_streaming(on_gpu, tmp_path, max_shard_size="600KB", dtype=dtype)
    saved = saved_tensors(tmp_path)
    assert saved.keys() == on_gpu.keys()
    for name, tensor in on_gpu.items():
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert saved[name].dtype == expected.dtype, name
        assert torch.equal(saved[name], expected.cpu()), name


def test_gpu_module_is_saved_as_its_state_dict(tmp_path):
    model = workers.seeded_mlp("cuda")
    save_model_streaming(model, tmp_path, max_shard_size="100KB")
    saved = saved_tensors(tmp_path)
    expected = workers.seeded_mlp("cpu").state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def test_fsdp2_on_nccl_world_size_one_saves_the_full_model(tmp_path):
    process = multiprocessing.get_context("spawn").Process(
        target=workers.run_cuda_rank, args=(0, 1, str(tmp_path)))
    process.start()
    process.join(180)
    if process.is_alive():
        process.kill()
        pytest.fail("the rank did not finish within 180 s")
    assert process.exitcode == 0
    with open(tmp_path / "rank0.json") as file:
        record = json.load(file)["cuda_fsdp"]
    assert "crashed" not in record and "error" not in record, record
    assert record["returned"] == str(tmp_path / "cuda_fsdp" / "model.safetensors.index.json")
    saved = saved_tensors(tmp_path / "cuda_fsdp")
    expected = workers.seeded_mlp("cpu").state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor.to(torch.bfloat16)), name
