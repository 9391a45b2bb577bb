"""Side-by-side benchmark of trinity_stream_saver against the other ways of
writing the same tensors (issue 3): time, throughput and peak memory in four
scenarios, with the issue's targets checked in the same run.

Scenarios (each tensor made as it is requested, identically for every method):
  large          1 GiB of 64 MiB bf16 matrices (plus small norm vectors)
  many_small     50,000 bf16 tensors of 1-4 KiB
  noncontig      1 GiB of transposed (non-contiguous) 64 MiB bf16 matrices
  slow_producer  2 GiB of 64 MiB bf16 matrices, each taking about as long to
                 produce as to write: a calibrated wait (which releases the
                 GIL, as a GPU-to-CPU copy or an FSDP gather does) for a copy
                 into one of two reused staging buffers, so that producing
                 costs no CPU, as with DMA into pinned memory
  gpu_producer   (needs CUDA; not run by default) bf16 matrices that live on
                 the GPU, each copied to the CPU with .cpu() as it is
                 requested: the real slow producer of a checkpoint

Methods:
  trinity_stream_saver   this project
  trinity_overlap        this project with overlap=True
  pure_python_saver      the original seek-back algorithm (tests/reference_saver.py)
  safetensors_save_file  safetensors.torch.save_file of the whole dict
  torch_save             torch.save of the whole dict
  raw_os_write           os.write of each tensor's own memory, no header: the
                         limit for one writer, and the baseline
  raw_contiguous         the same after .contiguous(): the non-contiguous baseline
  raw_pwrite_xN          raw writing with each tensor split over N threads that
                         pwrite disjoint pieces (issue 3 item 5; any N, e.g.
                         raw_pwrite_x16; not run by default)
  produce_only           make the tensors and drop them: the cost that every
                         method pays before writing a byte

Each method runs in a fresh process (so that peak RSS, read from the
operating system with ru_maxrss, belongs to it alone), methods interleaved
over several rounds in a rotating order, with the output files deleted and
os.sync() called before every run. The table shows medians and the ratio to
the scenario's baseline; the targets of issue 3 section 2 (and the memory
bound of section 4) are printed with PASS or FAIL. Every file this project
writes is checked: its header in full, a few tensors' values.

    python benchmarks/bench.py                      # all scenarios, ~5 minutes
    python benchmarks/bench.py --dir /dev/shm       # take the disk out
    python benchmarks/bench.py --scenarios large,slow_producer --rounds 5 --large-mib 4096
    python benchmarks/bench.py --scenarios gpu_producer --methods trinity_stream_saver,trinity_overlap
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib
import inspect
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# demo.py puts tests/ on sys.path, where the pure-Python saver lives.
import demo  # noqa: E402
from demo import model_spec, raw_write  # noqa: E402

SCENARIOS = ("large", "many_small", "noncontig", "slow_producer", "gpu_producer")
DEFAULT_SCENARIOS = SCENARIOS[:4]  # gpu_producer needs CUDA
METHODS = (
    "trinity_stream_saver",
    "trinity_overlap",
    "pure_python_saver",
    "safetensors_save_file",
    "torch_save",
    "raw_os_write",
    "raw_contiguous",
    "produce_only",
)
PROJECT_METHODS = ("trinity_stream_saver", "trinity_overlap")
LABELS = {
    "trinity_stream_saver": "trinity_stream_saver",
    "trinity_overlap": "trinity_stream_saver, overlap=True",
    "pure_python_saver": "pure-Python seek-back saver",
    "safetensors_save_file": "safetensors save_file (whole dict)",
    "torch_save": "torch.save (whole dict)",
    "raw_os_write": "raw os.write, no header",
    "raw_contiguous": "raw os.write of .contiguous()",
    "produce_only": "(produce only, no writing)",
}
# Raw writing split over N threads: raw_pwrite_x2, raw_pwrite_x16, ...
PWRITE_METHOD = re.compile(r"raw_pwrite_x([1-9][0-9]*)")
PIECE_BYTES = 8 << 20  # what each pwrite thread writes at a time


def label(method: str) -> str:
    threads = PWRITE_METHOD.fullmatch(method)
    if threads:
        return f"raw pwrite, each tensor over {threads.group(1)} threads"
    return LABELS[method]


def method_order(method: str) -> int:
    """Where a method's row goes: pwrite variants after raw_os_write."""
    threads = PWRITE_METHOD.fullmatch(method)
    if threads:
        return METHODS.index("raw_os_write") * 10_000 + int(threads.group(1))
    return METHODS.index(method) * 10_000
# A non-contiguous tensor's own memory is not in C order, so raw writing
# there means .contiguous() first.
BASELINE = {
    "large": "raw_os_write",
    "many_small": "raw_os_write",
    "noncontig": "raw_contiguous",
    "slow_producer": "raw_os_write",
    "gpu_producer": "raw_os_write",
}
# Scenarios whose baseline is max(produce, write) rather than raw's time.
PRODUCER_SCENARIOS = ("slow_producer", "gpu_producer")
MIB = 1 << 20


# --------------------------------------------------------------------------
# The tensors of each scenario. Generators never keep a tensor in a local
# across a yield, so that a streaming saver really holds one at a time.
# --------------------------------------------------------------------------


def matrix_spec(size_mib: int, tensor_mib: int) -> list[tuple[str, tuple[int, ...]]]:
    """bf16 matrices of tensor_mib each (4096 columns), size_mib in all."""
    cols = 4096
    rows = tensor_mib * MIB // (2 * cols)
    count = max(1, size_mib // tensor_mib)
    return [(f"model.layers.{i}.mlp.weight", (rows, cols)) for i in range(count)]


def small_spec(count: int, min_kib: int, max_kib: int) -> list[tuple[str, tuple[int, ...]]]:
    """count bf16 vectors whose sizes spread evenly over [min_kib, max_kib]."""
    low, high = min_kib * 512, max_kib * 512  # bf16 elements
    return [
        (f"model.layers.{i // 100}.experts.{i % 100}.bias", (low + (i * 7919) % (high - low + 1),))
        for i in range(count)
    ]


def build_spec(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    kind = cfg["scenario"]
    if kind == "large":
        return model_spec(cfg["size_mib"], cfg["tensor_mib"])
    if kind == "many_small":
        return small_spec(cfg["count"], cfg["min_kib"], cfg["max_kib"])
    if kind in ("noncontig", "slow_producer", "gpu_producer"):
        return matrix_spec(cfg["size_mib"], cfg["tensor_mib"])
    raise ValueError(f"unknown scenario {kind!r}")


def _pattern(index: int, cols: int):
    import torch

    # Integers below 256 are exact in bf16; a value per column makes a
    # transposition error visible, which a constant fill would hide.
    return ((torch.arange(cols) + index) % 251).to(torch.bfloat16)


def _transposed(index: int, shape: tuple[int, int]):
    import torch

    rows, cols = shape
    storage = torch.empty((cols, rows), dtype=torch.bfloat16)
    storage.copy_(_pattern(index, cols).unsqueeze(1).expand(cols, rows))
    return storage.t()


def _device_copies(spec, seconds_per_byte: float):
    """The slow producer: each tensor arrives after a wait proportional to
    its size (a device-to-host copy, a gather), in one of two staging
    buffers per shape that are reused, as frameworks reuse pinned buffers.
    The wait costs no CPU, so on any machine the best a saver can do is
    max(produce, write); a producer that filled fresh tensors on the CPU
    would compete with the writer for this machine's two cores."""
    import torch

    buffers = {}
    for index, (name, shape) in enumerate(spec):
        time.sleep(2 * math.prod(shape) * seconds_per_byte)
        key = (shape, index % 2)
        if key not in buffers:
            buffers[key] = torch.full(shape, float(index % 2), dtype=torch.bfloat16)
        yield name, buffers[key]


def gpu_sources(spec) -> list:
    """The gpu_producer's tensors, on the GPU before the save starts (made
    before the baseline RSS is read, as a trained model is there already)."""
    import torch

    return [torch.full(shape, float(index % 7), dtype=torch.bfloat16, device="cuda")
            for index, (_, shape) in enumerate(spec)]


def _copies_to_cpu(spec, sources):
    """Each GPU tensor copied to the CPU when it is requested, as checkpoint
    code does with .cpu() (or .full_tensor().cpu()): a device-to-host copy
    into fresh pageable memory, synchronous, with the GIL released."""
    for (name, _), source in zip(spec, sources):
        yield name, source.cpu()


def make_items(cfg: dict, spec, sources=None):
    """(name, tensor) pairs, each tensor made when it is requested."""
    if cfg["scenario"] == "gpu_producer":
        return _copies_to_cpu(spec, sources)
    if cfg["scenario"] == "noncontig":
        return ((name, _transposed(index, shape)) for index, (name, shape) in enumerate(spec))
    if cfg["scenario"] == "slow_producer":
        return _device_copies(spec, cfg.get("sleep_s_per_byte", 0.0))
    return demo.tensors(spec)


def expected_tensor(cfg: dict, index: int, shape):
    """What the file must hold for tensor number index, in C order."""
    import torch

    if cfg["scenario"] == "noncontig":
        rows, cols = shape
        return _pattern(index, cols).expand(rows, cols)
    if cfg["scenario"] == "slow_producer":
        return torch.full(shape, float(index % 2), dtype=torch.bfloat16)
    # large, gpu_producer
    return torch.full(shape, float(index % 7), dtype=torch.bfloat16)


def _timed(items, spent: list):
    """items, adding the time spent producing each one to spent[0]."""
    items = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        spent[0] += time.perf_counter() - start
        yield item
        del item  # before the next one is made


# --------------------------------------------------------------------------
# The methods, each a function of (items, path, meta).
# --------------------------------------------------------------------------


def produce_only(items, path, meta) -> None:
    for _, tensor in items:
        del tensor


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def raw_pwrite(items, path: str, meta, threads: int) -> None:
    """Raw writing with each tensor split into pieces that `threads` threads
    pwrite at disjoint offsets (os.pwrite releases the GIL): does splitting
    one tensor's write beat a single stream?"""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    offset = 0
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _, tensor in items:
                view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
                size = len(view)
                pieces = [pool.submit(_pwrite_all, fd, view[start:start + PIECE_BYTES],
                                      offset + start)
                          for start in range(0, size, PIECE_BYTES)]
                for piece in pieces:
                    piece.result()
                offset += size
                del tensor, view, pieces
    finally:
        os.close(fd)


def saver_for(method: str, scenario: str):
    """The method, imported up front so that import time is not counted."""
    if method in PROJECT_METHODS:
        from trinity_stream_saver import save_safetensors_streaming

        if method == "trinity_overlap":
            return functools.partial(save_safetensors_streaming, overlap=True)
        return save_safetensors_streaming
    if method == "safetensors_save_file" and scenario == "noncontig":
        from safetensors.torch import save_file

        # save_file refuses non-contiguous tensors and tells the user to
        # call .contiguous(), which is what a user would do.
        return lambda items, path, meta: save_file({n: t.contiguous() for n, t in items}, path)
    if method == "torch_save":
        import torch

        return lambda items, path, meta: torch.save(dict(items), path)
    if method == "raw_contiguous":
        return lambda items, path, meta: raw_write(((n, t.contiguous()) for n, t in items), path)
    if method == "produce_only":
        return produce_only
    threads = PWRITE_METHOD.fullmatch(method)
    if threads:
        return functools.partial(raw_pwrite, threads=int(threads.group(1)))
    return demo.saver_for(method)


def _vm_hwm_kib() -> int:
    """This process's own peak RSS from /proc: a cross-check of ru_maxrss,
    which also counts what the process inherited at exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_main(payload: dict) -> int:
    cfg, method, path = payload["cfg"], payload["method"], payload["path"]
    importlib.import_module("torch")  # before the baseline is taken

    save = saver_for(method, cfg["scenario"])
    spec = build_spec(cfg)
    meta = [(name, "BF16", list(shape)) for name, shape in spec]
    sources = gpu_sources(spec) if cfg["scenario"] == "gpu_producer" else None
    gc.collect()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    baseline_hwm_kib = _vm_hwm_kib()
    produced = [0.0]
    items = make_items(cfg, spec, sources)
    if cfg.get("time_producer"):
        items = _timed(items, produced)
    start = time.perf_counter()
    save(items, path, meta)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_hwm_kib = _vm_hwm_kib()
    result = {
        "seconds": seconds,
        "rss_growth_mib": (peak_kib - baseline_kib) / 1024,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "vm_hwm_growth_mib": (peak_hwm_kib - baseline_hwm_kib) / 1024,
    }
    if cfg.get("time_producer"):
        result["produce_s"] = produced[0]
        result["write_s"] = seconds - produced[0]
    if method in PROJECT_METHODS:
        import trinity_stream_saver

        result["module"] = trinity_stream_saver.__file__
        # After the measurements, so that reading the file back costs
        # neither time nor memory in them.
        try:
            verify(path, cfg)
            result["verified"] = True
        except Exception as error:  # noqa: BLE001  (a wrong file fails the targets)
            result["verified"] = False
            result["verify_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result))
    return 0


def probe_main() -> int:
    import trinity_stream_saver

    print(json.dumps({
        "module": trinity_stream_saver.__file__,
        "signature": str(inspect.signature(trinity_stream_saver.save_safetensors_streaming)),
    }))
    return 0


# --------------------------------------------------------------------------
# Running the children.
# --------------------------------------------------------------------------


def run_python(args: list[str]) -> dict:
    """Runs this script in a fresh process and returns its JSON line; a
    child that fails ends the benchmark, with the child's stderr shown.
    There is no retry: a crash is not timing noise, and a retry could hide
    an intermittent bug in the saver. This process itself stays small and
    never imports torch: a child started with vfork inherits its parent's
    peak RSS as its own ru_maxrss, which would hide the child's growth."""
    child = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{child.stderr.rstrip()}\nchild failed with exit status "
                         f"{child.returncode}: {__file__} {' '.join(args)}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def clear(directory: str) -> None:
    """Every run starts from the same state: no file to replace (replacing
    one makes ext4 flush it) and no dirty pages left by the previous run to
    throttle this one's writes."""
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.sync()


def run_method(cfg: dict, method: str, work: str) -> dict:
    path = os.path.join(work, f"{method}.safetensors")
    payload = json.dumps({"cfg": cfg, "method": method, "path": path})
    clear(work)
    result = run_python(["--child", payload])
    if os.path.exists(path):
        result["file_bytes"] = os.path.getsize(path)
    clear(work)
    return result


def verify(path: str, cfg: dict) -> None:
    """The whole header (names, dtypes, shapes, offsets in yield order,
    file length) and the values of a few tensors, read with safetensors."""
    import torch
    from safetensors import safe_open

    spec = build_spec(cfg)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    assert len(header) == len(spec), f"{len(header)} entries, expected {len(spec)}"
    offset = 0
    for name, shape in spec:
        entry = header[name]
        nbytes = 2 * math.prod(shape)
        assert entry["dtype"] == "BF16" and tuple(entry["shape"]) == tuple(shape), (name, entry)
        assert entry["data_offsets"] == [offset, offset + nbytes], (name, entry, offset)
        offset += nbytes
    assert os.path.getsize(path) == 8 + length + offset, "file length does not match the header"

    count = len(spec)
    picks = {0, 1, count // 2, count - 2, count - 1}
    picks |= set(random.Random(count).sample(range(count), min(count, 5)))
    with safe_open(path, framework="pt") as f:
        for index in sorted(i for i in picks if 0 <= i < count):
            name, shape = spec[index]
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == tuple(shape), name
            assert torch.equal(tensor, expected_tensor(cfg, index, shape)), f"{name}: wrong values"


# --------------------------------------------------------------------------
# Scenarios, targets and reports.
# --------------------------------------------------------------------------


def scenario_config(name: str, args) -> dict:
    if name == "large":
        return {"scenario": name, "size_mib": args.large_mib, "tensor_mib": args.large_tensor_mib}
    if name == "many_small":
        return {"scenario": name, "count": args.small_count,
                "min_kib": args.small_min_kib, "max_kib": args.small_max_kib}
    if name == "noncontig":
        return {"scenario": name, "size_mib": args.noncontig_mib,
                "tensor_mib": args.noncontig_tensor_mib}
    if name == "gpu_producer":
        return {"scenario": name, "size_mib": args.gpu_mib, "tensor_mib": args.gpu_tensor_mib,
                "time_producer": True}
    return {"scenario": name, "size_mib": args.slow_mib, "tensor_mib": args.slow_tensor_mib,
            "time_producer": True}


def describe(cfg: dict, spec) -> str:
    total = sum(2 * math.prod(s) for _, s in spec)
    if cfg["scenario"] == "many_small":
        what = f"{len(spec):,} bf16 tensors of {cfg['min_kib']}-{cfg['max_kib']} KiB"
    elif cfg["scenario"] == "large":
        big = sum(1 for _, s in spec if len(s) == 2)
        what = f"{big} bf16 matrices of {cfg['tensor_mib']} MiB + {len(spec) - big} norm vectors"
    elif cfg["scenario"] == "noncontig":
        what = f"{len(spec)} transposed bf16 matrices of {cfg['tensor_mib']} MiB"
    elif cfg["scenario"] == "gpu_producer":
        what = f"{len(spec)} bf16 matrices of {cfg['tensor_mib']} MiB copied from the GPU"
    else:
        what = f"{len(spec)} bf16 matrices of {cfg['tensor_mib']} MiB from a slow producer"
    return f"{what}, {total / MIB:,.1f} MiB in all"


def calibrate(cfg: dict, work: str, runs: int) -> dict:
    """Times raw writing of the slow producer's tensors, made at full speed,
    and picks the sleep that makes producing a tensor take as long as
    writing it."""
    fast = dict(cfg, sleep_s_per_byte=0.0)
    results = [run_method(fast, "raw_os_write", work) for _ in range(runs)]
    total = sum(2 * math.prod(s) for _, s in build_spec(cfg))
    produce = statistics.median(r["produce_s"] for r in results)
    write = statistics.median(r["write_s"] for r in results)
    return {
        "runs": results,
        "produce_s": produce,
        "write_s": write,
        "sleep_s_per_byte": max(0.0, write - produce) / total,
    }


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def summarise(name: str, cfg: dict, spec, results: dict) -> dict:
    total_bytes = sum(2 * math.prod(s) for _, s in spec)
    tensor_mib = max(2 * math.prod(s) for _, s in spec) / MIB
    base_method = BASELINE[name]
    base_runs = results.get(base_method, [])
    summary = {"total_mib": total_bytes / MIB, "tensor_mib": tensor_mib,
               "baseline_method": base_method, "methods": {}}
    if name in PRODUCER_SCENARIOS:
        produce = median_of(base_runs, "produce_s")
        write = median_of(base_runs, "write_s")
        summary["produce_s"], summary["write_s"] = produce, write
        baseline = max(produce, write) if produce is not None and write is not None else None
        summary["baseline_label"] = "max(produce, write)"
        summary["sleep_s"] = cfg.get("sleep_s_per_byte", 0.0) * total_bytes
    else:
        baseline = median_of(base_runs, "seconds")
        summary["baseline_label"] = base_method
    summary["baseline_s"] = baseline
    for method, runs in results.items():
        row = {"runs_s": [r["seconds"] for r in runs]}
        seconds = median_of(runs, "seconds")
        if seconds is not None:
            row["median_s"] = seconds
            row["best_s"] = min(row["runs_s"])
            row["throughput_mib_s"] = total_bytes / MIB / seconds
            row["ratio"] = seconds / baseline if baseline else None
            row["rss_growth_mib"] = median_of(runs, "rss_growth_mib")
            row["max_rss_growth_mib"] = max(r["rss_growth_mib"] for r in runs)
            row["baseline_rss_mib"] = median_of(runs, "baseline_rss_mib")
        if method in PROJECT_METHODS and seconds is not None:
            failures = [r.get("verify_error") for r in runs if r.get("verified") is False]
            row["verified"] = not failures
            if failures:
                row["verify_error"] = failures[-1]
        summary["methods"][method] = row
    summary["targets"] = targets(name, summary)
    return summary


def targets(name: str, summary: dict) -> list[dict]:
    """Issue 3's targets for this scenario: section 2 (time, memory) and
    section 4 (overlap holds at most one tensor beyond the one written)."""
    tensor = summary["tensor_mib"]
    checks = []

    def check(section, method, text, time_limit=None, memory_limit=None, memory_offset=0.0):
        row = summary["methods"].get(method)
        entry = {"section": section, "method": method, "target": text}
        if row is None or "median_s" not in row:
            entry.update(result="N/A", measured="not run")
        else:
            parts, ok = [], bool(row.get("verified", True))
            if time_limit is not None:
                ratio = row.get("ratio")
                parts.append(f"{ratio:.2f}x" if ratio else "no baseline")
                ok = ok and ratio is not None and ratio <= time_limit
            if memory_limit is not None:
                memory = row["max_rss_growth_mib"] - memory_offset
                parts.append(f"{memory:.0f} MiB")
                ok = ok and memory <= memory_limit
                producer = summary["methods"].get("produce_only", {}).get("max_rss_growth_mib")
                if producer is not None and not memory_offset:
                    # What the saver adds to what making the tensors costs anyway.
                    parts.append(f"{row['max_rss_growth_mib'] - producer:.0f} MiB above produce_only's")
            if not row.get("verified", True):
                parts.append("file did not verify")
            entry.update(result="PASS" if ok else "FAIL", measured=", ".join(parts))
        checks.append(entry)

    if name == "large":
        check("2", "trinity_stream_saver",
              f"time <= 1.10x raw, peak RSS growth <= one tensor + 16 MiB ({_size(tensor + 16)})",
              1.10, tensor + 16)
    elif name == "many_small":
        check("2", "trinity_stream_saver", "time <= 1.5x raw", 1.5)
    elif name == "noncontig":
        check("2", "trinity_stream_saver",
              f"time <= 1.6x raw of .contiguous(), peak RSS growth <= one tensor + 64 MiB "
              f"({_size(tensor + 64)})", 1.6, tensor + 64)
    elif name in PRODUCER_SCENARIOS:
        check("2", "trinity_overlap", "time <= 1.15x max(produce, write)", 1.15)
    default = summary["methods"].get("trinity_stream_saver", {}).get("max_rss_growth_mib")
    if default is not None and (name in PRODUCER_SCENARIOS or "trinity_overlap" in summary["methods"]):
        # Measured against the default mode's own peak, so that what both
        # modes hold besides tensors (the header, the meta) cancels out.
        check("4", "trinity_overlap",
              f"holds at most one tensor more than overlap=False: peak RSS growth minus "
              f"overlap=False's <= one tensor + 16 MiB ({_size(tensor + 16)})",
              memory_limit=tensor + 16, memory_offset=default)
    return checks


def _size(mib: float) -> str:
    if mib < 1:
        return f"{mib * 1024:.1f} KiB"
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def print_scenario(name: str, cfg: dict, spec, summary: dict) -> None:
    print(f"\n### {name}: {describe(cfg, spec)}; largest tensor {_size(summary['tensor_mib'])}")
    if name in PRODUCER_SCENARIOS:
        produce, write = summary.get("produce_s"), summary.get("write_s")
        if produce is not None:
            if name == "slow_producer":
                sleep = summary["sleep_s"]
                how = (f"{sleep:.2f} s of it asleep, {sleep / len(spec) * 1000:.1f} ms per "
                       f"tensor; the rest is making the tensors, on the CPU")
            else:
                how = "copying the tensors from the GPU with .cpu()"
            print(f"produce {produce:.2f} s ({how}), write {write:.2f} s (medians of raw's "
                  f"runs): max {max(produce, write):.2f} s, one after the other "
                  f"{produce + write:.2f} s")
            overlap = summary["methods"].get("trinity_overlap", {}).get("median_s")
            if overlap is not None and produce + write > max(produce, write):
                hidden = (produce + write - overlap) / min(produce, write)
                print(f"overlap=True hid {hidden:.0%} of the shorter of the two "
                      f"(100%: time = max, 0%: time = sum)")
    baseline = summary["baseline_label"]
    print(f"\n| method | median time (s) | vs {baseline} | throughput (MiB/s) "
          f"| peak RSS growth (MiB) | each round (s) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for method, row in summary["methods"].items():
        if "median_s" not in row:
            print(f"| {label(method)} | not run | | | | |")
            continue
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "n/a"
        rounds = ", ".join(f"{s:.2f}" for s in row["runs_s"])
        flag = "" if row.get("verified", True) else " (FILE DID NOT VERIFY)"
        print(f"| {label(method)}{flag} | {row['median_s']:.2f} | {ratio} | "
              f"{row['throughput_mib_s']:.0f} | {row['rss_growth_mib']:.0f} | {rounds} |")
    print()
    for entry in summary["targets"]:
        print(f"target (issue 3 section {entry['section']}), {label(entry['method'])}: "
              f"{entry['target']}: {entry['result']} ({entry['measured']})")
    for method in PROJECT_METHODS:
        row = summary["methods"].get(method, {})
        if row.get("verified"):
            print(f"verified: {label(method)}'s file (header in full, values of sampled tensors)")
        elif "verify_error" in row:
            print(f"NOT VERIFIED: {label(method)}: {row['verify_error']}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    # At least two panels wide, so that the title fits above one scenario.
    figure, axes = plt.subplots(2, len(names), figsize=(4.8 * max(2, len(names)), 8.5),
                                squeeze=False)
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for column, name in enumerate(names):
        summary = report["scenarios"][name]["summary"]
        rows = [(m, r) for m, r in summary["methods"].items() if "median_s" in r]
        labels = [label(m) for m, _ in rows]
        for line, (key, title, unit) in enumerate((
            ("throughput_mib_s", "throughput", "MiB/s"),
            ("rss_growth_mib", "peak RSS growth", "MiB"),
        )):
            ax = axes[line][column]
            values = [r[key] for _, r in rows]
            ax.barh(range(len(rows)), values,
                    color=[colours.get(m, colours["raw_os_write"]) for m, _ in rows])
            ax.set_yticks(range(len(rows)), labels if column == 0 else [""] * len(rows), fontsize=8)
            ax.invert_yaxis()
            for y, value in enumerate(values):
                ax.text(value, y, f" {value:,.0f}", va="center", fontsize=7)
            ax.set_xlabel(unit)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.margins(x=0.25)
            if key == "rss_growth_mib" and values and max(values) > 8 * max(1.0, min(values)):
                # One tensor next to a whole model: only a log scale shows both.
                ax.set_xscale("log")
                ax.set_xlim(left=1, right=max(values) * 4)
            limit = _target_line(name, summary, key)
            if limit:
                ax.axvline(limit[0], color="red", linestyle="--", linewidth=1)
                ax.text(limit[0], len(rows) - 0.4, f" {limit[1]}", color="red", fontsize=7)
    figure.suptitle(f"trinity_stream_saver benchmark: {report['dir_kind']}, "
                    f"{report['rounds']} rounds, medians; red: issue 3 target", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _target_line(name: str, summary: dict, key: str):
    """Where the target sits on a panel: the slowest allowed throughput or
    the largest allowed memory."""
    limit_ratio = {"large": 1.10, "many_small": 1.5, "noncontig": 1.6, "slow_producer": 1.15,
                   "gpu_producer": 1.15}[name]
    if key == "throughput_mib_s":
        if not summary.get("baseline_s"):
            return None
        return summary["total_mib"] / (limit_ratio * summary["baseline_s"]), f"{limit_ratio}x"
    extra = {"large": 16, "noncontig": 64}.get(name)
    if extra is None:
        return None
    return summary["tensor_mib"] + extra, f"tensor+{extra}"


def filesystem_of(path: str) -> str:
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def parse_list(text: str, allowed) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen
               if item not in allowed and not (allowed is METHODS and PWRITE_METHOD.fullmatch(item))]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def methods_for(name: str, chosen: list[str]) -> list[str]:
    wanted = sorted({m for m in chosen if m in METHODS or PWRITE_METHOD.fullmatch(m)}
                    | {BASELINE[name]}, key=method_order)
    if name == "noncontig":
        # A transposed tensor's own memory is not the file's bytes.
        wanted = [m for m in wanted if m != "raw_os_write"]
    else:
        wanted = [m for m in wanted if m != "raw_contiguous"]
    if name in PRODUCER_SCENARIOS:
        # Whole-dict savers produce everything before writing anything (and
        # would see the slow producer's reused staging buffers as shared
        # tensors).
        wanted = [m for m in wanted if m not in ("safetensors_save_file", "torch_save")]
    return wanted


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--dir", default=None,
                        help="where to write; a fresh folder is made inside it and removed "
                             "after (None: the temp dir; /dev/shm takes the disk out)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every method, interleaved")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unmeasured run of the baseline before each scenario")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset (the scenario's baseline always runs); "
                             "also raw_pwrite_xN for any N")
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--large-mib", type=int, default=1024, help="large: MiB in all")
    sizes.add_argument("--large-tensor-mib", type=int, default=64, help="large: MiB per matrix")
    sizes.add_argument("--small-count", type=int, default=50_000, help="many_small: tensors")
    sizes.add_argument("--small-min-kib", type=int, default=1, help="many_small: smallest tensor")
    sizes.add_argument("--small-max-kib", type=int, default=4, help="many_small: largest tensor")
    sizes.add_argument("--noncontig-mib", type=int, default=1024, help="noncontig: MiB in all")
    sizes.add_argument("--noncontig-tensor-mib", type=int, default=64,
                       help="noncontig: MiB per matrix")
    # 32 tensors: a pipeline of two stages cannot hide the first tensor's
    # production nor the last one's write, so with 16 tensors 1/16 of the
    # time (6%, of the 15% the target allows) would be lost whatever the saver.
    sizes.add_argument("--slow-mib", type=int, default=2048, help="slow_producer: MiB in all")
    sizes.add_argument("--slow-tensor-mib", type=int, default=64,
                       help="slow_producer: MiB per matrix")
    sizes.add_argument("--slow-sleep-ms", type=float, default=None,
                       help="slow_producer: sleep per largest tensor, instead of calibrating it")
    sizes.add_argument("--gpu-mib", type=int, default=4096, help="gpu_producer: MiB in all")
    sizes.add_argument("--gpu-tensor-mib", type=int, default=128,
                       help="gpu_producer: MiB per matrix")
    sizes.add_argument("--calibration-runs", type=int, default=3,
                       help="slow_producer: raw runs at full speed that set the sleep")
    parser.add_argument("--plot", default=os.path.join(HERE, "results.png"), help="PNG to write")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"),
                        help="every measurement, as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_scenario(name: str, args, work: str) -> dict:
    cfg = scenario_config(name, args)
    spec = build_spec(cfg)
    methods = methods_for(name, parse_list(args.methods, METHODS))
    entry = {"config": cfg, "load_before": os.getloadavg()}
    print(f"\n{name}: {describe(cfg, spec)}; {', '.join(methods)}", flush=True)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: "
              f"other work is running, times will be noisy)", flush=True)
    if name == "slow_producer":
        if args.slow_sleep_ms is not None:
            tensor_bytes = max(2 * math.prod(s) for _, s in spec)
            cfg["sleep_s_per_byte"] = args.slow_sleep_ms / 1000 / tensor_bytes
        else:
            calibration = calibrate(cfg, work, args.calibration_runs)
            entry["calibration"] = calibration
            cfg["sleep_s_per_byte"] = calibration["sleep_s_per_byte"]
            print(f"  calibrated at full speed: produce {calibration['produce_s']:.2f} s, "
                  f"write {calibration['write_s']:.2f} s", flush=True)
    if args.warmup:
        # The first write after a quiet spell pays for waking the file
        # system and the page cache up; no method should be charged for it.
        entry["warmup"] = run_method(cfg, BASELINE[name], work)
    results = {m: [] for m in methods}
    for round_index in range(args.rounds):
        # A rotating order, so that no method always runs first or right
        # after the same neighbour.
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            result = run_method(cfg, method, work)
            result["round"] = round_index
            results[method].append(result)
            print(f"  round {round_index + 1} {method}: {result['seconds']:.2f} s", flush=True)
    entry["load_after"] = os.getloadavg()
    entry["runs"] = results
    entry["summary"] = summarise(name, cfg, spec, results)
    print_scenario(name, cfg, spec, entry["summary"])
    return entry


def print_targets(report: dict) -> None:
    print("\n## Issue 3 targets in this run\n")
    print("| scenario | section | method | target | measured | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, entry in report["scenarios"].items():
        for check in entry["summary"]["targets"]:
            print(f"| {name} | {check['section']} | {label(check['method'])} | {check['target']} "
                  f"| {check['measured']} | {check['result']} |")


def main() -> int:
    args = parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.probe:
        return probe_main()

    scenarios = parse_list(args.scenarios, SCENARIOS)
    parse_list(args.methods, METHODS)
    if "gpu_producer" in scenarios:
        probe_cuda = subprocess.run([sys.executable, "-c", "import torch; "
                                     "raise SystemExit(not torch.cuda.is_available())"])
        if probe_cuda.returncode != 0:
            raise SystemExit("gpu_producer needs a CUDA device, and torch sees none here")
    probe = run_python(["--probe"])
    work = tempfile.mkdtemp(prefix="tss-bench-", dir=args.dir)
    started = time.monotonic()
    print(f"trinity_stream_saver from {probe['module']}")
    print(f"writing to {work} ({filesystem_of(work)}), {args.rounds} rounds, each method in a "
          f"fresh process, {os.cpu_count()} CPUs", flush=True)
    report = {
        "command": [sys.executable, *sys.argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "dir": work, "dir_kind": f"{os.path.dirname(work)} ({filesystem_of(work)})",
        "filesystem": filesystem_of(work), "rounds": args.rounds, "trinity": probe,
        "scenarios": {},
    }
    try:
        for name in scenarios:
            report["scenarios"][name] = run_scenario(name, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_targets(report)
    report["wall_s"] = time.monotonic() - started
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, args.plot)
    print(f"\nwall time {report['wall_s']:.0f} s; raw measurements in {args.json}, plot in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
