"""How long an asynchronous save stalls a training loop, and the memory it
adds: save_model_streaming_async (full and bounded staging) against our
synchronous save_model_streaming and torch.distributed.checkpoint's
async_save, in one run, interleaved, repeated.

    python benchmarks/async_bench.py [--repeats 3] [--dir /dev/shm/async-bench]
        [--max-staging-bytes 32MiB] [--threads 1] [--json out.json]

Each measured run is a fresh process (so that VmHWM is the run's own): it
builds a 256 MiB fp32 MLP (16 Linear(2048, 2048)), trains it with SGD on
CPU, then saves twice while training goes on: the first save allocates any
staging memory, the second shows the steady state of a loop that saves
periodically. For each save:

- blocked: the save call, plus the time the optimizer's step pre-hook
  waited for the snapshot (bounded staging), i.e. the time the loop stood
  still because of the save;
- step time during the background write, against the steps before it;
- peak: VmHWM growth over both saves, from just before the first.

Targets (medians over the repeats, second save): full staging blocks no
longer than dcp.async_save and at most 0.6x our synchronous save; bounded
staging's call returns within 50 ms; peak memory of full staging at most
the model + 64 MiB, of bounded staging at most max_staging_bytes + the
largest tensor + 48 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import memory_baseline, peak_kib  # noqa: E402

MIB = 1 << 20
LAYERS, WIDTH = 16, 2048
METHODS = ["async_full", "async_bounded", "sync", "dcp_async"]


def _dcp_writer(folder: str):
    """DCP's Hugging Face storage writer where this torch has it, else its
    default FileSystemWriter; and which one."""
    import torch.distributed.checkpoint as dcp

    writer = getattr(dcp, "HuggingFaceStorageWriter", None)
    if writer is not None:
        return writer(path=folder), "HuggingFaceStorageWriter"
    return dcp.FileSystemWriter(folder), "FileSystemWriter"


def measure(method: str, folder: str, max_staging_bytes: int, threads: int) -> dict:
    """One fresh process: train, save twice during training, report."""
    import torch

    torch.set_num_threads(threads)
    from trinity_stream_saver import save_model_streaming, save_model_streaming_async

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    data = torch.randn(4, WIDTH)  # a short step: several fall within one save
    model_bytes = sum(p.nbytes for p in model.parameters())
    largest = max(p.nbytes for p in model.parameters())

    def step() -> None:
        # Gradients are kept (set_to_none=False): allocated once, before the
        # peak is measured, so that the peak is the save's.
        optimizer.zero_grad(set_to_none=False)
        model(data).square().mean().backward()
        optimizer.step()

    for _ in range(3):
        step()
    before = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        before.append(time.perf_counter() - start)

    # The time the save's step pre-hook waits: between a hook registered
    # before the save's and one registered after it.
    marks = {}

    def mark(key: str):
        def hook(*_) -> None:  # a pre-hook that returns something replaces step()'s arguments
            marks.setdefault(key, time.perf_counter())
        return hook

    optimizer.register_step_pre_hook(mark("before"))
    writer_name = None
    baseline_kib, _ = memory_baseline()
    saves = []
    for index in range(2):
        target = os.path.join(folder, str(index))
        marks.clear()
        start = time.perf_counter()
        if method == "sync":
            save_model_streaming(model, target)
            future = None
        elif method == "dcp_async":
            import torch.distributed.checkpoint as dcp

            writer, writer_name = _dcp_writer(target)
            future = dcp.async_save(model.state_dict(), storage_writer=writer, no_dist=True)
            future = getattr(future, "upload_completion", future)
        else:
            bound = None if method == "async_full" else max_staging_bytes
            future = save_model_streaming_async(model, target, max_staging_bytes=bound,
                                                optimizer=optimizer)
        call = time.perf_counter() - start
        handle = optimizer.register_step_pre_hook(mark("after"))
        during = []
        while future is not None and not future.done():
            step_start = time.perf_counter()
            step()
            during.append(time.perf_counter() - step_start)
        if future is not None:
            future.result()
        total = time.perf_counter() - start
        handle.remove()
        hook_wait = marks["after"] - marks["before"] if "after" in marks and "before" in marks else 0.0
        saves.append({
            "call_s": call,
            "hook_wait_s": hook_wait,
            "blocked_s": call + hook_wait,
            "total_s": total,
            "steps_during": len(during),
            "step_during_s": statistics.median(during) if during else None,
        })
    peak_mib = (peak_kib() - baseline_kib) / 1024
    return {
        "method": method,
        "saves": saves,
        "step_before_s": statistics.median(before),
        "peak_growth_mib": peak_mib,
        "model_mib": model_bytes / MIB,
        "largest_mib": largest / MIB,
        "max_staging_mib": max_staging_bytes / MIB,
        "dcp_writer": writer_name,
    }


def _run_child(method: str, folder: str, max_staging_bytes: int, threads: int) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    output = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", method, "--dir", folder,
         "--max-staging-bytes", str(max_staging_bytes), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(output.strip().splitlines()[-1])


def _median(runs: list[dict], save: int, key: str) -> float:
    values = [run["saves"][save][key] for run in runs if run["saves"][save][key] is not None]
    return statistics.median(values) if values else float("nan")


def _targets(by_method: dict) -> list[tuple[str, bool]]:
    full, bounded = by_method["async_full"], by_method["async_bounded"]
    sync, dcp = by_method["sync"], by_method["dcp_async"]
    model = full[0]["model_mib"]
    largest = full[0]["largest_mib"]
    ring = bounded[0]["max_staging_mib"]
    full_blocked = _median(full, 1, "blocked_s")
    peak = lambda runs: statistics.median(run["peak_growth_mib"] for run in runs)  # noqa: E731
    return [
        (f"full staging blocks {full_blocked * 1e3:.0f} ms <= dcp.async_save's "
         f"{_median(dcp, 1, 'blocked_s') * 1e3:.0f} ms",
         full_blocked <= _median(dcp, 1, "blocked_s")),
        (f"full staging blocks {full_blocked / _median(sync, 1, 'blocked_s'):.2f}x our "
         "synchronous save (<= 0.6x)",
         full_blocked <= 0.6 * _median(sync, 1, "blocked_s")),
        (f"bounded staging's call returns in {_median(bounded, 1, 'call_s') * 1e3:.1f} ms "
         "(<= 50 ms)", _median(bounded, 1, "call_s") <= 0.050),
        (f"full staging peak {peak(full):.0f} MiB <= model {model:.0f} + 64 MiB",
         peak(full) <= model + 64),
        (f"bounded staging peak {peak(bounded):.0f} MiB <= ring {ring:.0f} + largest "
         f"{largest:.0f} + 48 MiB", peak(bounded) <= ring + largest + 48),
    ]


def _parse_bytes(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    for unit, size in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * size)
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm/async-bench")
    parser.add_argument("--max-staging-bytes", type=_parse_bytes, default=32 * MIB)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training loop (1: a short step on a shared host)")
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.dir, args.max_staging_bytes, args.threads)))
        return 0

    runs: dict[str, list] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        # Interleaved, the order turned each round: a slow patch of the
        # shared machine falls on every method alike.
        order = METHODS[repeat % len(METHODS):] + METHODS[: repeat % len(METHODS)]
        for method in order:
            runs[method].append(_run_child(method, os.path.join(args.dir, method),
                                           args.max_staging_bytes, args.threads))
            print(f"repeat {repeat + 1}/{args.repeats} {method}: " + json.dumps(runs[method][-1]),
                  file=sys.stderr)

    print(f"{LAYERS} x Linear({WIDTH}, {WIDTH}) fp32 ({runs['sync'][0]['model_mib']:.0f} MiB), "
          f"SGD, {args.threads} torch thread(s), CPU, {args.dir}; dcp.async_save with {runs['dcp_async'][0]['dcp_writer']}; "
          f"median of {args.repeats}")
    print(f"{'method':<15}{'save':>5}{'call ms':>9}{'hook ms':>9}{'blocked ms':>12}"
          f"{'total ms':>10}{'steps':>7}{'step ms':>9}{'peak MiB':>10}")
    for method, method_runs in runs.items():
        before = statistics.median(run["step_before_s"] for run in method_runs)
        peak = statistics.median(run["peak_growth_mib"] for run in method_runs)
        for save in range(2):
            step = _median(method_runs, save, "step_during_s")
            print(f"{method:<15}{save + 1:>5}{_median(method_runs, save, 'call_s') * 1e3:>9.1f}"
                  f"{_median(method_runs, save, 'hook_wait_s') * 1e3:>9.1f}"
                  f"{_median(method_runs, save, 'blocked_s') * 1e3:>12.1f}"
                  f"{_median(method_runs, save, 'total_s') * 1e3:>10.1f}"
                  f"{_median(method_runs, save, 'steps_during'):>7.0f}"
                  f"{step * 1e3:>9.1f}{peak:>10.0f}")
        print(f"{'':<15}step before the saves: {before * 1e3:.1f} ms")
    failed = 0
    for text, met in _targets(runs):
        print(f"{'met ' if met else 'MISSED'} {text}")
        failed += not met
    if args.json:
        with open(args.json, "w") as out:
            json.dump(runs, out, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
