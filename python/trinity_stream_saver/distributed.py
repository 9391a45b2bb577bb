"""save_model_streaming: a Hugging Face checkpoint from a model that may be
sharded over torch.distributed ranks (FSDP2, tensor parallel), every rank
writing its share of the shard files.

This module orchestrates only: which tensors are saved (state dict order,
tied weights once), the plan every rank computes alike, which rank writes
which file, how each tensor reaches the rank that writes it, and the
agreement between ranks at each phase. The bytes are written by the C++
core's phases (``_C.ShardedWriter``, ``_C.finish_sharded_checkpoint``).

A save runs in four phases, each closed by one exchange among all ranks
(``all_gather_object``, which is also the barrier), so that a failure on
any rank is raised on every rank, naming it, before the next phase starts
(the shape of torch.distributed.checkpoint's ``_DistWrapper``):

1. prepare (local): arguments, the tensors, the plan, the assignment.
   Ranks whose plans differ are a failure here.
2. write: every rank sends its piece of each sharded tensor to the rank
   that writes it (point to point, on CPU process groups; layouts that
   cannot be sent so are gathered on every rank, in order), and writers
   write their files under temporary names, all at once. A rank that
   fails still receives what was sent to it and makes the remaining
   collectives (without writing), so that no rank is left waiting.
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
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    dist = None
    DTensor = None
    Shard = None


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
        # The group object point-to-point calls name (None is the default
        # group, which they do not accept for every call).
        self.resolved_group = (process_group or dist.group.WORLD) if self.distributed else None
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
# How each tensor reaches the rank that writes it.
# --------------------------------------------------------------------------

# An entry that is not a DTensor: every rank has it whole; its writer
# writes its own copy.
_LOCAL = "local"
# A CPU DTensor split along one dimension of a one-dimensional mesh over the
# save's ranks (FSDP2's Shard(0), tensor parallel Shard(d)): each rank
# sends its piece to the writer alone, point to point.
_SENT = "sent"
# Any other DTensor (GPU, several mesh dimensions, or a piece that is not
# contiguous on some rank): gathered on every rank, a collective.
_GATHERED = "gathered"


def _chunk(extent: int, ranks: int) -> int:
    """The extent of a full piece: DTensor's Shard splits as torch.chunk
    does, ceil(extent / ranks) a rank, the last ranks short or empty."""
    return -(-extent // ranks)


def _piece(extent: int, rank: int, ranks: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s piece of a dimension of `extent` split
    over `ranks` (see _chunk)."""
    size = _chunk(extent, ranks)
    start = min(rank * size, extent)
    return start, min(start + size, extent)


def _sent_dim(tensor: torch.Tensor, group_ranks: list[int]) -> Optional[int]:
    """The dimension a tensor is split along if its pieces can be sent
    point to point (see _SENT); None if not."""
    if DTensor is None or not isinstance(tensor, DTensor) or tensor.dim() == 0:
        return None
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or mesh.device_type != "cpu" or len(tensor.placements) != 1:
        return None
    placement = tensor.placements[0]
    # Exactly Shard: _StridedShard (FSDP2 over tensor parallel) is a
    # subclass whose pieces are interleaved.
    if type(placement) is not Shard:
        return None
    if dist.get_process_group_ranks(mesh.get_group()) != group_ranks:
        return None
    return placement.dim % tensor.dim()


def _check_piece(name: str, tensor, dim: int, rank: int, ranks: int) -> bool:
    """Whether this rank's piece of `tensor` can be sent from where it
    lies (it is contiguous). A piece of another shape than DTensor's
    Shard(dim) gives (torch.chunk's) is an error: neither sending nor
    gathering could put it in its place."""
    local = tensor._local_tensor
    start, stop = _piece(tensor.shape[dim], rank, ranks)
    expected = list(tensor.shape)
    expected[dim] = stop - start
    if list(local.shape) != expected:
        raise ValueError(
            f"tensor {name!r} is a DTensor placed Shard({dim}) of shape {list(tensor.shape)}, "
            f"but rank {rank} holds a piece of shape {list(local.shape)} where Shard({dim}) "
            f"gives {expected} (torch.chunk's split over {ranks} ranks); make it with "
            "distribute_tensor() or fully_shard(), or pass its full_tensor()."
        )
    return local.is_contiguous()


def _layouts(entries, ranks: "_Ranks") -> tuple[list[str], list[int]]:
    """The layout of each entry as this rank sees it, and the indices of
    the entries whose piece this rank cannot send from where it lies (not
    contiguous). The ranks exchange those indices and gather those entries
    instead (_agreed_layouts)."""
    group_ranks = dist.get_process_group_ranks(ranks.resolved_group) if ranks.distributed else []
    layouts, unsendable = [], []
    for index, (name, tensor) in enumerate(entries):
        dim = _sent_dim(tensor, group_ranks) if ranks.distributed else None
        if dim is not None:
            layouts.append(_SENT)
            if not _check_piece(name, tensor, dim, ranks.rank, ranks.size):
                unsendable.append(index)
        elif DTensor is not None and isinstance(tensor, DTensor):
            layouts.append(_GATHERED)
        else:
            layouts.append(_LOCAL)
    return layouts, unsendable


def _agreed_layouts(layouts: list[str], unsendable_by_rank: list[list[int]]) -> list[str]:
    unsendable = {index for indices in unsendable_by_rank for index in indices}
    return [_GATHERED if index in unsendable else layout for index, layout in enumerate(layouts)]


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


class _Buffer:
    """One CPU buffer, grown to the largest tensor asked of it and reused:
    the writer (without overlap) has written and released a tensor before
    it asks for the next, so one buffer holds them all in turn, and its
    pages are touched once rather than once a tensor."""

    def __init__(self):
        self._bytes: Optional[torch.Tensor] = None

    def view(self, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = dtype.itemsize * _numel(shape)
        if self._bytes is None or self._bytes.numel() < nbytes:
            self._bytes = None  # the old one is freed before the new is made
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)


class _Gatherer:
    """Iterates the tensors this rank writes, as CPU tensors, in state dict
    order, each whole.

    _SENT entries: ``post_sends()`` first sends this rank's piece of every
    entry another rank writes (non-blocking, from the parameter's own
    memory); the writer receives the pieces of its entries into one reused
    buffer. So a rank receives only what it writes, and ranks write
    their files at the same time. _GATHERED entries are collectives that
    every rank makes in order, whether it writes the entry or not.

    It remembers how far it got, so that after a failure ``drain()``
    receives what was sent to this rank and makes the remaining
    collectives: no rank is left waiting on this one."""

    def __init__(self, entries, layouts, writer_of: dict, rank: int, group, dtype, sizes: dict,
                 ring_bytes: int):
        self._entries = entries
        self._layouts = layouts
        self._writer_of = writer_of
        self._rank = rank
        self._group = group
        self._dtype = dtype
        self._sizes = sizes
        self._ring_bytes = ring_bytes
        self._ring: Optional[_PinnedRing] = None
        self._received = _Buffer()  # the whole tensor, pieces received into it
        self._piece = _Buffer()  # a piece split along another dimension than 0
        self._cast = _Buffer()
        self.progress = None  # a tqdm bar advanced by the bytes of each tensor yielded
        self._writing = True
        self._sends: list = []
        self._position = 0  # the next entry not yet received or gathered
        self._sources: set = set()  # the ranks whose piece of that entry has come
        self._ahead = None  # (name, tensor, event or None): gathered, not yet yielded

    def post_sends(self) -> None:
        """Sends this rank's piece of every _SENT entry another rank writes;
        they complete as the writers receive them."""
        for index, (name, tensor) in enumerate(self._entries):
            writer = self._writer_of.get(name)
            if self._layouts[index] != _SENT or writer == self._rank:
                continue
            local = tensor._local_tensor.detach()
            if local.numel() > 0:
                self._sends.append(dist.isend(
                    local, dst=dist.get_global_rank(self._group, writer), group=self._group,
                    tag=index))

    def wait_for_sends(self) -> None:
        """Once every rank has received what it writes (or drained)."""
        sends, self._sends = self._sends, []
        for send in sends:
            send.wait()

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
        """What is left to receive and gather, nothing written."""
        self._ahead = None
        self._writing = False
        while self._next_mine() is not None:
            pass

    def _next_mine(self):
        while self._position < len(self._entries):
            index = self._position
            name, tensor = self._entries[index]
            layout = self._layouts[index]
            mine = self._writer_of.get(name) == self._rank
            if layout == _GATHERED:
                full = _full_tensor(tensor)
            elif layout == _SENT and mine:
                full = _receive(tensor, index, self._rank, self._group, self._received,
                                self._piece, self._sources)
            elif mine:
                full = tensor.detach()
            else:
                full = None  # sent already, or the writer has its own copy
            # Counted once received or gathered: a drain after a failure
            # starts at the first entry this rank has not, with the pieces
            # of it that have not come.
            self._position += 1
            self._sources = set()
            if not (mine and self._writing):
                del full
                continue
            if self.progress is not None:
                self.progress.update(self._sizes[name])
            saved = _saved_dtype(full, self._dtype)
            if saved != full.dtype:
                if full.device.type == "cpu":
                    full = self._cast.view(saved, full.shape).copy_(full)
                else:
                    full = full.to(saved)
            if full.device.type == "cuda":
                if self._ring is None:
                    self._ring = _PinnedRing(self._ring_bytes)
                staged, copied = self._ring.stage(full)
                return name, staged, copied
            if full.device.type != "cpu":
                full = full.cpu()
            return name, full, None
        return None


def _receive(tensor, index: int, rank: int, group, whole: _Buffer, piece: _Buffer,
             received: set) -> torch.Tensor:
    """The whole of a _SENT entry on its writer: its own piece copied, the
    others' received (tag: the entry's index) into `whole`. The ranks
    whose piece has come are added to `received`, and skipped when it is
    called again after an error (each piece is sent once)."""
    with torch.no_grad():
        local = tensor._local_tensor
        dim = tensor.placements[0].dim % tensor.dim()
        ranks = dist.get_world_size(group)
        extent = tensor.shape[dim]
        if local.shape == tensor.shape:
            return local  # the other pieces are empty (one rank)
        full = whole.view(tensor.dtype, tensor.shape)
        posted = []  # (rank, receive) of rows, each landing in place
        try:
            for source in range(ranks):
                start, stop = _piece(extent, source, ranks)
                part = full.narrow(dim, start, stop - start)
                if part.numel() == 0 or source in received:
                    continue
                if source == rank:
                    part.copy_(local)
                    continue
                target = part if dim == 0 else piece.view(tensor.dtype, part.shape)
                receive = dist.irecv(target, src=dist.get_global_rank(group, source), group=group,
                                     tag=index)
                if dim == 0:
                    posted.append((source, receive))
                else:
                    receive.wait()  # columns: one piece at a time through `piece`
                    part.copy_(target)
                    received.add(source)
        finally:
            # Also after an error: a receive posted is one that must not be
            # posted again.
            for source, receive in posted:
                receive.wait()
                received.add(source)
        return full


def _full_tensor(tensor) -> torch.Tensor:
    """The whole of a DTensor, on every rank (a collective).

    One mesh dimension and Shard(0) is gathered straight into one buffer
    whose first rows are the tensor: full_tensor() gathers into a padded
    buffer and then copies the tensor out of it, holding the parameter
    twice at its peak. Any other layout goes through full_tensor()."""
    with torch.no_grad():
        placements = tensor.placements
        mesh = tensor.device_mesh
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0) or tensor.dim() == 0:
            return tensor.full_tensor()
        group = mesh.get_group()
        rows = tensor.shape[0]
        chunk = _chunk(rows, group.size())  # each piece is padded to it here
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
    def __init__(self, entries, plan, files_of: dict, rank, coordinator, extra, sizes, layouts,
                 unsendable):
        self.entries = entries
        self.plan = plan
        self.files = files_of.get(rank, [])  # this rank's files
        self.writer_of = {  # tensor name -> the rank that writes it
            name: writer for writer, files in files_of.items() for file in files
            for name in plan.filename_to_tensors[file]
        }
        self.coordinator = coordinator  # the rank that writes the index and config
        self.extra = extra
        self.sizes = sizes  # bytes saved of each tensor
        mine = [sizes[name] for name, owner in self.writer_of.items() if owner == rank]
        self.largest_mine = max(mine, default=0)
        self.bytes_mine = sum(mine)
        self.layouts = layouts  # this rank's view until the ranks agree (_agreed_layouts)
        self.unsendable = unsendable


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
    layouts, unsendable = _layouts(entries, ranks)
    prepared = _Prepared(entries, plan, files, ranks.rank, writers[0], extra, sizes, layouts,
                         unsendable)
    # What must be equal on every rank for the plan and assignment to be:
    # ranks that disagree would write a checkpoint of two different models.
    # The layouts too: ranks that disagree on how a tensor is sharded would
    # wait for pieces that never come.
    digest = hashlib.sha256(
        repr((meta, layouts, _parse_size(max_shard_size), filename_pattern, writers, extra)).encode()
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
    arguments. The shard files are shared among the writer ranks, balanced
    by bytes, and each rank writes only its files, all ranks at once. Each
    DTensor reaches the rank that writes it whole, one at a time in state
    dict order:

    - on CPU, split along one dimension of a one-dimensional mesh over the
      process group (FSDP2's ``fully_shard``, tensor parallel
      ``Shard(dim)``): every rank sends its piece to the writer alone,
      point to point, from the parameter's own memory; the writer receives
      the pieces into one reused buffer. A rank holds its largest tensor
      (and, with ``dtype``, its largest cast; with ``Shard(dim > 0)``, one
      piece more), and receives only what it writes;
    - any other layout (GPU tensors, several mesh dimensions): gathered on
      every rank (FSDP2's ``Shard(0)`` straight into one buffer, others
      with ``full_tensor()``), then dropped where not written.

    By default every rank writes, so every rank must see the same
    ``save_directory`` (a shared filesystem); without one pass
    ``writer_ranks=[0]``. A rank that has finished waits for the others
    at the end of the writing, as in torch.distributed.checkpoint: the
    slowest rank's share must be written within the process group's
    timeout. Without torch.distributed it saves in this process.

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
            on the rank that writes them, once whole; other tensors keep
            their dtype.
        process_group: the ranks that save; ``writer_ranks`` are ranks in it.
        writer_ranks: the ranks that write files (all when None). The first
            of them writes the index and config.json once every rank has
            succeeded.
        progress: a tqdm bar, on the first writer rank, in the bytes that
            rank writes.

    Returns:
        The index's path, or the single file's path (the same on every rank).

    Raises:
        DistributedSaveError on every rank when any rank fails, naming the
        failing ranks and their errors; in a single process, the error
        itself (TypeError, ValueError, OSError). A failure before the
        renames leaves the folder as it was, with no temporary files and no
        index (a folder the save created stays, empty).

    GPU tensors reach the CPU through two pinned buffers of the largest
    tensor this rank writes, copied without blocking while the previous
    tensor is written.
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
    reports = _phase(ranks, "preparing", error,
                     (digest, prepared.unsendable if prepared is not None else []))
    digests = [digest for digest, _ in reports]
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        failures = {
            rank: "its tensors (names, dtypes, shapes, sharding) or arguments differ from rank 0's"
            for rank in differing
        }
        raise DistributedSaveError(
            f"save_model_streaming: ranks {', '.join(map(str, differing))} have tensors (names, "
            "dtypes, shapes after tied weights are removed, how they are sharded) or arguments (max_shard_size, "
            "filename_pattern, writer_ranks, metadata, dtype) that differ from rank 0's; every "
            "rank must save the same model with the same arguments.",
            failures,
        )
    plan = prepared.plan
    coordinator = ranks.rank == prepared.coordinator
    layouts = _agreed_layouts(prepared.layouts, [unsendable for _, unsendable in reports])

    # Phase 2: write (each rank receives the pieces of what it writes).
    bar = None
    writer = None
    gatherer = None
    error = None
    try:
        # First, so that whatever fails after it, the other ranks get this
        # rank's pieces.
        gatherer = _Gatherer(prepared.entries, layouts, prepared.writer_of, ranks.rank,
                             ranks.resolved_group, dtype, prepared.sizes, prepared.largest_mine)
        gatherer.post_sends()
        if progress and coordinator:
            bar = _progress_bar(prepared.bytes_mine, os.path.basename(os.path.normpath(directory)))
            gatherer.progress = bar
        if prepared.files or coordinator:
            os.makedirs(directory, exist_ok=True)
        if prepared.files:
            writer = _C.ShardedWriter(plan._plan, os.fsencode(directory), prepared.files,
                                      prepared.extra, bool(fsync), False)
            writer.write(gatherer)
        # The collectives after this rank's last tensor (none when the
        # writer asked for the end of the iteration, as it does).
        gatherer.drain()
        # They complete as the other ranks receive, which they do before
        # their own exchange below.
        gatherer.wait_for_sends()
    except Exception as caught:
        error = caught
        if gatherer is not None:
            # What was sent to this rank is received, the collectives are
            # made, and this rank's sends complete: no rank is left waiting
            # (a broken process group ends at its timeout instead).
            for finish in (gatherer.drain, gatherer.wait_for_sends):
                try:
                    finish()
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
