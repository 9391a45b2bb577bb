"""One measured run: a method saving a scenario's tensors, in the fresh
process this script is started as. Prints one JSON line: the time, the time
spent producing (for producer scenarios), the peak RSS growth, and for this
project's methods whether the file verified.

    python benchmarks/measure.py '{"cfg": {...}, "method": "...", "path": "..."}'

Peak memory is VmHWM growth, read by peak_memory.py.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import methods  # noqa: E402
from peak_memory import memory_baseline, peak_kib  # noqa: E402
from scenarios import SCENARIOS, nbytes  # noqa: E402

MIB = 1 << 20


def timed(items, spent: list):
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


def verify_file(path: str, scenario, cfg: dict, spec) -> None:
    """The whole header (names, dtypes, shapes, offsets in yield order,
    file length) and the values of a few tensors, read with safetensors."""
    import torch
    from safetensors import safe_open

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    assert len(header) == len(spec), f"{len(header)} entries, expected {len(spec)}"
    offset = 0
    for name, shape in spec:
        entry = header[name]
        size = nbytes(shape)
        assert entry["dtype"] == "BF16" and tuple(entry["shape"]) == tuple(shape), (name, entry)
        assert entry["data_offsets"] == [offset, offset + size], (name, entry, offset)
        offset += size
    assert os.path.getsize(path) == 8 + length + offset, "file length does not match the header"

    count = len(spec)
    picks = {0, 1, count // 2, count - 2, count - 1}
    picks |= set(random.Random(count).sample(range(count), min(count, 5)))
    with safe_open(path, framework="pt") as f:
        for index in sorted(i for i in picks if 0 <= i < count):
            name, shape = spec[index]
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == tuple(shape), name
            expected = scenario.expected(cfg, index, shape)
            assert torch.equal(tensor, expected), f"{name}: wrong values"


def _remove_output(path: str) -> None:
    """Everything a save wrote in its run's directory (the file at path, or
    shards and an index beside it), before the next save."""
    folder = os.path.dirname(path)
    for name in os.listdir(folder):
        entry = os.path.join(folder, name)
        if os.path.isdir(entry):
            shutil.rmtree(entry)
        else:
            os.remove(entry)


def measure(cfg: dict, method_name: str, path: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline is taken)

    scenario = SCENARIOS[cfg["scenario"]]
    method = methods.method(method_name)
    save = method.load(cfg)
    spec = scenario.spec(cfg)
    meta = [(name, "BF16", list(shape)) for name, shape in spec]
    prepared = scenario.prepare(cfg, spec) if scenario.prepare else None
    gc.collect()
    baseline_kib, memory_source = memory_baseline()

    # A scenario may save again and again in this process, as a trainer
    # does: the first save pays for the process's first touch of memory,
    # so the time is the median of the others; the peak covers them all.
    times = []
    for save_index in range(cfg.get("saves", 1)):
        if save_index:
            _remove_output(path)
        produced = [0.0]
        items = scenario.produce(cfg, spec, prepared)
        if scenario.times_producer:
            items = timed(items, produced)
        start = time.perf_counter()
        extra = save(items, path, meta)
        times.append((time.perf_counter() - start, produced[0]))
        del items
    seconds, produced_s = statistics.median_low(times[1:] or times)
    peak = peak_kib()

    result = {
        "seconds": seconds,
        "rss_growth_mib": (peak - baseline_kib) / 1024,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak / 1024,
        "memory_source": memory_source,
    }
    if isinstance(extra, dict):
        result.update(extra)
    if scenario.times_producer:
        result["produce_s"] = produced_s
        result["write_s"] = seconds - produced_s
    if len(times) > 1:
        result["all_saves_s"] = [t for t, _ in times]
    if method.project:
        import trinity_stream_saver

        result["module"] = trinity_stream_saver.__file__
        # After the measurements, so that reading the file back costs
        # neither time nor memory in them.
        try:
            (scenario.verify or verify_file)(path, scenario, cfg, spec)
            result["verified"] = True
        except Exception as error:  # noqa: BLE001  (a wrong file fails the targets)
            result["verified"] = False
            result["verify_error"] = f"{type(error).__name__}: {error}"
    return result


def main() -> int:
    payload = json.loads(sys.argv[1])
    print(json.dumps(measure(payload["cfg"], payload["method"], payload["path"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
