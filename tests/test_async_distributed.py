"""save_model_streaming_async across ranks: spawned CPU processes on gloo,
an FSDP2 Llama trained while its checkpoint is written. Each world size
runs every scenario of async_distributed_workers once; the tests check the
records and the folders they left. Every checkpoint is compared byte for
byte with save_model_streaming's of the state at the call."""

from __future__ import annotations

import os

import pytest

import async_distributed_workers as async_workers
import distributed_workers as workers

pytestmark = pytest.mark.slow  # spawns processes

WORLD_DEADLINE_S = 240


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_world2")
    return root, workers.spawn_world(async_workers.run_rank, 2, root, WORLD_DEADLINE_S)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_world3")
    return root, workers.spawn_world(async_workers.run_rank, 3, root, WORLD_DEADLINE_S)


def records(world, name: str) -> list[dict]:
    found = [ranks[name] for ranks in world[1]]
    for rank, record in enumerate(found):
        assert "crashed" not in record, f"rank {rank}:\n{record['crashed']}"
    return found


def assert_succeeded(record: dict, rank: int) -> None:
    assert "error" not in record, f"rank {rank}: {record['error']}"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("mode", ["snapshot", "bounded_snapshot"])
def test_the_checkpoint_is_the_model_at_the_call_while_the_ranks_train(world_size, mode, request):
    world = request.getfixturevalue(f"world{world_size}")
    root = world[0] / mode
    for rank, record in enumerate(records(world, f"{mode}_while_training")):
        assert_succeeded(record, rank)
        assert record["returned"] == str(root / "async" / "model.safetensors.index.json")
        assert record["returned_before_write"], f"rank {rank}: the call waited for the write"
        # optimizer=: no step ran before the snapshot (the held writer
        # delays it until a second after the call with bounded staging).
        assert record["snapshot_taken_at_steps"] == [True] * 3, record
    expected = folder_bytes(root / "expected")
    assert folder_bytes(root / "async") == expected
    # The three steps changed the weights: the test would see a save that
    # read the trained model.
    after = folder_bytes(root / "after")
    assert any(after[name] != expected[name] for name in expected if name.endswith(".safetensors"))


def test_tensor_parallel_replicated_and_plain_tensors_are_the_synchronous_files(world2):
    for rank, record in enumerate(records(world2, "tensor_parallel_and_replicated")):
        assert_succeeded(record, rank)
    root = world2[0] / "tp"
    assert folder_bytes(root / "async") == folder_bytes(root / "expected")


def test_a_writer_failure_on_one_rank_fails_every_future_and_keeps_the_older_checkpoint(world2):
    for rank, record in enumerate(records(world2, "failure_on_one_rank")):
        assert record["error"]["type"] == "DistributedSaveError", record
        assert list(record["error"]["failures"]) == ["1"], record
        assert "No space left on device" in record["error"]["failures"]["1"]
        assert record["after"] == record["before"], "the older checkpoint changed"


def test_an_error_at_the_call_on_one_rank_fails_every_future_at_once(world2):
    for rank, record in enumerate(records(world2, "call_error_on_one_rank")):
        assert record["done_at_return"], f"rank {rank} started a save"
        assert record["error"]["type"] == "DistributedSaveError", record
        assert list(record["error"]["failures"]) == ["1"], record
        assert "int8" in record["error"]["failures"]["1"]
    assert not (world2[0] / "call_error").exists()


@pytest.mark.parametrize("name", ["abort", "bounded_abort"])
def test_a_save_stopped_on_one_rank_publishes_nothing(world2, name):
    for rank, record in enumerate(records(world2, f"{name}_on_one_rank")):
        assert record["error"]["type"] == "DistributedSaveError", record
        assert "interrupted" in record["error"]["failures"]["1"], record
    folder = world2[0] / name
    assert not folder.exists() or os.listdir(folder) == []


def test_bounded_staging_fails_every_rank_when_a_step_runs_before_the_snapshot(world2):
    for rank, record in enumerate(records(world2, "bounded_step_too_early")):
        assert record["error"]["type"] == "DistributedSaveError", record
        assert "modified in place" in record["error"]["message"], record
    folder = world2[0] / "too_early"
    assert not folder.exists() or os.listdir(folder) == []


def test_a_busy_folder_fails_at_once_and_another_folder_waits_for_the_memory(world2):
    root = world2[0] / "queue"
    for rank, record in enumerate(records(world2, "busy_folder_and_queue")):
        assert_succeeded(record["first"], rank)
        assert_succeeded(record["third"], rank)
        assert record["busy_done_at_return"], f"rank {rank}: the busy save did not fail at once"
        assert record["busy"]["error"]["type"] == "DistributedSaveError"
        assert "still running" in record["busy"]["error"]["message"]
        assert record["first_done_when_third_returned"], (
            f"rank {rank}: the third save staged while the first still held the memory")
    expected = folder_bytes(root / "expected")
    assert folder_bytes(root / "first") == expected
    assert folder_bytes(root / "third") == expected


def test_a_two_dimensional_mesh_is_an_error_at_the_call_naming_the_tensor(world2):
    for rank, record in enumerate(records(world2, "two_dimensional_mesh")):
        assert record["done_at_return"], f"rank {rank} started a save"
        assert record["error"]["type"] == "DistributedSaveError", record
        assert "'grid.weight'" in record["error"]["message"]
        assert "save_model_streaming" in record["error"]["message"]
    assert not (world2[0] / "mesh2d").exists()
