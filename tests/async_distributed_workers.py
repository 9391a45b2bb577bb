"""Ranks for test_async_work.py: save_model_streaming_async on a gloo
process group of spawned CPU processes (see distributed_workers for the
spawning and teardown), while the ranks train the FSDP2 model.

Each scenario saves into its own folders under the root and records per
rank what the Future gave (its result or error) and what the rank observed;
the test process compares the folders byte for byte.

The background writer is held through the seam between the staged copies
and the file writer (``_async_work._feed_writer``), so that training
really runs during the write; whether something waited is judged from what
was observed, never from elapsed time.
"""

from __future__ import annotations

import os
import threading

import torch

import distributed_workers as workers

TOKENS = torch.arange(24).view(2, 12) % 256
SHARD = "100KB"  # several files, so that every rank writes


def outcome(future, timeout: float = 60) -> dict:
    """The Future's result or error, as JSON."""
    try:
        return {"returned": future.result(timeout)}
    except Exception as error:
        return {"error": {"type": type(error).__name__, "message": str(error),
                          "failures": {str(k): v for k, v in
                                       getattr(error, "failures", {}).items()}}}


def train_steps(model, steps: int = 3, optimizer=None) -> None:
    """Optimizer steps on the FSDP2 model: collectives of the training's
    own group, and in-place changes of every parameter."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=TOKENS).logits.float().square().mean().backward()
        optimizer.step()


def held_writer(gate: threading.Event, fail_with=None):
    """A `_feed_writer` that holds each rank's writer at its first tensor
    until `gate` opens (then raises `fail_with` there, when given)."""
    def feed(items):
        for index, item in enumerate(items):
            if index == 0:
                assert gate.wait(60), "the test never released the writer"
                if fail_with is not None:
                    raise fail_with
            yield item
    return feed


def with_writer(feed, fn):
    """Runs fn() with the background writers fed through `feed`."""
    from trinity_stream_saver import _async_work

    original = _async_work._feed_writer
    _async_work._feed_writer = feed
    try:
        return fn()
    finally:
        _async_work._feed_writer = original


def sync_save(model, folder: str, **kwargs) -> None:
    from trinity_stream_saver import save_model_streaming

    save_model_streaming(model, folder, max_shard_size=SHARD, **kwargs)


def async_save(model, folder: str, **kwargs):
    from trinity_stream_saver import save_model_streaming_async

    return save_model_streaming_async(model, folder, max_shard_size=SHARD, **kwargs)


# --------------------------------------------------------------------------
# Scenarios: (rank, world, mesh, root) -> this rank's record.
# --------------------------------------------------------------------------


RING = 64 << 10  # bounded staging: a ring smaller than the largest tensor


def _snapshot_while_training(rank, world, mesh, root, name, **mode):
    """The save runs (held) while the ranks take three optimizer steps;
    `expected` is the synchronous save of the state at the call, `after`
    the state the training reached. With bounded staging the optimizer's
    step waits for the snapshot (optimizer=), which the held writer delays:
    a hook after it records whether the snapshot was taken by then."""
    model = workers.fsdp_llama(mesh)
    sync_save(model, os.path.join(root, name, "expected"))
    gate = threading.Event()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_at_step = []

    def run():
        future = async_save(model, os.path.join(root, name, "async"), optimizer=optimizer,
                            **mode)
        returned_before_write = not future.done()
        optimizer.register_step_pre_hook(
            lambda *_: seen_at_step.append(future.snapshot_taken()))
        if mode:
            # Bounded: the first step waits for the snapshot, which needs the
            # writer to move: it is released from another thread.
            threading.Timer(1.0, gate.set).start()
        train_steps(model, optimizer=optimizer)
        gate.set()
        return dict(outcome(future), returned_before_write=returned_before_write,
                    snapshot_taken_at_steps=seen_at_step)

    record = with_writer(held_writer(gate), run)
    sync_save(model, os.path.join(root, name, "after"))
    return record


def snapshot_while_training(rank, world, mesh, root):
    return _snapshot_while_training(rank, world, mesh, root, "snapshot")


def bounded_snapshot_while_training(rank, world, mesh, root):
    return _snapshot_while_training(rank, world, mesh, root, "bounded_snapshot",
                                    max_staging_bytes=RING)


def bounded_step_too_early(rank, world, mesh, root):
    """Bounded staging without optimizer=: a step taken before the snapshot
    changes a parameter that is not yet copied."""
    model = workers.fsdp_llama(mesh)
    gate = threading.Event()

    def run():
        future = async_save(model, os.path.join(root, "too_early"), max_staging_bytes=RING)
        train_steps(model, 1)
        gate.set()
        return outcome(future)

    return with_writer(held_writer(gate), run)


def tensor_parallel_and_replicated(rank, world, mesh, root):
    """Shard(1), Replicate and a plain tensor: the files of the
    synchronous save."""
    state = workers.tp_state_dict(mesh)
    sync_save(state, os.path.join(root, "tp", "expected"), dtype=torch.bfloat16)
    future = async_save(state, os.path.join(root, "tp", "async"), dtype=torch.bfloat16)
    return outcome(future)


def failure_on_one_rank(rank, world, mesh, root):
    """Rank 1's writer fails; the folder holds an older checkpoint."""
    model = workers.fsdp_llama(mesh)
    folder = os.path.join(root, "failure")
    sync_save(model, folder)
    train_steps(model, 1)
    gate = threading.Event()
    gate.set()
    fail = OSError(28, "No space left on device (injected on rank 1)") if rank == 1 else None
    before = workers.snapshot(folder)
    record = with_writer(held_writer(gate, fail), lambda: outcome(async_save(model, folder)))
    # Each rank removes its own temporary files before its Future fails.
    torch.distributed.barrier()
    return dict(record, before=before, after=workers.snapshot(folder))


def call_error_on_one_rank(rank, world, mesh, root):
    """Rank 1 asks for a cast safetensors' savers refuse: every rank's
    Future fails at the call, and nothing is created."""
    model = workers.fsdp_llama(mesh)
    future = async_save(model, os.path.join(root, "call_error"),
                        dtype=torch.int8 if rank == 1 else None)
    return dict(outcome(future, timeout=0), done_at_return=future.done())


def two_dimensional_mesh(rank, world, mesh, root):
    """A layout the asynchronous save does not stage: an error at the call,
    on every rank, naming the tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    grid = init_device_mesh("cpu", (1, world))
    state = {"grid.weight": distribute_tensor(workers.full_tensor(1, (4, 6)), grid,
                                              [Replicate(), Shard(0)])}
    future = async_save(state, os.path.join(root, "mesh2d"))
    return dict(outcome(future, timeout=0), done_at_return=future.done())


def _abort_on_one_rank(rank, world, mesh, root, name, **mode):
    """The save is stopped on rank 1 (as the exit handler stops it on
    Ctrl-C) while its writer is held: every rank fails, nothing is
    published."""
    model = workers.fsdp_llama(mesh)
    gate = threading.Event()

    def run():
        future = async_save(model, os.path.join(root, name), **mode)
        if rank == 1:
            future._stop(KeyboardInterrupt())
        gate.set()
        return outcome(future)

    return with_writer(held_writer(gate), run)


def abort_on_one_rank(rank, world, mesh, root):
    return _abort_on_one_rank(rank, world, mesh, root, "abort")


def bounded_abort_on_one_rank(rank, world, mesh, root):
    return _abort_on_one_rank(rank, world, mesh, root, "bounded_abort", max_staging_bytes=RING)


def busy_folder_and_queue(rank, world, mesh, root):
    """A save to a folder being written fails at once on every rank; a
    save to another folder waits for the staging memory, which the first
    save holds until its write is done."""
    model = workers.fsdp_llama(mesh)
    sync_save(model, os.path.join(root, "queue", "expected"))
    gate = threading.Event()

    def run():
        first = async_save(model, os.path.join(root, "queue", "first"))
        busy = async_save(model, os.path.join(root, "queue", "first"))
        busy_done_at_return = busy.done()
        # The writer is released while the third call waits for the memory.
        threading.Timer(0.5, gate.set).start()
        third = async_save(model, os.path.join(root, "queue", "third"))
        first_done_when_third_returned = first.done()
        return {"first": outcome(first), "busy": outcome(busy), "third": outcome(third),
                "busy_done_at_return": busy_done_at_return,
                "first_done_when_third_returned": first_done_when_third_returned}

    return with_writer(held_writer(gate), run)


SCENARIOS = {
    2: [snapshot_while_training, bounded_snapshot_while_training, tensor_parallel_and_replicated,
        failure_on_one_rank, call_error_on_one_rank, abort_on_one_rank,
        bounded_abort_on_one_rank, bounded_step_too_early, busy_folder_and_queue,
        two_dimensional_mesh],
    3: [snapshot_while_training, bounded_snapshot_while_training],
}


def run_rank(rank: int, world: int, root: str) -> None:
    workers.run_scenarios(rank, world, root, SCENARIOS[world])
