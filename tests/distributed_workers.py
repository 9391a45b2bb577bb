"""Ranks for test_distributed.py: spawned processes that form a gloo process
group on CPU, run every scenario of a world size in one group (spawning is
the slow part), and report what each rank saw as JSON files that the test
process checks.

Each scenario runs save_model_streaming on every rank into its own folder
and records, per rank: the path returned or the error raised, the files
this rank's writers committed, and whatever the scenario measures. The
saved folders are left for the test process to load.

Teardown works around a gloo flake (a worker aborting at interpreter exit): results are written to
files first, then barrier(), destroy_process_group() and os._exit(0), so
that an abort at interpreter exit cannot lose a result.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import inspect
import json
import os
import re
import time
import traceback

import torch

# Gloo collectives give up after this long: a rank that never comes fails
# the save instead of hanging the test.
TIMEOUT = datetime.timedelta(seconds=60)


def seeded_llama(tied: bool = False):
    """The tiny Llama of the test suite; the same weights in every process."""
    from conftest import tiny_model

    return tiny_model(tied)


def fsdp_llama(mesh, tied: bool = False):
    """The seeded Llama with fully_shard per decoder layer and at the root."""
    from torch.distributed.fsdp import fully_shard

    model = seeded_llama(tied)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(seed: int, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def tp_state_dict(mesh) -> dict:
    """A mapping with a tensor-parallel DTensor (columns split: Shard(1)),
    a replicated DTensor and a plain tensor; the full tensors are
    full_tensor(1, ...), full_tensor(2, ...), full_tensor(3, ...)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    return {
        "column_parallel.weight": distribute_tensor(full_tensor(1, (6, 10)), mesh, [Shard(1)]),
        "replicated.weight": distribute_tensor(full_tensor(2, (4, 4)), mesh, [Replicate()]),
        "plain.bias": full_tensor(3, (5,)),
    }


def snapshot(folder: str) -> dict:
    """{name: sha256} of every entry in folder ("<dir>" for directories)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            found[name] = "<dir>"
        else:
            with open(path, "rb") as file:
                found[name] = hashlib.sha256(file.read()).hexdigest()
    return found


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def recording_files():
    """A storage class (see trinity_stream_saver.distributed.storage) that
    records the files this rank committed in RecordingFiles.committed."""
    from trinity_stream_saver.distributed.storage import ShardFiles

    class RecordingFiles(ShardFiles):
        committed: list = []

        def commit(self):
            sizes = super().commit()
            RecordingFiles.committed.extend(sizes)
            return sizes

    return RecordingFiles


def save(record: dict, model, folder: str, transport=None, storage=None, **kwargs) -> None:
    """Runs save_model_streaming, with `transport` and `storage` (classes)
    in place of its own when given, recording what it returned or raised
    and the files this rank committed."""
    from trinity_stream_saver import save_model_streaming
    from trinity_stream_saver.distributed.save import _save
    from trinity_stream_saver.distributed.transport import PointToPoint

    storage = storage or recording_files()
    storage.committed = []
    # The public function's defaults, for the arguments not given.
    call = inspect.signature(save_model_streaming).bind(model, folder, **kwargs)
    call.apply_defaults()
    # The object-storage options are the storage class's (object_storage()).
    accepted = inspect.signature(_save).parameters
    options = {key: value for key, value in call.kwargs.items() if key in accepted}
    try:
        record["returned"] = _save(*call.args, transport or PointToPoint, storage, **options)
    except Exception as error:  # the test process checks what was raised
        record["error"] = {
            "type": type(error).__name__,
            "message": str(error),
            "failures": {str(k): v for k, v in getattr(error, "failures", {}).items()},
        }
    record["committed"] = list(storage.committed)


# --------------------------------------------------------------------------
# Scenarios: each takes (rank, world, mesh, root) and returns this rank's
# record. Every rank runs every scenario, in the same order.
# --------------------------------------------------------------------------


def fsdp_round_trip(rank, world, mesh, root):
    record = {}
    save(record, fsdp_llama(mesh), os.path.join(root, "fsdp"), max_shard_size="100KB")
    return record


def fsdp_tied_bf16(rank, world, mesh, root):
    record = {}
    save(record, fsdp_llama(mesh, tied=True), os.path.join(root, "fsdp_tied_bf16"),
         max_shard_size="50KB", dtype=torch.bfloat16)
    return record


def tensor_parallel_mapping(rank, world, mesh, root):
    record = {}
    save(record, tp_state_dict(mesh), os.path.join(root, "tp"), max_shard_size=64)
    return record


def fsdp_state_dict_mapping(rank, world, mesh, root):
    # state_dict() without keep_vars: detached DTensors, the tied pair two
    # objects over one memory.
    record = {}
    save(record, fsdp_llama(mesh, tied=True).state_dict(), os.path.join(root, "mapping"),
         max_shard_size="100KB")
    return record


def writer_rank_zero(rank, world, mesh, root):
    record = {}
    save(record, fsdp_llama(mesh), os.path.join(root, "writer0"), max_shard_size="100KB",
         writer_ranks=[0])
    return record


def _memory(mesh, folder: str, **kwargs) -> dict:
    """Peak memory of a save of a model 16 times its largest parameter,
    built on the meta device so that no rank ever holds it whole."""
    from torch.distributed.fsdp import fully_shard

    layers, rows, cols = 16, 1024, 2048  # 8 MiB per float32 weight
    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(cols, rows, bias=False) for _ in range(layers)))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.to_local().fill_(1.0)
    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = memory_kib("VmRSS")
    record = {}
    save(record, model, folder, max_shard_size="20MB", **kwargs)
    record["growth_bytes"] = (memory_kib("VmHWM") - before) * 1024
    record["largest_parameter_bytes"] = rows * cols * 4
    record["model_bytes"] = layers * rows * cols * 4
    return record


def memory(rank, world, mesh, root):
    return _memory(mesh, os.path.join(root, "memory"))


def memory_writer_rank_zero(rank, world, mesh, root):
    return _memory(mesh, os.path.join(root, "memory_writer0"), writer_ranks=[0])


def unsendable_piece(rank, world, mesh, root):
    """A Shard(0) DTensor whose piece on rank 0 is not contiguous: it
    cannot be sent from where it lies, so every rank gathers it instead;
    the ranks must agree on that. The full tensor is full_tensor(4, (6, 8))."""
    from torch.distributed.tensor import DTensor, Shard

    full = full_tensor(4, (6, 8))
    rows = -(-6 // world)
    local = full[rank * rows:(rank + 1) * rows].clone()
    if rank == 0:
        local = local.t().contiguous().t()  # the same values, column-major
    state = {
        "rows": DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                   stride=full.stride()),
        "plain": full_tensor(5, (3,)),
    }
    record = {"contiguous": local.is_contiguous()}
    save(record, state, os.path.join(root, "unsendable"), max_shard_size=64)
    return record


def _failing_setup(rank, world, mesh, root, name):
    """A folder holding a good checkpoint, and its snapshot."""
    folder = os.path.join(root, name)
    record = {}
    save(record, fsdp_llama(mesh), folder, max_shard_size="100KB")
    assert "returned" in record, record
    torch.distributed.barrier()
    return folder, snapshot(folder)


def failure_in_gather(rank, world, mesh, root):
    """The last rank's third receive of a tensor raises before it receives."""
    from trinity_stream_saver.distributed.transport import PointToPoint

    class FailingThirdReceive(PointToPoint):
        calls = 0

        def receive(self, *args):
            FailingThirdReceive.calls += 1
            if FailingThirdReceive.calls == 3:
                raise RuntimeError("injected failure in the third gather")
            return super().receive(*args)

    folder, before = _failing_setup(rank, world, mesh, root, "fail_gather")
    record = {}
    save(record, fsdp_llama(mesh), folder, FailingThirdReceive if rank == world - 1 else None,
         max_shard_size="60KB")
    torch.distributed.barrier()
    record["before"], record["after"] = before, snapshot(folder)
    return record


def failure_mid_receive(rank, world, mesh, root):
    """On the last rank, the second receive posted for one tensor raises,
    after the first was posted: a drain must receive only the piece that
    has not come (the other is sent once, and waiting for it again would
    last until the gloo timeout)."""
    from trinity_stream_saver.distributed.transport import PointToPoint

    posted: dict = {}

    class FailingSecondPost(PointToPoint):
        def post_receive(self, into, from_rank, tag):
            posted[tag] = posted.get(tag, 0) + 1
            if posted[tag] == 2 and "failed" not in posted:
                posted["failed"] = tag
                raise RuntimeError("injected failure in the second receive of a tensor")
            return super().post_receive(into, from_rank, tag)

    folder, before = _failing_setup(rank, world, mesh, root, "fail_mid_receive")
    model = fsdp_llama(mesh)
    record = {}
    start = time.monotonic()
    save(record, model, folder, FailingSecondPost if rank == world - 1 else None,
         max_shard_size="60KB")
    record["seconds"] = time.monotonic() - start
    record["injected"] = "failed" in posted if rank == world - 1 else None
    torch.distributed.barrier()
    record["before"], record["after"] = before, snapshot(folder)
    return record


def failure_in_write(rank, world, mesh, root):
    """A directory where the last rank's first temporary file must go."""
    from trinity_stream_saver import plan_shards
    from trinity_stream_saver.distributed import assign_files
    from trinity_stream_saver.distributed.entries import entries, meta

    folder, _ = _failing_setup(rank, world, mesh, root, "fail_write")
    model = fsdp_llama(mesh)
    plan = plan_shards(meta(entries(model), None), "60KB")
    blocked = assign_files(plan, list(range(world)))[world - 1][0]
    if rank == 0:
        os.mkdir(os.path.join(folder, blocked + ".tmp"))
    torch.distributed.barrier()
    before = snapshot(folder)
    record = {"blocked": blocked}
    save(record, model, folder, max_shard_size="60KB")
    torch.distributed.barrier()
    record["before"], record["after"] = before, snapshot(folder)
    return record


def _failing_save(root, name: str, model, **kwargs) -> dict:
    """Saves into a new empty folder `name` on every rank; records what
    save() records and the folder afterwards."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    torch.distributed.barrier()
    record = {}
    save(record, model, folder, **kwargs)
    torch.distributed.barrier()
    record["after"] = snapshot(folder)
    return record


def failure_unstorable_dtype(rank, world, mesh, root):
    """The last rank's state dict holds a complex128 tensor."""
    state = {"a": full_tensor(1, (4,)), "b": full_tensor(2, (4,))}
    if rank == world - 1:
        state["b"] = state["b"].to(torch.complex128)
    return _failing_save(root, "fail_dtype", state)


def failure_differing_shapes(rank, world, mesh, root):
    """The last rank's tensor "b" has another shape than the others'."""
    state = {"a": full_tensor(1, (4,)), "b": full_tensor(2, (5 if rank == world - 1 else 4,))}
    return _failing_save(root, "fail_shapes", state)


def failure_wrong_piece(rank, world, mesh, root):
    """A Shard(0) DTensor whose pieces are not torch.chunk's (rank 0 holds
    one row more than its share)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = [4, 2] if rank < 2 else [0]
    local = full_tensor(6, (rows[min(rank, 1)], 3))
    state = {"uneven": DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                          shape=torch.Size([6, 3]), stride=(3, 1))}
    return _failing_save(root, "fail_piece", state)


def failure_differing_layouts(rank, world, mesh, root):
    """Rank 0 holds "w" as a DTensor, the others as a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    whole = full_tensor(7, (4, 4))
    # from_local, not distribute_tensor: that is a collective itself.
    rows = -(-4 // world)
    piece = DTensor.from_local(whole[rank * rows:(rank + 1) * rows], mesh, [Shard(0)],
                               run_check=False, shape=whole.shape, stride=whole.stride())
    return _failing_save(root, "fail_layouts", {"w": piece if rank == 0 else whole})


def failure_after_sending(rank, world, mesh, root):
    """Rank 0 (the coordinator) cannot open its files, after it has sent
    its pieces: the other ranks must not wait for rank 0."""

    class FailingFiles(recording_files()):
        def __init__(self, *args):
            raise OSError("injected: cannot open the files")

    return _failing_save(root, "fail_after_sending", fsdp_llama(mesh),
                         storage=FailingFiles if rank == 0 else None, max_shard_size="100KB")


def small_state_dict() -> dict:
    """Four tensors of 400 bytes: with max_shard_size=400, four files, two
    a rank."""
    return {f"t{index}": full_tensor(10 + index, (100,)) for index in range(4)}


def differing_directories(rank, world, mesh, root):
    """Each rank names its own folder."""
    folder = os.path.join(root, "differing", f"rank{rank}")
    record = {}
    save(record, small_state_dict(), folder, max_shard_size=400)
    torch.distributed.barrier()
    record["exists"] = os.path.exists(folder)
    return record


def _node_save(root, name: str, rank: int, **kwargs) -> dict:
    """Every rank saves into the same relative path "ckpt" from its own
    working directory, as ranks on nodes without a shared filesystem save
    into one path that is a different folder on each node."""
    node = os.path.join(root, name, f"node{rank}")
    os.makedirs(node)
    cwd = os.getcwd()
    os.chdir(node)
    record = {}
    try:
        save(record, small_state_dict(), "ckpt", max_shard_size=400, **kwargs)
    finally:
        os.chdir(cwd)
    torch.distributed.barrier()
    folder = os.path.join(node, "ckpt")
    record["files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    return record


def no_shared_filesystem(rank, world, mesh, root):
    return _node_save(root, "no_shared_filesystem", rank)


def no_shared_filesystem_writer_rank_zero(rank, world, mesh, root):
    return _node_save(root, "no_shared_filesystem_writer0", rank, writer_ranks=[0])


SCENARIOS = {
    2: [fsdp_round_trip, fsdp_tied_bf16, tensor_parallel_mapping, fsdp_state_dict_mapping,
        writer_rank_zero, memory, memory_writer_rank_zero, unsendable_piece, failure_in_gather, failure_in_write, failure_unstorable_dtype, failure_differing_shapes,
        failure_wrong_piece, failure_differing_layouts, failure_after_sending,
        differing_directories, no_shared_filesystem, no_shared_filesystem_writer_rank_zero],
    3: [fsdp_round_trip, failure_in_gather, failure_mid_receive],
}


def fixed_mmap_threshold() -> None:
    """Blocks over 1 MiB are mmapped and given back when freed.

    By default glibc raises its mmap threshold each time a large block is
    freed (up to 32 MiB), after which blocks of the memory scenario's size
    (8 MiB) come from the heap, which keeps them after free: VmHWM then
    counts glibc's retained heap, not what the save holds (76 MiB instead
    of 16 MiB for 16 gathers of 8 MiB, with or without this library).
    Parameters over 32 MiB are always mmapped, so real models do not need
    this."""
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def spawn_world(target, world: int, root, deadline_s: float, *args) -> list[dict]:
    """Spawns `world` processes running target(rank, world, root, *args); returns
    the record each wrote to rank<N>.json in `root`. Fails if a rank is not
    done within `deadline_s` (longer than a gloo timeout: a hang) or dies."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, world, str(root), *args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    assert not hung, f"ranks {hung} did not finish within {deadline_s} s"
    records = []
    for rank, process in enumerate(processes):
        assert process.exitcode == 0, f"rank {rank} exited with {process.exitcode}"
        with open(os.path.join(root, f"rank{rank}.json")) as file:
            records.append(json.load(file))
    return records


def run_scenarios(rank: int, world: int, root: str, scenarios) -> None:
    """The body of one spawned rank: `scenarios` in order, in one gloo
    group, each one's record (or the traceback of its crash) written to
    rank<N>.json; then the teardown of the module's docstring."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fixed_mmap_threshold()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for scenario in scenarios:
        try:
            results[scenario.__name__] = scenario(rank, world, mesh, root)
        except Exception:
            results[scenario.__name__] = {"crashed": traceback.format_exc()}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_rank(rank: int, world: int, root: str) -> None:
    """The body of one spawned rank: every scenario of `world`, in order."""
    run_scenarios(rank, world, root, SCENARIOS[world])


# --------------------------------------------------------------------------
# CUDA (test_distributed_cuda.py): one rank on nccl, the model on the GPU.
# --------------------------------------------------------------------------


def seeded_mlp(device: str = "cpu") -> torch.nn.Module:
    """Linear layers of uneven sizes, the same weights in every process."""
    torch.manual_seed(0)
    sizes = [96, 512, 40, 1024, 8]
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    return torch.nn.Sequential(*layers).to(device)


def run_cuda_rank(rank: int, world: int, root: str) -> None:
    """FSDP2 over the GPU: fully_shard per layer and at the root, saved
    with a cast to bfloat16; reports as run_rank does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cuda", (world,))
    model = seeded_mlp("cuda")
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    results = {}
    try:
        record = {}
        save(record, model, os.path.join(root, "cuda_fsdp"), max_shard_size="100KB",
             dtype=torch.bfloat16)
        results["cuda_fsdp"] = record
    except Exception:
        results["cuda_fsdp"] = {"crashed": traceback.format_exc()}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
