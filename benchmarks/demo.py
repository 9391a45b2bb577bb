"""The main job on a built-in default: stream a synthetic ~1 GiB bf16 model
to a temporary directory with trinity_stream_saver, check that the file
loads and is byte-identical to the pure-Python saver's, and show time,
throughput and peak memory next to the other ways of writing the same
tensors.

Each method runs in a fresh process (so that peak RSS, VmHWM read from
/proc/self/status, belongs to that method alone), methods interleaved over
several rounds; the table shows medians and the ratio to raw writing.

    python benchmarks/demo.py [--size-mib 1024] [--tensor-mib 64] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# The tensors and the methods are the side-by-side benchmark's (bench.py).
import methods  # noqa: E402
from peak_memory import memory_baseline, peak_kib  # noqa: E402
from scenarios import fresh_tensors, model_spec  # noqa: E402

METHODS = ("trinity_stream_saver", "pure_python_saver", "safetensors_save_file", "raw_os_write")


def saver_for(method: str):
    """The method as a function of (items, path, meta), imported up front so
    that import time is not counted as saving time."""
    return methods.METHODS[method].load({})


def tensors(spec):
    """Yields each tensor freshly made, as a training framework would hand it over."""
    return fresh_tensors({}, spec)


def run_method(method: str, spec, path: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline is taken)

    save = saver_for(method)
    meta = [(name, "BF16", list(shape)) for name, shape in spec]
    baseline_kib, _ = memory_baseline()
    start = time.perf_counter()
    save(tensors(spec), path, meta)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_growth_mib": (peak_kib() - baseline_kib) / 1024}


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str, reference_path: str, spec) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == {name for name, _ in spec}
        for index, (name, shape) in enumerate(spec):
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == shape, name
            assert bool((tensor == float(index % 7)).all()), name
    assert sha256(path) == sha256(reference_path), "file differs from the pure-Python saver's"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a new temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = model_spec(args.size_mib, args.tensor_mib)

    if args.child:
        print(json.dumps(run_method(args.child[0], spec, args.child[1])))
        return 0

    work = tempfile.mkdtemp(prefix="tss-demo-", dir=args.dir)
    total = sum(2 * _numel(shape) for _, shape in spec)
    print(f"{len(spec)} bf16 tensors, {total / 2**20:.0f} MiB, written to {work}, "
          f"{args.rounds} rounds, each method in a fresh process")
    results = {method: [] for method in METHODS}
    try:
        for _ in range(args.rounds):
            for method in METHODS:
                path = os.path.join(work, f"{method}.safetensors")
                # Every method starts from the same state: no file to replace
                # (replacing one makes ext4 flush it) and no dirty pages left
                # by the previous method to throttle this one's writes.
                for stale in (path, path + ".tmp"):
                    if os.path.exists(stale):
                        os.unlink(stale)
                os.sync()
                child = subprocess.run(
                    [sys.executable, __file__, "--size-mib", str(args.size_mib),
                     "--tensor-mib", str(args.tensor_mib), "--child", method, path],
                    check=True, capture_output=True, text=True,
                )
                results[method].append(json.loads(child.stdout.strip().splitlines()[-1]))
        verify(os.path.join(work, "trinity_stream_saver.safetensors"),
               os.path.join(work, "pure_python_saver.safetensors"), spec)
        print("verified: the file loads with safetensors, holds the right tensors, "
              "and is byte-identical to the pure-Python saver's\n")
        raw = statistics.median(r["seconds"] for r in results["raw_os_write"])
        print(f"| method | median time (s) | throughput (MiB/s) | vs raw | peak RSS growth (MiB) |")
        print(f"| --- | --- | --- | --- | --- |")
        for method in METHODS:
            seconds = statistics.median(r["seconds"] for r in results[method])
            rss = statistics.median(r["rss_growth_mib"] for r in results[method])
            print(f"| {method} | {seconds:.2f} | {total / 2**20 / seconds:.0f} | "
                  f"{seconds / raw:.2f}x | {rss:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


if __name__ == "__main__":
    sys.exit(main())
