"""Who writes what: the writer ranks, the shard files each of them writes,
and so the rank that writes each tensor. Depends on nothing but its
arguments, so every rank computes the same assignment."""

from __future__ import annotations

from typing import Sequence

from .._extension import _C
from .._sharded import ShardPlan


def writer_ranks(ranks: object, size: int) -> list[int]:
    """The `writer_ranks` argument checked against a group of `size`
    ranks, sorted (all ranks when None)."""
    if ranks is None:
        return list(range(size))
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
        raise TypeError(f"writer_ranks must be a list of ranks, not {type(ranks).__name__}.")
    listed = list(ranks)
    for rank in listed:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"writer_ranks must hold ints, but holds {_C.short_repr(rank)}.")
        if not 0 <= rank < size:
            raise ValueError(
                f"writer_ranks holds {rank}, which is not a rank of the process group "
                f"(0 to {size - 1})."
            )
    if not listed:
        raise ValueError("writer_ranks is empty; name at least one rank, or pass None for all.")
    return sorted(set(listed))


def assign_files(plan: ShardPlan, writers: Sequence[int]) -> dict[int, list[str]]:
    """The files each writer rank writes: the largest file first to the
    writer with the fewest bytes so far (the lowest rank on a tie), so that
    the bytes are balanced."""
    load = {rank: 0 for rank in writers}
    files: dict[int, list[str]] = {rank: [] for rank in writers}
    sizes = plan.file_sizes
    for name in sorted(sizes, key=lambda name: -sizes[name]):  # stable: plan order on ties
        rank = min(writers, key=lambda rank: (load[rank], rank))
        load[rank] += sizes[name]
        files[rank].append(name)
    # In plan order within a rank: the order the tensors come in.
    order = list(plan.filename_to_tensors)
    return {rank: sorted(names, key=order.index) for rank, names in files.items()}


class Assignment:
    """One rank's view of the assignment: its files, the writer of each
    tensor, and the first writer, which writes the index and config."""

    def __init__(self, plan: ShardPlan, writers: Sequence[int], rank: int, sizes: dict):
        files_of = assign_files(plan, writers)
        self.files = files_of.get(rank, [])  # this rank's files
        self.writer_of = {  # tensor name -> the rank that writes it
            name: writer for writer, files in files_of.items() for file in files
            for name in plan.filename_to_tensors[file]
        }
        self.coordinator = writers[0]
        mine = [sizes[name] for name, owner in self.writer_of.items() if owner == rank]
        self.largest_mine = max(mine, default=0)  # bytes of the largest tensor this rank writes
        self.bytes_mine = sum(mine)
