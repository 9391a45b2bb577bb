"""save_model_streaming: a Hugging Face checkpoint from a model
sharded over torch.distributed ranks, every rank writing its share.

The ranks are spawned processes on a gloo process group on CPU. Spawning
and importing torch is the slow part, so each world size (2, and 3 for
uneven sharding) is one process group that runs every scenario of
distributed_workers.SCENARIOS once; the tests below check the records and
folders those scenarios left, one behaviour per test. The single-process
tests run here, in the test process.
"""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

import distributed_workers as workers
from trinity_stream_saver import DistributedSaveError, plan_shards, save_model_streaming
from trinity_stream_saver.distributed import assign_files

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch is built without torch.distributed"
)

# Longer than a gloo timeout (workers.TIMEOUT): a hang is seen as one.
WORLD_DEADLINE_S = 240

TOKENS = torch.arange(24).view(2, 12) % 256


def run_world(world: int, root, target=None, *args) -> list[dict]:
    """Spawns `world` ranks running `target(rank, world, root, *args)`
    (every scenario of that world size by default); returns each rank's
    records. Fails if a rank hangs or dies."""
    return workers.spawn_world(target or workers.run_rank, world, root, WORLD_DEADLINE_S, *args)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("world2")
    return root, run_world(2, root)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    root = tmp_path_factory.mktemp("world3")
    return root, run_world(3, root)


@pytest.fixture
def world(request, world_size):
    """The world of the test's world_size parameter: only that one is
    spawned when the test is selected alone."""
    return request.getfixturevalue(f"world{world_size}")


def scenario(world, name: str) -> list[dict]:
    """Each rank's record of a scenario; a scenario that crashed fails here."""
    records = [ranks[name] for ranks in world[1]]
    for rank, record in enumerate(records):
        assert "crashed" not in record, f"rank {rank}:\n{record['crashed']}"
    return records


def succeeded(world, name: str) -> list[dict]:
    records = scenario(world, name)
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank} raised {record['error']}"
    return records


def assert_loads_as_the_unsharded_model(folder, tied=False):
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(folder).eval()
    expected = workers.seeded_llama(tied)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, expected(TOKENS).logits)


def index_of(folder) -> dict:
    with open(os.path.join(folder, "model.safetensors.index.json")) as file:
        return json.load(file)


def assert_weight_map_is_the_hubs_split(folder, max_shard_size):
    split = huggingface_hub.split_torch_state_dict_into_shards(
        workers.seeded_llama().state_dict(), max_shard_size=max_shard_size
    )
    assert index_of(folder)["weight_map"] == split.tensor_to_filename


def files_on_disk(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


# --------------------------------------------------------------------------
# Round trip.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_llama_loads_with_from_pretrained_with_the_unsharded_models_logits(
    world_size, world
):
    records = succeeded(world, "fsdp_round_trip")
    folder = world[0] / "fsdp"
    assert {record["returned"] for record in records} == {str(folder / "model.safetensors.index.json")}
    assert_loads_as_the_unsharded_model(folder)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_weight_map_is_the_hubs_split_of_the_full_state_dict(world_size, world):
    succeeded(world, "fsdp_round_trip")
    assert_weight_map_is_the_hubs_split(world[0] / "fsdp", "100KB")


def test_fsdp2_folder_holds_the_config_of_the_model(world2):
    from transformers import LlamaConfig

    succeeded(world2, "fsdp_round_trip")
    config = LlamaConfig.from_pretrained(world2[0] / "fsdp")
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.hidden_size == 64 and config.num_hidden_layers == 2
    assert (world2[0] / "fsdp" / "generation_config.json").is_file()


def test_tied_weights_are_saved_once_under_the_first_name(world2):
    succeeded(world2, "fsdp_tied_bf16")
    saved = files_on_disk(world2[0] / "fsdp_tied_bf16")
    assert "lm_head.weight" not in saved
    assert "model.embed_tokens.weight" in saved
    assert "lm_head.weight" not in index_of(world2[0] / "fsdp_tied_bf16")["weight_map"]


def test_dtype_casts_every_floating_point_tensor_after_gathering(world2):
    succeeded(world2, "fsdp_tied_bf16")
    saved = files_on_disk(world2[0] / "fsdp_tied_bf16")
    expected = workers.seeded_llama(tied=True).state_dict()
    del expected["lm_head.weight"]
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert saved[name].dtype == torch.bfloat16, name
        assert torch.equal(saved[name], tensor.to(torch.bfloat16)), name
    with open(world2[0] / "fsdp_tied_bf16" / "config.json") as file:
        assert json.load(file)["dtype"] == "bfloat16"


def test_tied_model_loads_with_from_pretrained(world2):
    from transformers import LlamaForCausalLM

    succeeded(world2, "fsdp_tied_bf16")
    loaded = LlamaForCausalLM.from_pretrained(world2[0] / "fsdp_tied_bf16").eval()
    expected = workers.seeded_llama(tied=True).to(torch.bfloat16)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, expected.lm_head.weight)


# --------------------------------------------------------------------------
# Other sources.
# --------------------------------------------------------------------------


def test_tensor_parallel_shard1_dtensor_is_saved_whole(world2):
    records = succeeded(world2, "tensor_parallel_mapping")
    folder = world2[0] / "tp"
    assert all(record["returned"] == str(folder / "model.safetensors.index.json") for record in records)
    saved = files_on_disk(folder)
    assert saved.keys() == {"column_parallel.weight", "replicated.weight", "plain.bias"}
    assert torch.equal(saved["column_parallel.weight"], workers.full_tensor(1, (6, 10)))
    assert torch.equal(saved["replicated.weight"], workers.full_tensor(2, (4, 4)))
    assert torch.equal(saved["plain.bias"], workers.full_tensor(3, (5,)))


def test_state_dict_mapping_of_dtensors_saves_aliases_once_and_loads(world2):
    succeeded(world2, "fsdp_state_dict_mapping")
    folder = world2[0] / "mapping"
    assert "lm_head.weight" not in index_of(folder)["weight_map"]
    # A mapping is not a transformers model: no config; load into one.
    assert not (folder / "config.json").exists()
    expected = workers.seeded_llama(tied=True).state_dict()
    saved = files_on_disk(folder)
    assert saved.keys() == expected.keys() - {"lm_head.weight"}
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name


def test_writer_ranks_zero_writes_every_file_on_rank_zero(world2):
    records = succeeded(world2, "writer_rank_zero")
    folder = world2[0] / "writer0"
    files = set(index_of(folder)["weight_map"].values())
    assert sorted(records[0]["committed"]) == sorted(files)
    assert records[1]["committed"] == []
    assert_loads_as_the_unsharded_model(folder)


def test_a_piece_that_cannot_be_sent_in_place_is_gathered_on_every_rank(world2):
    records = succeeded(world2, "unsendable_piece")
    assert [record["contiguous"] for record in records] == [False, True]
    saved = files_on_disk(world2[0] / "unsendable")
    assert torch.equal(saved["rows"], workers.full_tensor(4, (6, 8)))
    assert torch.equal(saved["plain"], workers.full_tensor(5, (3,)))


def test_single_process_without_a_process_group_saves_a_from_pretrained_folder(tmp_path):
    assert not torch.distributed.is_initialized()
    written = save_model_streaming(workers.seeded_llama(), tmp_path, max_shard_size="100KB")
    assert written == str(tmp_path / "model.safetensors.index.json")
    assert_loads_as_the_unsharded_model(tmp_path)
    assert_weight_map_is_the_hubs_split(tmp_path, "100KB")


def test_single_process_progress_bar_counts_the_bytes_this_rank_writes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm", reason="progress=True needs tqdm")
    from trinity_stream_saver import _progress

    monkeypatch.setattr(_progress, "_stderr_is_a_terminal", lambda: True)  # a bar, as on a terminal
    state = {"a": torch.zeros(3 << 20, dtype=torch.uint8), "b": torch.zeros(5 << 20, dtype=torch.uint8)}
    save_model_streaming(state, tmp_path, max_shard_size="4MB", progress=True)
    assert "8.00M/8.00M" in capsys.readouterr().err


def test_single_process_small_model_is_one_file_with_its_config(tmp_path):
    written = save_model_streaming(workers.seeded_llama(tied=True), tmp_path)
    assert written == str(tmp_path / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_loads_as_the_unsharded_model(tmp_path, tied=True)


def test_single_process_mapping_keeps_integer_tensors_when_casting(tmp_path):
    state = {"weight": torch.randn(3, 4), "step": torch.tensor([7], dtype=torch.int64)}
    save_model_streaming(state, tmp_path, dtype=torch.float16)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["weight"].dtype == torch.float16 and torch.equal(saved["weight"], state["weight"].half())
    assert saved["step"].dtype == torch.int64 and torch.equal(saved["step"], state["step"])


def test_single_process_errors_are_raised_as_they_are(tmp_path):
    with pytest.raises(ValueError, match="'b' has dtype torch.complex128"):
        save_model_streaming({"b": torch.zeros(2, dtype=torch.complex128)}, tmp_path)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a mapping"):
        save_model_streaming([torch.zeros(2)], tmp_path)
    with pytest.raises(ValueError, match="writer_ranks holds 1"):
        save_model_streaming({"a": torch.zeros(2)}, tmp_path, writer_ranks=[1])
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# Work is shared.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_writes_the_files_assigned_to_it(world_size, world):
    records = succeeded(world, "fsdp_round_trip")
    files = index_of(world[0] / "fsdp")["weight_map"].values()
    assert len(set(files)) >= world_size
    plan = plan_shards([(n, t.dtype, t.shape) for n, t in workers.seeded_llama().state_dict().items()],
                       "100KB")
    assigned = assign_files(plan, list(range(world_size)))
    for rank, record in enumerate(records):
        assert assigned[rank], f"rank {rank} was assigned no file"
        assert sorted(record["committed"]) == sorted(assigned[rank]), rank


def test_assignment_balances_bytes_largest_file_first():
    plan = plan_shards([("a", "F32", [100]), ("b", "F32", [60]), ("c", "F32", [50]),
                        ("d", "F32", [40])], max_shard_size=300)
    assert [len(names) for names in plan.filename_to_tensors.values()] == [1, 1, 1, 1]
    files = list(plan.filename_to_tensors)
    # 400, 240, 200, 160 bytes: rank 0 takes 400, rank 1 240 then 200 then
    # (440 > 400) rank 0 takes 160.
    assert assign_files(plan, [0, 1]) == {0: [files[0], files[3]], 1: [files[1], files[2]]}


# --------------------------------------------------------------------------
# Memory.
# --------------------------------------------------------------------------


def test_per_rank_peak_memory_is_bounded_by_the_largest_parameter_not_the_model(world2):
    for rank, record in enumerate(succeeded(world2, "memory")):
        largest, model = record["largest_parameter_bytes"], record["model_bytes"]
        # The parameter received into one reused buffer, and allocator
        # slack; holding the state dict would be the model's 128 MiB.
        bound = largest + (16 << 20)
        assert bound < model / 4
        assert record["growth_bytes"] <= bound, (
            f"rank {rank} grew by {record['growth_bytes'] >> 20} MiB; largest parameter "
            f"{largest >> 20} MiB, model {model >> 20} MiB"
        )


def test_a_rank_that_writes_nothing_never_holds_a_whole_parameter(world2):
    # Pieces are sent from the parameters' own memory to the rank that
    # writes them; gathering on every rank would cost rank 1 a parameter.
    writer, sender = succeeded(world2, "memory_writer_rank_zero")
    largest = sender["largest_parameter_bytes"]
    assert sender["growth_bytes"] < largest // 4, f"rank 1 grew by {sender['growth_bytes'] >> 20} MiB"
    assert writer["growth_bytes"] <= largest + (16 << 20)
    assert writer["committed"] and sender["committed"] == []


# --------------------------------------------------------------------------
# Failure.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_failing_in_a_gather_raises_on_every_rank_naming_it(world_size, world):
    failing = world_size - 1
    for rank, record in enumerate(scenario(world, "failure_in_gather")):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert list(error["failures"]) == [str(failing)]
        assert f"rank {failing}: RuntimeError: injected failure in the third gather" in error["message"]
        assert record["committed"] == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_failing_leaves_the_folder_as_it_was(world_size, world):
    for record in scenario(world, "failure_in_gather"):
        assert record["after"] == record["before"]
        assert not any(name.endswith(".tmp") for name in record["after"])


def test_a_rank_failing_between_two_pieces_of_a_tensor_receives_only_the_missing_one(world3):
    records = scenario(world3, "failure_mid_receive")
    assert records[2]["injected"]
    for rank, record in enumerate(records):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert list(error["failures"]) == ["2"]
        assert "rank 2: RuntimeError: injected failure in the second receive" in error["message"]
        assert record["after"] == record["before"]
        # Far below the gloo timeout (workers.TIMEOUT, 60 s) that waiting
        # for a piece sent once, twice, would end at.
        assert record["seconds"] < workers.TIMEOUT.total_seconds() / 2, rank


def test_a_rank_failing_to_write_raises_on_every_rank_and_removes_every_temporary_file(world2):
    records = scenario(world2, "failure_in_write")
    for rank, record in enumerate(records):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert list(error["failures"]) == ["1"]
        assert "rank 1: IsADirectoryError" in error["message"]
        assert record["blocked"] + ".tmp" in error["message"]
        # The folder as it was: the old checkpoint, and the directory that
        # was in the way; the new files of rank 0 are gone.
        assert record["after"] == record["before"]
        assert record["committed"] == []


def assert_every_rank_raised_and_wrote_nothing(world, name: str, failing: list[str], *texts):
    """Every rank raised DistributedSaveError naming exactly the `failing`
    ranks, with each of `texts` in its message, and the empty folder the
    scenario saved into stayed empty."""
    for rank, record in enumerate(scenario(world, name)):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert sorted(error["failures"]) == failing
        for text in texts:
            assert text in error["message"]
        assert record["after"] == {}


def test_a_rank_with_an_unstorable_dtype_fails_every_rank_before_writing(world2):
    assert_every_rank_raised_and_wrote_nothing(
        world2, "failure_unstorable_dtype", ["1"],
        "rank 1: ValueError: tensor 'b' has dtype torch.complex128")


def test_ranks_whose_tensors_differ_fail_every_rank_before_writing(world2):
    assert_every_rank_raised_and_wrote_nothing(
        world2, "failure_differing_shapes", ["1"], "differ from rank 0's")


def test_a_piece_of_another_shape_than_shard_gives_fails_every_rank_naming_it(world2):
    assert_every_rank_raised_and_wrote_nothing(
        world2, "failure_wrong_piece", ["0", "1"], "tensor 'uneven'",
        "rank 0 holds a piece of shape [4, 3] where Shard(0) gives [3, 3]")


def test_ranks_that_shard_a_tensor_differently_fail_every_rank_before_writing(world2):
    assert_every_rank_raised_and_wrote_nothing(
        world2, "failure_differing_layouts", ["1"], "how they are sharded")


def test_a_rank_failing_after_sending_its_pieces_leaves_no_rank_waiting(world2):
    # Within the gloo timeout (60 s) the others would have raised a gloo
    # timeout instead of this error.
    assert_every_rank_raised_and_wrote_nothing(
        world2, "failure_after_sending", ["0"], "rank 0: OSError: injected: cannot open the files")


# --------------------------------------------------------------------------
# One folder.
# --------------------------------------------------------------------------


def test_ranks_given_different_folders_fail_every_rank_naming_the_folders(world2):
    root = world2[0]
    for rank, record in enumerate(scenario(world2, "differing_directories")):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert list(error["failures"]) == ["1"]
        assert f"its save_directory '{root / 'differing' / 'rank1'}' is not rank 0's " \
               f"'{root / 'differing' / 'rank0'}'" in error["message"]
        assert not record["exists"] and record["committed"] == []


def test_ranks_without_a_shared_folder_fail_naming_the_missing_shards_and_no_index_is_written(
    world2
):
    records = scenario(world2, "no_shared_filesystem")
    missing = records[1]["committed"]  # rank 1's files, absent from rank 0's folder
    assert missing
    for rank, record in enumerate(records):
        error = record["error"]
        assert error["type"] == "DistributedSaveError", rank
        assert list(error["failures"]) == ["0"]
        for name in missing:
            assert f"{name} (rank 1 wrote" in error["message"]
        assert "writer_ranks=[0]" in error["message"]
        assert "model.safetensors.index.json" not in record["files"]


def test_ranks_without_a_shared_folder_save_with_writer_rank_zero(world2):
    writer, other = succeeded(world2, "no_shared_filesystem_writer_rank_zero")
    assert "model.safetensors.index.json" in writer["files"]
    assert other["files"] is None  # a rank that writes nothing makes no folder


# --------------------------------------------------------------------------
# Casts.
# --------------------------------------------------------------------------


def test_dtype_keeps_float8_weights_as_they_are(tmp_path):
    state = {"weight": torch.randn(4, 4), "quantized": torch.randn(8).to(torch.float8_e4m3fn),
             "scale": torch.randn(1)}
    save_model_streaming(state, tmp_path, dtype=torch.bfloat16)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["quantized"].dtype == torch.float8_e4m3fn
    assert torch.equal(saved["quantized"].view(torch.uint8), state["quantized"].view(torch.uint8))
    assert saved["weight"].dtype == torch.bfloat16 and saved["scale"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn, torch.uint8],
                         ids=str)
def test_dtype_that_is_not_a_floating_dtype_of_16_bits_or_more_is_refused(tmp_path, dtype):
    with pytest.raises(ValueError, match=rf"dtype={dtype} is not a floating dtype of 16 bits"):
        save_model_streaming({"w": torch.randn(4)}, tmp_path, dtype=dtype)
    assert os.listdir(tmp_path) == []
