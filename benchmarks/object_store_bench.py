"""Saving a checkpoint into S3: ours (streamed in order into multipart
uploads, nothing on local disk) against saving to local tmpfs and then
uploading with boto3's upload_file, and against writing through s3fs's
own file object. The producer takes time (a GPU copy, a gather), 0.1 s
per 16 MiB tensor by default, so a saver that streams can hide the upload
behind it.

The S3 server is moto's, started here as its own process on 127.0.0.1, so
that it does not share our interpreter's GIL. Methods run interleaved,
``--repeat`` times each; the table gives medians and ratios to
save-then-upload.

    .venv/bin/python benchmarks/object_store_bench.py --size-mib 384 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import torch

from trinity_stream_saver import save_safetensors_streaming

TENSOR = 16 << 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's server did not start")


def producer(count: int, seconds: float):
    """Yields `count` fresh 16 MiB tensors, each after `seconds` of work."""
    for i in range(count):
        tensor = torch.empty([TENSOR // 4], dtype=torch.float32).fill_(float(i))
        time.sleep(seconds)  # the GPU copy or collective the producer waits for
        yield f"layer.{i}.weight", tensor


def meta(count: int):
    return [(f"layer.{i}.weight", "F32", [TENSOR // 4]) for i in range(count)]


CONCURRENCY = 4
PART_SIZE = 64 << 20


def ours(client, bucket, count, seconds):
    save_safetensors_streaming(
        producer(count, seconds), f"s3://{bucket}/ours.safetensors", meta(count),
        part_size=PART_SIZE, concurrency=CONCURRENCY,
    )


def save_then_upload(client, bucket, count, seconds):
    from boto3.s3.transfer import TransferConfig

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        path = os.path.join(folder, "model.safetensors")
        save_safetensors_streaming(producer(count, seconds), path, meta(count))
        client.upload_file(path, bucket, "staged.safetensors", Config=TransferConfig())


def s3fs_file(client, bucket, count, seconds):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    rows = meta(count)
    header = {}
    offset = 0
    for name, dtype, shape in rows:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + TENSOR]}
        offset += TENSOR
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with fs.open(f"{bucket}/s3fs.safetensors", "wb", block_size=64 << 20) as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for _, tensor in producer(count, seconds):
            file.write(memoryview(tensor.numpy()).cast("B"))


METHODS = {"ours": ours, "save-then-upload": save_then_upload, "s3fs file": s3fs_file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=384)
    parser.add_argument("--seconds-per-tensor", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="ours: parts uploading at once")
    parser.add_argument("--part-mib", type=int, default=64, help="ours: part size in MiB")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    global CONCURRENCY, PART_SIZE
    CONCURRENCY, PART_SIZE = args.concurrency, args.part_mib << 20
    count = args.size_mib * (1 << 20) // TENSOR
    port = free_port()
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    })
    server = start_moto(port)
    try:
        import boto3

        client = boto3.client("s3")
        bucket = "bench"
        client.create_bucket(Bucket=bucket)
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        for _ in range(args.repeat):
            for name, method in METHODS.items():
                start = time.perf_counter()
                method(client, bucket, count, args.seconds_per_tensor)
                times[name].append(time.perf_counter() - start)
        sizes = {
            entry["Key"]: entry["Size"] for entry in client.list_objects_v2(Bucket=bucket)["Contents"]
        }
    finally:
        server.kill()
    produce = count * args.seconds_per_tensor
    baseline = statistics.median(times["save-then-upload"])
    print(f"{args.size_mib} MiB in {count} tensors, producer {produce:.1f} s; objects: {sizes}")
    print(f"{'method':<18}{'median s':>10}{'runs':>24}{'vs save-then-upload':>22}")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:<18}{median:>10.2f}{' '.join(f'{t:.2f}' for t in runs):>24}{median / baseline:>21.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"size_mib": args.size_mib, "producer_s": produce,
                       "concurrency": args.concurrency, "part_mib": args.part_mib, "times": times}, out, indent=1)


if __name__ == "__main__":
    main()
