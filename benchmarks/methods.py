"""The ways of writing a scenario's tensors that the benchmark compares.
One record per method, in METHODS; raw_pwrite_xN for any N is made on
demand by method().

A method's load(cfg) imports what it needs and returns save(items, path,
meta), so that import time is not counted as saving time. save writes
path, or files beside it: each run has a directory of its own, and its
size is what the run wrote. save may return a dict of measurements that
the measuring process adds to the run's result, replacing its own: a
method that starts processes of its own (ranks) reports their time and
peak memory there, as "seconds" and "rss_growth_mib".

This module knows nothing of scenarios, timing or reports.
"""

from __future__ import annotations

import functools
import os
import queue
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")  # where the pure-Python saver lives

PIECE_BYTES = 8 << 20  # what each pwrite thread writes at a time
QUEUE_DEPTH = 8  # the threaded raw writer's hand-off, in tensors


def _bytes_of(tensor) -> memoryview:
    import torch

    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def raw_write(items, path: str) -> None:
    """The limit for one writer: each tensor's own memory straight to the
    file, no header, no copies."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _, tensor in items:
            _write_all(fd, _bytes_of(tensor))
            del tensor
    finally:
        os.close(fd)


def raw_queue_thread(items, path: str, depth: int = QUEUE_DEPTH) -> None:
    """Raw writing on a plain Python thread fed by a queue `depth` tensors
    deep, while this thread produces: what overlapping producing with
    writing can reach on this machine, with nothing but os.write (which
    releases the GIL)."""
    hand_off: queue.Queue = queue.Queue(maxsize=depth)
    failure: list = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def writer() -> None:
        try:
            while (tensor := hand_off.get()) is not None:
                _write_all(fd, _bytes_of(tensor))
                del tensor
        except BaseException as error:  # noqa: BLE001  (re-raised on the producing thread)
            failure.append(error)
            while hand_off.get() is not None:  # let the producer finish
                pass

    thread = threading.Thread(target=writer, name="raw-writer")
    thread.start()
    try:
        for _, tensor in items:
            hand_off.put(tensor)
            del tensor
    finally:
        hand_off.put(None)
        thread.join()
        os.close(fd)
    if failure:
        raise failure[0]


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def raw_pwrite(items, path: str, threads: int) -> None:
    """Raw writing with each tensor split into pieces that `threads` threads
    pwrite at disjoint offsets (os.pwrite releases the GIL): does splitting
    one tensor's write beat a single stream?"""
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    offset = 0
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _, tensor in items:
                view = _bytes_of(tensor)
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


def produce_only(items, path, meta) -> None:
    for _, tensor in items:
        del tensor


# --------------------------------------------------------------------------
# Loaders: cfg -> save(items, path, meta).
# --------------------------------------------------------------------------


def _trinity(overlap: bool):
    def load(cfg: dict):
        from trinity_stream_saver import save_safetensors_streaming

        return functools.partial(save_safetensors_streaming, overlap=overlap)

    return load


def _pure_python(cfg: dict):
    sys.path.insert(0, TESTS)
    from reference_saver import reference_save

    return reference_save


def _save_file(cfg: dict):
    from safetensors.torch import save_file

    # save_file refuses non-contiguous tensors and tells the user to call
    # .contiguous(), which is what a user would do (a no-op on the others).
    return lambda items, path, meta: save_file({n: t.contiguous() for n, t in items}, path)


def _torch_save(cfg: dict):
    import torch

    return lambda items, path, meta: torch.save(dict(items), path)


def _shard_bytes(cfg: dict) -> int:
    return cfg["shard_mb"] * 10**6


def _trinity_sharded(cfg: dict):
    from trinity_stream_saver import save_sharded_streaming

    return lambda items, path, meta: save_sharded_streaming(
        items, os.path.dirname(path), meta, max_shard_size=_shard_bytes(cfg))


def _hub_save_torch_state_dict(cfg: dict):
    from huggingface_hub import save_torch_state_dict

    return lambda items, path, meta: save_torch_state_dict(
        dict(items), os.path.dirname(path), max_shard_size=_shard_bytes(cfg))


def _save_pretrained(cfg: dict):
    # The items of a model scenario carry their module (scenarios.ModelItems).
    return lambda items, path, meta: items.model.save_pretrained(
        os.path.dirname(path), max_shard_size=_shard_bytes(cfg))


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for tables and the plot
    load: Callable[[dict], Callable]
    project: bool = False  # this project's own: its files are verified


METHODS = {m.name: m for m in (
    Method("trinity_stream_saver", "trinity_stream_saver (in turn)", _trinity(False), project=True),
    Method("trinity_overlap", "trinity_stream_saver, overlap=True", _trinity(True), project=True),
    Method("trinity_sharded", "trinity_stream_saver, save_sharded_streaming", _trinity_sharded,
           project=True),
    Method("pure_python_saver", "pure-Python seek-back saver (the original)", _pure_python),
    Method("hub_save_torch_state_dict", "huggingface_hub save_torch_state_dict (whole dict)",
           _hub_save_torch_state_dict),
    Method("transformers_save_pretrained", "transformers save_pretrained (whole model)",
           _save_pretrained),
    Method("safetensors_save_file", "safetensors save_file (whole dict)", _save_file),
    Method("torch_save", "torch.save (whole dict)", _torch_save),
    Method("raw_os_write", "raw os.write, no header",
           lambda cfg: lambda items, path, meta: raw_write(items, path)),
    Method("raw_contiguous", "raw os.write of .contiguous()",
           lambda cfg: lambda items, path, meta: raw_write(
               ((n, t.contiguous()) for n, t in items), path)),
    Method("raw_queue_thread", f"raw os.write on a Python thread, queue {QUEUE_DEPTH} deep",
           lambda cfg: lambda items, path, meta: raw_queue_thread(items, path)),
    Method("produce_only", "(produce only, no writing)", lambda cfg: produce_only),
)}
# Raw writing split over N threads: raw_pwrite_x2, raw_pwrite_x16, ...
PWRITE_METHOD = re.compile(r"raw_pwrite_x([1-9][0-9]*)")


def method(name: str) -> Method:
    """The method of that name; KeyError if there is none."""
    threads = PWRITE_METHOD.fullmatch(name)
    if threads:
        count = int(threads.group(1))
        return Method(name, f"raw pwrite, each tensor over {count} threads",
                      lambda cfg: functools.partial(_pwrite_save, threads=count))
    return METHODS[name]


def _pwrite_save(items, path, meta, threads: int) -> None:
    raw_pwrite(items, path, threads)


def order(name: str) -> int:
    """Where a method's row goes: registry order, pwrite variants after
    raw_os_write."""
    threads = PWRITE_METHOD.fullmatch(name)
    if threads:
        return list(METHODS).index("raw_os_write") * 10_000 + int(threads.group(1))
    return list(METHODS).index(name) * 10_000
