"""What save_model_streaming_async does on each rank: what it stages, and
how the background save writes it. A single process is a group of one.

At the call (on every rank a collective, in the caller's program order):

1. prepare: claim the folder, check the arguments and take this rank's
   share: its piece of every sharded tensor, and the whole tensors (not
   DTensors, or replicated) that it writes. Full staging copies the share
   into the staging memory now (waiting for the save before to finish
   writing from it); bounded staging copies only the module's buffers now.
   Then the ranks compare outcomes over a gloo group of their own, so that
   a failure on any rank fails every rank's Future at once instead of
   leaving the others waiting in the background.
2. The background thread runs the synchronous save (distributed.save._save)
   on stand-ins of the model: the staged copies, or (bounded staging)
   placeholders whose tensors come through the staging ring as the writer
   asks for them (_async_ring_feed). Across ranks it runs over a second
   gloo group used by these saves alone: its exchanges and sends never
   interleave with the training's collectives, which go on meanwhile. Its
   failure handling is the synchronous save's: any rank fails, every
   rank's Future raises the same DistributedSaveError, and no index is
   written.

Both groups are made once for a set of ranks and reused, as
torch.distributed.checkpoint's async_save makes its gloo group once. The
staged pieces become DTensors again on a CPU mesh over the background
group, so that the synchronous save sends them point to point from the
staging memory; a whole tensor another rank writes is not staged here at
all (a meta tensor stands in for it).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple, Optional

import torch

from . import _staging
from ._async_running import _claim, _interruptible, _start, _unclaim
from ._sharded import plan_shards
from ._state_dict import check_cast_target, is_dtensor, saved_dtype
from .distributed import entries as state_dict
from .distributed.assignment import Assignment, writer_ranks as checked_writer_ranks
from .distributed.hf_config import config_files
from .distributed.phases import Ranks, run_phase


class _Groups(NamedTuple):
    call: object  # the exchange at the call, on the callers' threads
    save: object  # the background saves, one at a time
    mesh: object  # a CPU DeviceMesh over `save`: the staged pieces' mesh


_groups: dict[tuple[int, ...], _Groups] = {}
_groups_lock = threading.Lock()


def _groups_for(ranks: Ranks) -> _Groups:
    """The gloo groups of the save's ranks, made on the first save (every
    rank of the group makes them at its first call, a collective) and kept."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    members = tuple(dist.get_process_group_ranks(ranks.resolved_group))
    with _groups_lock:
        found = _groups.get(members)
        if found is None:
            # Group rank order as the save's group, so that writer_ranks
            # and the ranks named in errors mean the same ranks.
            made = [dist.new_group(list(members), backend="gloo", use_local_synchronization=True,
                                   sort_ranks=False) for _ in range(2)]
            found = _groups[members] = _Groups(made[0], made[1],
                                               DeviceMesh.from_group(made[1], "cpu"))
        return found


def _forget_groups_in_child() -> None:
    # A forked child is no member of the parent's groups.
    global _groups_lock
    _groups_lock = threading.Lock()
    _groups.clear()


os.register_at_fork(after_in_child=_forget_groups_in_child)


class _Staged(NamedTuple):
    """How one entry reaches the background save on this rank."""

    kind: str  # "piece": this rank's piece, sent; "whole": staged whole; "elsewhere": not here
    entry: Optional[_staging.StagedEntry]
    writer: int  # the rank that writes the entry
    parameter: bool  # buffers (not parameters) are copied at the call


def _kind(name: str, tensor: torch.Tensor, members: list[int]) -> str:
    """"piece" for a DTensor split along one dimension of a one-dimensional
    mesh over the save's ranks (FSDP2's fully_shard, tensor parallel
    Shard(dim)), "whole" for a tensor every rank holds whole (not a DTensor,
    or Replicate). Any other layout is an error at the call."""
    if not is_dtensor(tensor):
        return "whole"
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh
    if (mesh.ndim == 1 and len(tensor.placements) == 1
            and dist.get_process_group_ranks(mesh.get_group()) == members):
        placement = tensor.placements[0]
        # Exactly Shard: _StridedShard (FSDP2 over tensor parallel) is a
        # subclass whose pieces are interleaved.
        if type(placement) is Shard and tensor.dim() > 0:
            return "piece"
        if type(placement) is Replicate:
            return "whole"
    raise NotImplementedError(
        f"tensor {name!r} is a DTensor placed {tuple(tensor.placements)} on a mesh of shape "
        f"{tuple(mesh.shape)}: the asynchronous save stages tensors split along one dimension "
        "of a one-dimensional mesh over the save's process group (fully_shard, Shard(dim)) "
        "and replicated ones; save this model with save_model_streaming."
    )


def _share(named, ranks: Ranks, dtype, writer_ranks, max_shard_size, filename_pattern
           ) -> list[_Staged]:
    """What this rank stages of each entry, in state dict order. In a
    single process every tensor is staged whole (a DTensor of a group of
    one is its piece)."""
    if ranks.size == 1:
        checked_writer_ranks(writer_ranks, 1)
        return [_Staged("whole", _staging.entry(name, tensor, saved_dtype(tensor.dtype, dtype)),
                        0, isinstance(tensor, torch.nn.Parameter))
                for name, tensor in named]
    import torch.distributed as dist

    members = dist.get_process_group_ranks(ranks.resolved_group)
    rows = state_dict.meta(named, dtype)
    writers = checked_writer_ranks(writer_ranks, ranks.size)
    plan = plan_shards(rows, max_shard_size, filename_pattern)
    writer_of = Assignment(plan, writers, ranks.rank, state_dict.nbytes(named, dtype)).writer_of
    share = []
    for name, tensor in named:
        kind = _kind(name, tensor, members)
        saved = saved_dtype(tensor.dtype, dtype)
        writer = writer_of[name]
        parameter = isinstance(tensor, torch.nn.Parameter)
        if kind == "piece":
            share.append(_Staged(kind, _staging.entry(name, tensor._local_tensor, saved, tensor),
                                 writer, parameter))
        elif writer == ranks.rank:
            local = tensor.to_local() if is_dtensor(tensor) else tensor
            share.append(_Staged("whole", _staging.entry(name, local, saved, tensor), writer,
                                 parameter))
        else:
            share.append(_Staged("elsewhere", None, writer, parameter))
    return share


def _stand_ins(named, share: list[_Staged], mesh, copies: Optional[dict] = None) -> dict:
    """The state dict the background save writes: each entry's staged copy
    (`copies`, by name) or, where there is none (bounded staging, or a
    tensor another rank writes), a meta tensor of its dtype and shape;
    as DTensors on `mesh` where they are pieces (there are pieces only
    across ranks, where torch.distributed.tensor is imported already: a
    single process does not pay for importing it)."""
    copies = copies or {}
    staged = {}
    for (name, tensor), (kind, entry, _, _) in zip(named, share):
        if kind == "elsewhere":
            staged[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            continue
        local = copies.get(name)
        if local is None:
            local = torch.empty(tuple(entry.tensor.shape), dtype=entry.dtype, device="meta")
        if kind == "piece":
            from torch.distributed.tensor import DTensor

            local = DTensor.from_local(local, mesh, tensor.placements, run_check=False,
                                       shape=tensor.shape,
                                       stride=torch.empty(tensor.shape, device="meta").stride())
        staged[name] = local
    return staged


def _interrupted_on_this_rank() -> RuntimeError:
    # An Exception, not a KeyboardInterrupt: the phases report it to every
    # rank, so that all of them abort.
    return RuntimeError("the asynchronous save was interrupted at interpreter exit (Ctrl-C)")


class _Interruptible:
    """A save's storage (storage.ShardFiles, object_storage.ShardObjects)
    whose writer pulls items that stop when the save is stopped at exit."""

    def __init__(self, storage, save):
        self._storage = storage
        self._save = save

    def write(self, items) -> None:
        self._storage.write(_feed_writer(_interruptible(items, self._save,
                                                        _interrupted_on_this_rank)))

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def _feed_writer(items):
    """The items a rank's writer pulls (a seam the tests slow down)."""
    return items


def _interruptible_storage(storage_type, save):
    return lambda *args, **kwargs: _Interruptible(storage_type(*args, **kwargs), save)


def start(save, ranks: Ranks, model, directory: str, *, arena: _staging.StagingArena,
          check_options, dtype, writer_ranks, max_shard_size, filename_pattern,
          storage_options, part_size: int, concurrency: int, **save_options) -> None:
    """Takes this rank's share (all of it now, or, with bounded staging,
    through a ring in the background) and starts the background save; its
    outcome reaches `save` (the Future). A failure at the call, on any rank,
    fails every rank's Future with DistributedSaveError; in a single
    process a busy folder raises at once, other errors reach the Future.
    `check_options()` checks the other arguments and returns the ring's
    bytes (None: full staging)."""
    from .distributed.save import storage_for

    alone = ranks.size == 1
    groups = None if alone else _groups_for(ranks)
    # What the call took (to give back on failure) and made (kept here:
    # the exchange carries only each rank's outcome).
    held = {"claim": _claim(directory, save) if alone else None, "arena": False}

    def prepare():
        if not alone:
            held["claim"] = _claim(directory, save)
        bound = check_options()
        if dtype is not None:
            check_cast_target(dtype)
        held["storage"] = storage_for(directory, storage_options, part_size, concurrency)
        named = state_dict.entries(model)
        share = _share(named, ranks, dtype, writer_ranks, max_shard_size, filename_pattern)
        held["config"] = config_files(model, dtype)  # as it is now: training may change it
        entries = [staged.entry for staged in share if staged.entry is not None]
        pinned = _staging.needs_pinned_memory(entries)
        mesh = None if alone else groups.mesh
        if bound is None:
            buffer = arena.acquire(_staging.full_staging_bytes(entries), pinned)
            held["arena"] = True
            copies, copied = _staging.stage_all(entries, buffer)
            held["model"] = _stand_ins(named, share, mesh, dict(copies))
            held["work"] = _written_from_copies(copied)
        else:
            held["model"] = _stand_ins(named, share, mesh)
            held["work"] = _written_through_ring(save, arena, model, share, entries, pinned,
                                                 bound, ranks.rank)

    def undo():
        if held["arena"]:
            arena.release()
            held["arena"] = False
        if held["claim"] is not None:
            _unclaim(held["claim"])

    try:
        run_phase(ranks if alone else Ranks(groups.call), "staging for the asynchronous save",
                  prepare, undo=undo)
    except Exception as error:
        save._snapshot.set()
        save.set_exception(error)
        return
    except BaseException:
        # A Ctrl-C during the call (waiting for the staging memory, or
        # copying) stops the caller, as it would a synchronous save.
        undo()
        save._snapshot.set()
        raise
    if held["arena"]:
        save._snapshot.set()  # full staging: the copies are taken
    write = functools.partial(
        _writer(), held.pop("model"), directory,
        _interruptible_storage(held.pop("storage"), save), max_shard_size=max_shard_size,
        filename_pattern=filename_pattern, dtype=dtype, writer_ranks=writer_ranks,
        process_group=ranks.group if alone else groups.save, config=held.pop("config"),
        **save_options)
    work = held.pop("work")

    def run() -> None:
        try:
            result = work(write)
        except BaseException as error:  # delivered through the Future
            undo()
            save._snapshot.set()
            save.set_exception(error)
        else:
            undo()
            save.set_result(result)

    name = os.path.basename(os.path.normpath(directory))
    _start(run, f"trinity_stream_saver-async-save:{name}" if alone else
           f"trinity_stream_saver-async-save:{name}:rank{ranks.rank}")


def _writer():
    """The synchronous save of the stand-ins, with its point-to-point
    transport: (model, directory, storage, **options) -> path. Imported
    here, on the caller's thread: a module half imported by the background
    thread when the process forks stays half imported in the child, whose
    own saves would then fail to import it."""
    from .distributed.save import _save
    from .distributed.transport import PointToPoint

    def write(model, directory: str, storage, **options) -> str:
        return _save(model, directory, PointToPoint, storage, **options)

    return write


def _written_from_copies(copied):
    """Full staging: the copies are taken; the snapshot is done."""

    def work(write) -> str:
        if copied is not None:
            copied.synchronize()
        return write()

    return work


def _written_through_ring(save, arena, model, share, entries, pinned: bool, bound: int,
                          rank: int):
    """Bounded staging: module buffers this rank stages are copied now (a
    forward pass may change them); the returned work takes the ring's
    memory, stages the rest through it while the save sends and writes."""
    from ._async_ring_feed import Lent, PieceSender, RingFeed

    staged_share = [staged for staged in share if staged.entry is not None]
    plan = [Lent(index, staged.writer, tuple(staged.entry.tensor.shape), staged.entry.dtype)
            for index, staged in enumerate(share) if staged.entry is not None]
    # A module's buffers (not parameters) are copied now: a training-mode
    # forward pass changes some of them (BatchNorm's running statistics),
    # and they are small. A state dict given as a mapping has no buffers.
    ready = {}
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for position, staged in enumerate(staged_share):
                e = staged.entry
                if staged.kind == "whole" and not staged.parameter:
                    ready[position] = _staging.copied_now(e)
    caller_event = None
    if pinned:
        caller_event = torch.cuda.Event()
        caller_event.record()

    def work(write) -> str:
        capacity = _staging.ring_bytes(entries, bound)
        try:
            buffer = arena.acquire(capacity, pinned, save._abort)
        except _staging.StagingCancelled:
            buffer, capacity = torch.empty(0, dtype=torch.uint8), 0
        try:
            ring = _staging.StagingRing(entries, buffer, capacity, ready, caller_event)
            save._ring = ring
            producer = threading.Thread(target=_produce, args=(ring, save), daemon=True,
                                        name="trinity_stream_saver-async-staging")
            if save._abort.is_set():
                # Stopped at exit: the save still runs, so that every rank
                # fails it together.
                ring.stop(_interrupted_on_this_rank())
                save._snapshot.set()
            else:
                producer.start()
            sender = PieceSender(ring, plan, rank)
            try:
                return write(feed_type=functools.partial(RingFeed, sender=sender))
            finally:
                ring.stop()
                sender.join()
                if producer.ident is not None:
                    producer.join()
        finally:
            if capacity:
                arena.release()

    return work


def _produce(ring, save) -> None:
    try:
        ring.produce()
    finally:
        save._snapshot.set()
