"""Ranks for test_object_store_model.py: two spawned processes on a gloo
process group that save the tiny Llama, sharded with FSDP2, into one S3
prefix of the moto server the test process runs (reached through the
standard AWS environment the ranks inherit). Each rank records what it
saw as JSON, for the test process to check; teardown as in
distributed_workers.run_rank."""

from __future__ import annotations

import hashlib
import json
import os
import traceback

import torch

from distributed_workers import TIMEOUT, fsdp_llama, save


def objects(bucket: str) -> dict[str, str]:
    """{key: sha256} of every object of the bucket."""
    import boto3

    client = boto3.client("s3")
    found = {}
    for entry in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        found[entry["Key"]] = hashlib.sha256(body).hexdigest()
    return found


def pending_uploads(bucket: str) -> list[str]:
    import boto3

    listing = boto3.client("s3").list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def failing_after_two_tensors():
    """Object storage whose writer fails after pulling two tensors, when
    this rank's uploads have begun."""
    from trinity_stream_saver.distributed.object_storage import ShardObjects

    class FailingObjects(ShardObjects):
        def write(self, items):
            def failing():
                for count, item in enumerate(items):
                    if count == 2:
                        raise RuntimeError("injected: the upload failed on this rank")
                    yield item

            super().write(failing())

    return FailingObjects


def round_trip_then_failure(rank, world, mesh, bucket):
    """Round trip: an older single-file checkpoint and a file of the user's
    are at the prefix; the FSDP2 Llama is saved there (max_shard_size
    100KB: several shards on each rank). Failure: a second save into the
    same prefix, of other weights, fails on the last rank after its first
    tensors, once the other rank has uploaded every part of its files."""
    import functools

    import boto3

    from trinity_stream_saver import save_model_streaming

    prefix = f"s3://{bucket}/ckpt"
    if rank == 0:
        client = boto3.client("s3")
        client.put_object(Bucket=bucket, Key="ckpt/model.safetensors", Body=b"an older checkpoint")
        client.put_object(Bucket=bucket, Key="ckpt/notes.txt", Body=b"the user's")
    torch.distributed.barrier()
    record = {}
    try:
        record["returned"] = save_model_streaming(fsdp_llama(mesh), prefix, max_shard_size="100KB")
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
    torch.distributed.barrier()
    record["after_round_trip"] = objects(bucket)

    from trinity_stream_saver.distributed.object_storage import object_storage

    storage = object_storage(None, 5 << 20, 2)
    if rank == world - 1:
        failing = failing_after_two_tensors()
        storage = functools.partial(failing, storage_options=None, part_size=5 << 20,
                                    concurrency=2)
    model = fsdp_llama(mesh)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.to_local().mul_(2)
    failure = {}
    save(failure, model, prefix, storage=storage, max_shard_size="100KB")
    torch.distributed.barrier()
    failure["after"] = objects(bucket)
    failure["pending"] = pending_uploads(bucket)
    record["failure"] = failure
    return record


def run_rank(rank: int, world: int, root: str, bucket: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cpu", (world,))
    try:
        result = round_trip_then_failure(rank, world, mesh, bucket)
    except Exception:
        result = {"crashed": traceback.format_exc()}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def peer_dies_during_an_asynchronous_upload(rank: int, world: int, root: str, bucket: str) -> None:
    """Two ranks save the FSDP2 Llama asynchronously into s3://bucket/ckpt;
    the last rank is SIGKILLed once its writer has pulled two tensors (its
    uploads begun). The survivor records how its Future ended and what
    uploads are pending once it has, then exits without a collective."""
    import signal
    import time

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from trinity_stream_saver import save_model_streaming_async
    from trinity_stream_saver import _async_work

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cpu", (world,))
    record = {}
    try:
        def slow_then_killed(items):
            for count, item in enumerate(items):
                if rank == world - 1 and count == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.05)  # both ranks' uploads are under way
                yield item

        _async_work._feed_writer = slow_then_killed
        from trinity_stream_saver import _object_save

        begin = _object_save._FileUpload.__init__

        def noted(self, save, key, *args):  # which uploads this rank began
            with open(os.path.join(root, f"started{rank}.txt"), "a") as started:
                started.write(key + "\n")
            begin(self, save, key, *args)

        _object_save._FileUpload.__init__ = noted
        future = save_model_streaming_async(fsdp_llama(mesh), f"s3://{bucket}/ckpt",
                                            max_shard_size="100KB", part_size=5 << 20,
                                            concurrency=2)
        started = time.monotonic()
        try:
            record["returned"] = future.result(120)
        except Exception as error:
            record["error_type"] = type(error).__name__
            record["error"] = str(error)
        record["seconds"] = time.monotonic() - started
        record["pending"] = pending_uploads(bucket)
        record["objects"] = sorted(objects(bucket))
    except Exception:
        record = {"crashed": traceback.format_exc()}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    os._exit(0)  # no teardown: the other rank is gone
