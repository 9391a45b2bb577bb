"""save_model_streaming into object storage (an S3 prefix on moto's server
on 127.0.0.1): in this process, and on two gloo ranks that each upload
their own shards, the first writer publishing the index and config.json
once both have succeeded. Checked byte for byte against a local save of
the same model; a failure on one rank leaves the older checkpoint
byte-identical with no pending multipart upload."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
import torch

from conftest import read_bytes, tiny_model
from s3_helpers import bucket, moto_endpoint, s3_environment  # noqa: F401 (fixtures)

boto3 = pytest.importorskip("boto3", reason="object-storage tests need boto3 (requirements-dev.txt)")

from trinity_stream_saver import save_model_streaming  # noqa: E402

PART = 5 << 20


def folder_objects(folder, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{name}": read_bytes(os.path.join(folder, name)) for name in os.listdir(folder)}


# ---- in this process --------------------------------------------------------


def test_a_model_saved_to_s3_is_the_local_save_with_its_config(bucket, tmp_path):
    model = tiny_model()
    save_model_streaming(model, tmp_path / "local", max_shard_size="100KB")
    returned = save_model_streaming(model, bucket.url("run"), max_shard_size="100KB",
                                    part_size=PART, concurrency=2)
    expected = folder_objects(tmp_path / "local", "run")
    assert "run/config.json" in expected and len(expected) > 4
    assert returned == bucket.url("run/model.safetensors.index.json")
    assert bucket.objects() == expected
    assert bucket.pending_uploads() == []


@pytest.mark.parametrize("bound", [None, 64 << 10], ids=["full", "bounded"])
def test_an_asynchronous_save_to_s3_is_the_model_at_the_call(bucket, tmp_path, bound):
    from trinity_stream_saver import save_model_streaming_async

    model = tiny_model()
    save_model_streaming(model, tmp_path / "local", max_shard_size="100KB")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    future = save_model_streaming_async(model, bucket.url("run"), max_shard_size="100KB",
                                        part_size=PART, concurrency=2, max_staging_bytes=bound,
                                        optimizer=optimizer)
    for _ in range(3):  # training goes on while the objects are uploaded
        optimizer.zero_grad()
        model(input_ids=torch.arange(12).view(1, 12)).logits.square().mean().backward()
        optimizer.step()
    assert future.result(60) == bucket.url("run/model.safetensors.index.json")
    assert bucket.objects() == folder_objects(tmp_path / "local", "run")
    assert bucket.pending_uploads() == []


ENDS_DURING_THE_UPLOAD = """
import sys, time, torch
from trinity_stream_saver import save_model_streaming_async
from trinity_stream_saver import _async_work

def slowly(items):  # the upload is still running when the script ends
    for item in items:
        time.sleep(0.05)
        yield item

_async_work._feed_writer = slowly
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
save_model_streaming_async(model, sys.argv[1], max_shard_size="300KB", part_size=5 << 20,
                           max_staging_bytes=None if sys.argv[2] == "full" else 1 << 16)
print("END", flush=True)
"""


@pytest.mark.parametrize("mode", ["full", "bounded"])
def test_an_asynchronous_save_to_s3_running_when_the_script_ends_is_finished(bucket, tmp_path,
                                                                            mode):
    from conftest import run_python

    result = run_python(ENDS_DURING_THE_UPLOAD, bucket.url("run"), mode, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "END" in result.stdout
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    save_model_streaming(model, tmp_path / "local", max_shard_size="300KB")
    assert bucket.objects() == folder_objects(tmp_path / "local", "run")
    assert bucket.pending_uploads() == []


def test_an_asynchronous_save_failing_after_the_script_ended_exits_non_zero(bucket):
    from conftest import run_python

    # The bucket is gone before the background save uploads anything.
    code = ENDS_DURING_THE_UPLOAD.replace(
        'print("END", flush=True)',
        'import boto3; boto3.client("s3").delete_bucket(Bucket=sys.argv[1].split("/")[2])\n'
        'print("END", flush=True)')
    result = run_python(code, bucket.url("run"), "full", timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "still running when the program ended, failed" in result.stderr, result.stderr


def test_a_model_save_failing_while_uploading_keeps_the_older_checkpoint(bucket):
    import functools
    import inspect

    from object_store_workers import failing_after_two_tensors
    from trinity_stream_saver.distributed.save import _save
    from trinity_stream_saver.distributed.transport import PointToPoint

    save_model_streaming(tiny_model(seed=1), bucket.url("run"), max_shard_size="100KB")
    old = bucket.objects()
    storage = functools.partial(failing_after_two_tensors(), storage_options=None,
                                part_size=PART, concurrency=2)
    call = inspect.signature(_save).bind_partial(
        max_shard_size="100KB", filename_pattern="model{suffix}.safetensors", metadata=None,
        dtype=None, fsync=False, process_group=None, writer_ranks=None, progress=False)
    with pytest.raises(RuntimeError, match="injected: the upload failed"):
        _save(tiny_model(), bucket.url("run"), PointToPoint, storage, **call.kwargs)
    assert bucket.objects() == old
    assert bucket.pending_uploads() == []


def test_a_model_save_to_an_unknown_protocol_is_an_error_and_never_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="protocol 'nosuchstore' is not known"):
        save_model_streaming({"w": torch.ones(3)}, "nosuchstore://bucket/ckpt")
    assert os.listdir(tmp_path) == []


def test_storage_options_for_a_local_model_save_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="storage_options applies to URLs"):
        save_model_streaming({"w": torch.ones(3)}, tmp_path / "ckpt", storage_options={"key": "k"})
    assert not (tmp_path / "ckpt").exists()


# ---- on two gloo ranks ------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, moto_endpoint):
    """Two ranks running object_store_workers.round_trip_then_failure
    against a new bucket; (bucket name, each rank's record)."""
    import object_store_workers as workers
    from test_distributed import run_world

    root = tmp_path_factory.mktemp("s3_world2")
    environment = s3_environment(moto_endpoint)
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # the spawned ranks inherit it
    try:
        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=name)
        records = run_world(2, root, workers.run_rank, name)
        for rank, record in enumerate(records):
            assert "crashed" not in record, f"rank {rank}:\n{record['crashed']}"
        return name, records
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sha256_of_folder(folder, prefix: str) -> dict[str, str]:
    return {key: hashlib.sha256(data).hexdigest() for key, data in folder_objects(folder, prefix).items()}


@pytest.mark.slow
def test_two_ranks_upload_the_objects_of_a_local_save_and_delete_the_older_checkpoints(
        two_ranks, tmp_path):
    name, records = two_ranks
    for rank, record in enumerate(records):
        assert "error" not in record, f"rank {rank}: {record['error']}"
        assert record["returned"] == f"s3://{name}/ckpt/model.safetensors.index.json"
    save_model_streaming(tiny_model(), tmp_path / "local", max_shard_size="100KB")
    expected = sha256_of_folder(tmp_path / "local", "ckpt")
    expected["ckpt/notes.txt"] = hashlib.sha256(b"the user's").hexdigest()
    # The older single file is gone: the new index does not name it.
    assert "ckpt/model.safetensors" not in expected
    assert records[0]["after_round_trip"] == expected


@pytest.mark.slow
def test_a_rank_failing_while_uploading_aborts_every_ranks_uploads_and_keeps_the_older_checkpoint(
        two_ranks):
    _, records = two_ranks
    for rank, record in enumerate(records):
        failure = record["failure"]
        assert failure["error"]["type"] == "DistributedSaveError", failure
        assert list(failure["error"]["failures"]) == ["1"]
        assert "injected: the upload failed" in failure["error"]["message"]
        assert failure["after"] == record["after_round_trip"]
        assert failure["pending"] == []


def test_a_rank_killed_during_an_asynchronous_upload_leaves_no_pending_upload(bucket, tmp_path):
    import multiprocessing

    from object_store_workers import peer_dies_during_an_asynchronous_upload

    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=peer_dies_during_an_asynchronous_upload,
                             args=(rank, 2, str(tmp_path), bucket.name)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(180)
    assert [process.exitcode for process in ranks] == [0, -9]
    with open(tmp_path / "rank0.json") as file:
        survivor = json.load(file)
    assert "crashed" not in survivor, survivor.get("crashed")
    assert survivor.get("error_type") == "DistributedSaveError", survivor
    assert "another rank has probably died" in survivor["error"], survivor["error"]
    assert survivor["seconds"] < 60  # not the process group's timeout
    # Only the killed rank's own uploads may remain (nothing can abort
    # them); the survivor aborted every one of its own.
    assert survivor["objects"] == []
    began = [set((tmp_path / f"started{rank}.txt").read_text().split()) for rank in range(2)]
    assert began[0], "the survivor had begun no upload: the kill came too early to test"
    assert not began[0] & set(survivor["pending"]), survivor["pending"]
    assert set(survivor["pending"]) <= began[1]
