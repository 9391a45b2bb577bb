"""save_model_streaming: a Hugging Face checkpoint from a model that may be
sharded over torch.distributed ranks (FSDP2, tensor parallel), every rank
writing its share of the shard files.

This module orchestrates only: which tensors are saved (state dict order,
tied weights once), the plan every rank computes alike, which rank writes
which file, gathering each DTensor in the same order on every rank, and
the agreement between ranks at each phase. The bytes are written by the C++
core's phases (``_C.ShardedWriter``, ``_C.finish_sharded_checkpoint``).

A save runs in four phases, each closed by one exchange among all ranks
(``all_gather_object``, which is also the barrier), so that a failure on
any rank is raised on every rank, naming it, before the next phase starts
(the shape of torch.distributed.checkpoint's ``_DistWrapper``):

1. prepare (local): arguments, the tensors, the plan, the assignment.
   Ranks whose plans differ are a failure here.
2. write: every rank gathers every tensor in order; writers write their
   files under temporary names. A rank that fails keeps gathering (without
   writing) so that the other ranks are not left waiting in a collective.
3. commit: the temporary files take their final names.
4. finish (the first writer rank): the index, then config.json.
Until phase 3 a failure leaves the folder as it was (a folder the save
created stays, empty).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Optional, Sequence, Union

import torch

from ._arguments import _normalise_metadata, _parse_size, _path
from ._extension import _C
from ._progress import _progress_bar
from ._sharded import ShardPlan, plan_shards

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    dist = None
    DTensor = None


class DistributedSaveError(Exception):
    """A distributed save failed on one or more ranks; raised on every rank.

    ``failures`` maps each failing rank (in the process group) to its error,
    as ``"TypeName: message"``. On the failing rank the exception is chained
    to the original error (``__cause__``).
    """

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


# --------------------------------------------------------------------------
# The ranks.
# --------------------------------------------------------------------------


class _Ranks:
    """The process group as this save sees it; a single process (no
    torch.distributed, or not initialised) is a group of one."""

    def __init__(self, process_group):
        self.distributed = dist is not None and dist.is_available() and dist.is_initialized()
        if process_group is not None and not self.distributed:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first, or pass process_group=None."
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.size = dist.get_world_size(process_group) if self.distributed else 1

    def exchange(self, value: object) -> list:
        """Every rank's `value`, in rank order; also a barrier."""
        if self.size == 1:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _phase(ranks: _Ranks, what: str, error: Optional[BaseException], value: object = None) -> list:
    """Closes a phase: exchanges (value, error) with every rank and raises on
    every rank if any failed. Returns every rank's value.

    In a single process the original error is raised as it is."""
    if ranks.size == 1:
        if error is not None:
            raise error
        return [value]
    reports = ranks.exchange((value, None if error is None else _describe(error)))
    failures = {rank: text for rank, (_, text) in enumerate(reports) if text is not None}
    if failures:
        # Ranks that failed alike are named together (an argument error is
        # usually the same on every rank).
        by_text: dict[str, list[int]] = {}
        for rank, text in failures.items():
            by_text.setdefault(text, []).append(rank)
        lines = "; ".join(
            f"{'ranks' if len(group) > 1 else 'rank'} {', '.join(map(str, group))}: {text}"
            for text, group in by_text.items()
        )
        raise DistributedSaveError(
            f"save_model_streaming failed while {what} on {len(failures)} of {ranks.size} "
            f"ranks: {lines}",
            failures,
        ) from error
    return [value for value, _ in reports]


# --------------------------------------------------------------------------
# What is saved.
# --------------------------------------------------------------------------


def _tied_target_patterns(model: object) -> list[str]:
    """transformers' names of weights tied to another (``_tied_weights_keys``
    of the model and its submodules: a dict target -> source, or a list of
    patterns in older versions): of a group of aliases, these are dropped
    first, as save_pretrained drops them."""
    if not isinstance(model, torch.nn.Module):
        return []
    patterns = []
    for prefix, module in model.named_modules():
        for key in getattr(module, "_tied_weights_keys", None) or ():
            patterns.append(f"{prefix}.{key}" if prefix else key)
    return patterns


def _alias_key(tensor: torch.Tensor) -> tuple:
    """Equal for two state dict entries that are the same tensor (tied
    weights): the same object, or the same memory viewed alike."""
    local = tensor._local_tensor if DTensor is not None and isinstance(tensor, DTensor) else tensor
    if local.numel() == 0 or local.device.type == "meta":
        # An empty shard (or no memory) says nothing about identity.
        return ("object", id(tensor))
    return (
        "memory",
        local.device,
        local.data_ptr(),
        local.dtype,
        tuple(tensor.shape),
        tuple(local.stride()),
    )


def _entries(model: object) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a checkpoint of `model` holds, in state dict
    order, each tensor once: of names that alias one tensor the first is
    kept (after any name transformers declares as tied to another), and a
    transformers model's ``_keys_to_ignore_on_save`` are left out."""
    if isinstance(model, torch.nn.Module):
        # keep_vars: the parameters themselves, so that tied ones are one
        # object (detached copies would be separate objects).
        state = model.state_dict(keep_vars=True)
        ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    elif isinstance(model, Mapping):
        state = model
        ignored = set()
    else:
        raise TypeError(
            f"model must be a torch.nn.Module or a mapping of name to tensor (a state dict), "
            f"not {type(model).__name__}."
        )
    items = []
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {_C.short_repr(name)} is not a str.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state dict entry {name!r} is {type(tensor).__name__}, not a torch.Tensor; "
                "save tensors only."
            )
        if name not in ignored:
            items.append((name, tensor))
    tied = _tied_target_patterns(model)
    aliases: dict[tuple, list[str]] = {}
    for name, tensor in items:
        aliases.setdefault(_alias_key(tensor), []).append(name)
    dropped = set()
    for names in aliases.values():
        if len(names) > 1:
            kept = next(
                (name for name in names if not any(re.search(p, name) for p in tied)), names[0]
            )
            dropped.update(name for name in names if name != kept)
    return [(name, tensor) for name, tensor in items if name not in dropped]


def _saved_dtype(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    # Only floating point tensors are cast: integer buffers (token ids,
    # counters) keep their values.
    if dtype is not None and tensor.dtype.is_floating_point:
        return dtype
    return tensor.dtype


def _meta(entries: Sequence[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype]) -> list[tuple]:
    """(name, safetensors dtype, global shape) of each entry: a DTensor's
    shape and dtype are the full tensor's, so nothing is gathered."""
    rows = []
    for name, tensor in entries:
        saved = _saved_dtype(tensor, dtype)
        safetensors_name = _C.safetensors_dtype(saved)
        if safetensors_name is None:
            raise ValueError(
                f"tensor {name!r} has dtype {saved}, which safetensors cannot store; pass "
                "dtype= to cast floating point tensors, or leave the tensor out of the state "
                f"dict. Storable: {', '.join(_C.supported_dtypes())}."
            )
        rows.append((name, safetensors_name, list(tensor.shape)))
    return rows


# --------------------------------------------------------------------------
# Who writes what.
# --------------------------------------------------------------------------


def _writer_ranks(writer_ranks: object, size: int) -> list[int]:
    if writer_ranks is None:
        return list(range(size))
    if isinstance(writer_ranks, (str, bytes)) or not hasattr(writer_ranks, "__iter__"):
        raise TypeError(f"writer_ranks must be a list of ranks, not {type(writer_ranks).__name__}.")
    ranks = list(writer_ranks)
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"writer_ranks must hold ints, but holds {_C.short_repr(rank)}.")
        if not 0 <= rank < size:
            raise ValueError(
                f"writer_ranks holds {rank}, which is not a rank of the process group "
                f"(0 to {size - 1})."
            )
    if not ranks:
        raise ValueError("writer_ranks is empty; name at least one rank, or pass None for all.")
    return sorted(set(ranks))


def assign_files(plan: ShardPlan, writers: Sequence[int]) -> dict[int, list[str]]:
    """The files each writer rank writes: the largest file first to the
    writer with the fewest bytes so far (the lowest rank on a tie), so that
    the bytes are balanced. Depends on nothing but its arguments, so every
    rank computes the same assignment."""
    load = {rank: 0 for rank in writers}
    files: dict[int, list[str]] = {rank: [] for rank in writers}
    sizes = {name: size for name, _, size in plan._plan.files}
    for name in sorted(sizes, key=lambda name: -sizes[name]):  # stable: plan order on ties
        rank = min(writers, key=lambda rank: (load[rank], rank))
        load[rank] += sizes[name]
        files[rank].append(name)
    # In plan order within a rank: the order the tensors come in.
    order = list(plan.filename_to_tensors)
    return {rank: sorted(names, key=order.index) for rank, names in files.items()}


# --------------------------------------------------------------------------
# Gathering.
# --------------------------------------------------------------------------


class _PinnedRing:
    """Two pinned CPU buffers that GPU tensors are copied into without
    blocking. Two suffice because the writer (without overlap) has written
    and released tensor k when it asks for k+1, and at most one copy (k+1)
    is in flight meanwhile: the reused-buffer contract with
    max_queued_bytes = 0 (R >= 2 + 0 // S)."""

    def __init__(self, nbytes: int):
        self._nbytes = nbytes
        self._buffers: list[Optional[torch.Tensor]] = [None, None]
        self._turn = 0

    def stage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event"]:
        """A CPU view that `tensor` is being copied into, and the event to
        wait on before reading it."""
        slot = self._turn
        self._turn ^= 1
        if self._buffers[slot] is None:
            # Allocated on first use and kept: pinning is slow.
            self._buffers[slot] = torch.empty(self._nbytes, dtype=torch.uint8, pin_memory=True)
        tensor = tensor.contiguous()
        view = self._buffers[slot][: tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return view, done


class _Gatherer:
    """Iterates the tensors this rank writes, as CPU tensors, while making
    every rank's collectives: each entry is gathered (_full_tensor)
    in order whether this rank writes it or not, and dropped if not.

    It remembers how far it got, so that after a failure ``drain()`` makes
    the remaining collectives and the other ranks are not left waiting."""

    def __init__(self, entries, mine: set, dtype, sizes: dict, ring_bytes: int, bar):
        self._entries = entries
        self._sizes = sizes
        self._mine = mine
        self._dtype = dtype
        self._ring_bytes = ring_bytes
        self._ring: Optional[_PinnedRing] = None
        self._bar = bar
        self._position = 0  # the next entry whose collective has not run
        self._ahead = None  # (name, tensor, event or None): gathered, not yet yielded

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._ahead is None:
            self._ahead = self._next_mine()
            if self._ahead is None:
                raise StopIteration
        name, tensor, copied = self._ahead
        self._ahead = None
        if copied is not None:
            # The next GPU tensor's gather and copy run while this one is
            # written.
            self._ahead = self._next_mine()
            copied.synchronize()
        return name, tensor

    def drain(self) -> None:
        """The collectives of the entries not yet gathered, nothing written."""
        self._ahead = None
        self._mine = set()
        while self._next_mine() is not None:
            pass

    def _next_mine(self):
        while self._position < len(self._entries):
            name, tensor = self._entries[self._position]
            full = self._gather(tensor)
            # Counted once the collective ran: a drain after a failure
            # starts at the first collective this rank has not made.
            self._position += 1
            if self._bar is not None:
                self._bar.update(self._sizes[name])
            if name not in self._mine:
                del full
                continue
            full = full.to(_saved_dtype(full, self._dtype))
            if full.device.type == "cuda":
                if self._ring is None:
                    self._ring = _PinnedRing(self._ring_bytes)
                staged, copied = self._ring.stage(full)
                return name, staged, copied
            if full.device.type != "cpu":
                full = full.cpu()
            return name, full, None
        return None

    @staticmethod
    def _gather(tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if DTensor is not None and isinstance(tensor, DTensor):
                return _full_tensor(tensor)
            return tensor.detach()


def _full_tensor(tensor) -> torch.Tensor:
    """The whole of a DTensor, on every rank (a collective).

    FSDP2's layout, one mesh dimension and Shard(0), is gathered straight
    into one buffer whose first rows are the tensor: full_tensor() gathers
    into a padded buffer and then copies the tensor out of it, holding the
    parameter twice at its peak. Any other layout goes through
    full_tensor()."""
    placements = tensor.placements
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0) or tensor.dim() == 0:
        return tensor.full_tensor()
    group = mesh.get_group()
    rows = tensor.shape[0]
    # Shard(0) splits as torch.chunk does: ceil(rows / ranks) rows a rank,
    # the last ranks short or empty; each is padded to that size here.
    chunk = -(-rows // group.size())
    local = tensor.to_local()
    if local.shape[0] != chunk or not local.is_contiguous():
        padded = local.new_zeros((chunk, *tensor.shape[1:]))
        padded[: local.shape[0]] = local
        local = padded
    gathered = local.new_empty((chunk * group.size(), *tensor.shape[1:]))
    # all_gather_single is all_gather_into_tensor's name from torch 2.13 on.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    return gathered[:rows]


# --------------------------------------------------------------------------
# The save.
# --------------------------------------------------------------------------


class _Prepared:
    def __init__(self, entries, plan, files, coordinator, extra, sizes):
        self.entries = entries
        self.plan = plan
        self.files = files  # this rank's files
        self.coordinator = coordinator  # the rank that writes the index and config
        self.extra = extra
        self.sizes = sizes  # bytes saved of each tensor
        self.largest_mine = max((sizes[name] for name in self.mine_names()), default=0)

    def mine_names(self) -> set:
        return {name for file in self.files for name in self.plan.filename_to_tensors[file]}


def _prepare(model, directory, max_shard_size, filename_pattern, metadata, dtype, writer_ranks,
             ranks: _Ranks) -> tuple[_Prepared, str]:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, not {_C.short_repr(dtype)}.")
    extra = _normalise_metadata(metadata)
    writers = _writer_ranks(writer_ranks, ranks.size)
    entries = _entries(model)
    meta = _meta(entries, dtype)
    plan = plan_shards(meta, max_shard_size, filename_pattern)
    files = assign_files(plan, writers)
    sizes = {
        name: _saved_dtype(tensor, dtype).itemsize * _numel(tensor.shape) for name, tensor in entries
    }
    prepared = _Prepared(entries, plan, files.get(ranks.rank, []), writers[0], extra, sizes)
    # What must be equal on every rank for the plan and assignment to be:
    # ranks that disagree would write a checkpoint of two different models.
    digest = hashlib.sha256(
        repr((meta, _parse_size(max_shard_size), filename_pattern, writers, extra)).encode()
    ).hexdigest()
    return prepared, digest


def _numel(shape) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


def _save_config(model: object, directory: str, dtype: Optional[torch.dtype]) -> None:
    """config.json (and generation_config.json) of a transformers model, as
    save_pretrained writes them: with the class as its architecture and the
    dtype saved."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(config, "save_pretrained"):
        return
    config = copy.deepcopy(config)
    # FSDP2's fully_shard makes the class "FSDPLlamaForCausalLM".
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    saved = dtype or next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    if saved is not None:
        config.dtype = str(saved).removeprefix("torch.")
    config.save_pretrained(directory)
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if callable(can_generate) and can_generate() and generation_config is not None:
        generation_config.save_pretrained(directory)


def save_model_streaming(
    model: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    save_directory: Union[str, os.PathLike],
    *,
    max_shard_size: Union[int, str] = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
    fsync: bool = False,
    process_group=None,
    writer_ranks: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> str:
    """Save `model` as a Hugging Face checkpoint (shards, index, and a
    transformers model's config.json) in `save_directory`, one full tensor
    in memory at a time.

    When torch.distributed is initialised this is a collective: every rank
    of `process_group` (the default group when None) calls it with the same
    arguments. Each DTensor (FSDP2's ``fully_shard``, or tensor parallel
    ``Shard(dim)``) is gathered on every rank, one at a time in state dict
    order (FSDP2's ``Shard(0)`` straight into one buffer, other layouts with
    ``full_tensor()``); the shard files are shared among the writer
    ranks, balanced by bytes, and each rank writes only its files. By
    default every rank writes, so every rank must see the same
    ``save_directory`` (a shared filesystem); without one pass
    ``writer_ranks=[0]``. Without torch.distributed it saves in this process.

    Args:
        model: an ``nn.Module`` (plain, FSDP2-sharded or tensor parallel,
            on CPU or GPU) or a mapping of name to tensor (a state dict).
            Tensors that alias one another (tied weights) are saved once,
            under the first name (a name transformers declares as tied to
            another yields to the other, as in save_pretrained).
        save_directory: the folder, created if missing.
        max_shard_size, filename_pattern, metadata, fsync: as in
            ``save_sharded_streaming``. Only as many ranks write as there
            are files: lower ``max_shard_size`` for more files.
        dtype: cast floating point tensors to it (e.g. torch.bfloat16)
            after gathering; other tensors keep their dtype.
        process_group: the ranks that save; ``writer_ranks`` are ranks in it.
        writer_ranks: the ranks that write files (all when None). The first
            of them writes the index and config.json once every rank has
            succeeded.
        progress: a tqdm bar in bytes gathered, on the first writer rank.

    Returns:
        The index's path, or the single file's path (the same on every rank).

    Raises:
        DistributedSaveError on every rank when any rank fails, naming the
        failing ranks and their errors; in a single process, the error
        itself (TypeError, ValueError, OSError). A failure before the
        renames leaves the folder as it was, with no temporary files and no
        index (a folder the save created stays, empty). GPU tensors reach the CPU through two pinned buffers of the
        largest tensor this rank writes, copied without blocking while the
        previous tensor is written.
    """
    ranks = _Ranks(process_group)

    # Phase 1: prepare.
    prepared = digest = None
    error = None
    try:
        directory = _path("save_directory", save_directory)
        prepared, digest = _prepare(model, directory, max_shard_size, filename_pattern, metadata,
                                    dtype, writer_ranks, ranks)
    except Exception as caught:
        error = caught
    digests = _phase(ranks, "preparing", error, digest)
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        failures = {
            rank: "its tensors (names, dtypes, shapes) or arguments differ from rank 0's"
            for rank in differing
        }
        raise DistributedSaveError(
            f"save_model_streaming: ranks {', '.join(map(str, differing))} have tensors (names, "
            "dtypes, shapes after tied weights are removed) or arguments (max_shard_size, "
            "filename_pattern, writer_ranks, metadata, dtype) that differ from rank 0's; every "
            "rank must save the same model with the same arguments.",
            failures,
        )
    plan = prepared.plan
    coordinator = ranks.rank == prepared.coordinator

    # Phase 2: write (every rank gathers every tensor).
    bar = None
    writer = None
    gatherer = None
    error = None
    try:
        if progress and coordinator:
            bar = _progress_bar(plan.metadata["total_size"], os.path.basename(os.path.normpath(directory)))
        gatherer = _Gatherer(prepared.entries, prepared.mine_names(), dtype, prepared.sizes,
                             prepared.largest_mine, bar)
        if prepared.files or coordinator:
            os.makedirs(directory, exist_ok=True)
        if prepared.files:
            writer = _C.ShardedWriter(plan._plan, os.fsencode(directory), prepared.files,
                                      prepared.extra, bool(fsync), False)
            writer.write(gatherer)
        else:
            gatherer.drain()
    except Exception as caught:
        error = caught
        if gatherer is not None:
            try:
                gatherer.drain()
            except Exception:
                pass  # the first error is the one to report
    finally:
        if bar is not None:
            bar.close()
    try:
        _phase(ranks, "writing", error)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    # Phase 3: commit.
    error = None
    try:
        if writer is not None:
            writer.commit()
    except Exception as caught:
        error = caught
        writer.abort()
    _phase(ranks, "renaming the files (files of other ranks may have replaced older ones)", error)

    # Phase 4: the index and the config, once every file is in place.
    written = None
    error = None
    if coordinator:
        try:
            written = os.fsdecode(_C.finish_sharded_checkpoint(
                plan._plan, os.fsencode(directory), prepared.extra, None, bool(fsync)))
            _save_config(model, directory, dtype)
        except Exception as caught:
            error = caught
    paths = _phase(ranks, "writing the index and config", error, written)
    return paths[prepared.coordinator]
