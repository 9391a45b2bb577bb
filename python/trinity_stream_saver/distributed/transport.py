"""How each tensor reaches the rank that writes it: the layout of each entry,
and the transport that moves the pieces (point to point for sent entries,
a collective for gathered ones).

``PointToPoint`` is the transport a save uses; it is passed to the save as
torch.distributed.checkpoint passes its storage writer, so that another one
(the tests' failing transports) replaces it without patching torch. This
module is imported when a save runs, never with the package.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
import torch.distributed as dist

from .._state_dict import is_dtensor
from .staging import Buffer


class Layout(enum.Enum):
    # Not a DTensor: every rank has it whole; its writer writes its own copy.
    LOCAL = "local"
    # A CPU DTensor split along one dimension of a one-dimensional mesh over
    # the save's ranks (FSDP2's Shard(0), tensor parallel Shard(d)): each
    # rank sends its piece to the writer alone, point to point.
    SENT = "sent"
    # Any other DTensor (GPU, several mesh dimensions, or a piece that is
    # not contiguous on some rank): gathered on every rank, a collective.
    GATHERED = "gathered"


def _chunk(extent: int, ranks: int) -> int:
    """The extent of a full piece: DTensor's Shard splits as torch.chunk
    does, ceil(extent / ranks) a rank, the last ranks short or empty."""
    return -(-extent // ranks)


def _span(extent: int, rank: int, ranks: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s piece of a dimension of `extent` split
    over `ranks` (see _chunk)."""
    size = _chunk(extent, ranks)
    start = min(rank * size, extent)
    return start, min(start + size, extent)


def _sent_dim(tensor: torch.Tensor, group_ranks: list[int]) -> Optional[int]:
    """The dimension a tensor is split along if its pieces can be sent
    point to point (see Layout.SENT); None if not."""
    if not is_dtensor(tensor) or tensor.dim() == 0:
        return None
    from torch.distributed.tensor import Shard  # imported already: tensor is a DTensor

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


def _sendable_in_place(name: str, tensor, dim: int, rank: int, ranks: int) -> bool:
    """Whether this rank's piece of `tensor` can be sent from where it
    lies (it is contiguous). A piece of another shape than DTensor's
    Shard(dim) gives (torch.chunk's) is an error: neither sending nor
    gathering could put it in its place."""
    local = tensor._local_tensor
    start, stop = _span(tensor.shape[dim], rank, ranks)
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


def layouts(entries, ranks) -> tuple[list[Layout], list[int]]:
    """The layout of each entry as this rank sees it, and the indices of
    the entries whose piece this rank cannot send from where it lies (not
    contiguous). The ranks exchange those indices and gather those entries
    instead (agreed_layouts)."""
    group_ranks = dist.get_process_group_ranks(ranks.resolved_group) if ranks.distributed else []
    found, unsendable = [], []
    for index, (name, tensor) in enumerate(entries):
        dim = _sent_dim(tensor, group_ranks) if ranks.distributed else None
        if dim is not None:
            found.append(Layout.SENT)
            if not _sendable_in_place(name, tensor, dim, ranks.rank, ranks.size):
                unsendable.append(index)
        elif is_dtensor(tensor):
            found.append(Layout.GATHERED)
        else:
            found.append(Layout.LOCAL)
    return found, unsendable


def agreed_layouts(found: list[Layout], unsendable_by_rank: list[list[int]]) -> list[Layout]:
    """Every rank's layouts, once each rank's unsendable entries are known."""
    unsendable = {index for indices in unsendable_by_rank for index in indices}
    return [Layout.GATHERED if index in unsendable else layout
            for index, layout in enumerate(found)]


class PointToPoint:
    """Moves the pieces of sent entries point to point within `group`
    (tag: the entry's index), and gathers the others.

    A receive remembers which ranks' pieces have come, so that after an
    error it is called again for the rest only: each piece is sent once,
    and waiting for one twice would last until the process group's
    timeout."""

    def __init__(self, group):
        self.group = group

    # The primitives (what a test's transport overrides to fail).

    def send(self, piece: torch.Tensor, to_rank: int, tag: int):
        """Starts sending `piece` to `to_rank` (of the group); returns the
        request to wait on."""
        return dist.isend(piece, dst=dist.get_global_rank(self.group, to_rank), group=self.group,
                          tag=tag)

    def post_receive(self, into: torch.Tensor, from_rank: int, tag: int):
        """Starts receiving into `into` from `from_rank` (of the group);
        returns the request to wait on."""
        return dist.irecv(into, src=dist.get_global_rank(self.group, from_rank), group=self.group,
                          tag=tag)

    # What the feed asks for.

    def receive(self, tensor, index: int, rank: int, whole: Buffer, column_piece: Buffer,
                received: set) -> torch.Tensor:
        """The whole of a sent entry on its writer: its own piece copied,
        the others' received into `whole` (through `column_piece` when split
        along a dimension other than 0). The ranks whose piece has come are
        added to `received`, and skipped when it is called again."""
        with torch.no_grad():
            local = tensor._local_tensor
            dim = tensor.placements[0].dim % tensor.dim()
            ranks = dist.get_world_size(self.group)
            if local.shape == tensor.shape:
                return local  # the other pieces are empty (one rank)
            full = whole.view(tensor.dtype, tensor.shape)
            posted = []  # (rank, request) of rows, each landing in place
            try:
                for source in range(ranks):
                    start, stop = _span(tensor.shape[dim], source, ranks)
                    part = full.narrow(dim, start, stop - start)
                    if part.numel() == 0 or source in received:
                        continue
                    if source == rank:
                        part.copy_(local)
                        continue
                    # Columns are not contiguous in `full`: one piece at a
                    # time through `column_piece`.
                    target = part if dim == 0 else column_piece.view(tensor.dtype, part.shape)
                    request = self.post_receive(target, source, index)
                    if dim == 0:
                        posted.append((source, request))
                    else:
                        request.wait()
                        part.copy_(target)
                        received.add(source)
            finally:
                # Also after an error: a receive posted is one that must not
                # be posted again.
                for source, request in posted:
                    request.wait()
                    received.add(source)
            return full

    def gather(self, tensor) -> torch.Tensor:
        """The whole of a gathered entry, on every rank (a collective).

        One mesh dimension and Shard(0) is gathered straight into one
        buffer whose first rows are the tensor: full_tensor() gathers into a
        padded buffer and then copies the tensor out of it, holding the
        parameter twice at its peak. Any other layout goes through
        full_tensor()."""
        with torch.no_grad():
            placements = tensor.placements
            mesh = tensor.device_mesh
            if (mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0)
                    or tensor.dim() == 0):
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
