"""The phase protocol of a distributed save: the ranks, and one exchange
among all of them at the end of each phase, so that a failure on any rank
is raised on every rank, naming it, before the next phase starts (the shape
of torch.distributed.checkpoint's ``_DistWrapper``).

This module knows nothing of tensors or files; it runs a phase's function
and reports. torch.distributed is imported only when a save runs: it is
not needed to import the package, and importing it costs a second.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")


class DistributedSaveError(Exception):
    """A distributed save failed on one or more ranks; raised on every rank.

    ``failures`` maps each failing rank (in the process group) to its error,
    as ``"TypeName: message"``. On the failing rank the exception is chained
    to the original error (``__cause__``).
    """

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


class Ranks:
    """The process group as this save sees it; a single process (no
    torch.distributed, or not initialised) is a group of one."""

    def __init__(self, process_group: Optional[ProcessGroup]) -> None:
        dist = _torch_distributed()
        if dist is None or not dist.is_initialized():
            if process_group is not None:
                raise ValueError(
                    "process_group was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() first, or pass process_group=None."
                )
            dist = None
        self.distributed = dist is not None
        self.group = process_group
        # The group object point-to-point calls name (None is the default
        # group, which they do not accept for every call).
        self.resolved_group = None if dist is None else (process_group or dist.group.WORLD)
        self.rank: int = 0 if dist is None else dist.get_rank(process_group)
        self.size: int = 1 if dist is None else dist.get_world_size(process_group)

    def exchange(self, value: object) -> list[Any]:
        """Every rank's `value`, in rank order; also a barrier. Only called
        with more than one rank: run_phase handles a group of one."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values


def _torch_distributed() -> Optional[ModuleType]:
    """torch.distributed, or None in a torch built without it."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_phase(ranks: Ranks, what: str, fn: Callable[[], T],
              undo: Optional[Callable[[], None]] = None) -> list[T]:
    """Runs `fn` on this rank, then exchanges its result or error with every
    rank; returns every rank's result, in rank order. If `fn` failed on any
    rank, calls `undo` (on every rank) and raises DistributedSaveError on
    every rank naming the failing ranks (`what` says what they were doing).

    In a single process `fn`'s error is raised as it is."""
    if ranks.size == 1:
        try:
            return [fn()]
        except Exception:
            if undo is not None:
                undo()
            raise
    value: Optional[T] = None
    error: Optional[Exception] = None
    try:
        value = fn()
    except Exception as caught:
        error = caught
    try:
        reports = ranks.exchange((value, None if error is None else describe(error)))
    except Exception as lost:
        # The exchange itself failed: a rank died, or the network between
        # the ranks broke. Nothing more can be agreed with the others, so
        # this rank undoes its own part (its uploads aborted, its temporary
        # files removed) before it raises, as it would on a reported failure.
        if undo is not None:
            undo()
        raise lost_peer(ranks, what, error, lost) from (error or lost)
    failures = {rank: text for rank, (_, text) in enumerate(reports) if text is not None}
    if failures:
        if undo is not None:
            undo()
        raise failed(ranks, what, failures) from error
    return [value for value, _ in reports]


def lost_peer(ranks: Ranks, what: str, error: Optional[BaseException],
              lost: BaseException) -> DistributedSaveError:
    """The error of a rank whose exchange with the others failed."""
    failures = {ranks.rank: describe(error if error is not None else lost)}
    return DistributedSaveError(
        f"save_model_streaming failed while {what}: rank {ranks.rank} could not exchange "
        f"its outcome with the other ranks ({describe(lost)}); another rank has probably "
        "died (its own log says why). This rank's part of the save was undone: nothing of "
        "it is published." + (f" This rank had also failed: {describe(error)}."
                              if error is not None else ""),
        failures)


def failed(ranks: Ranks, what: str, failures: dict[int, str]) -> DistributedSaveError:
    """The error every rank raises when the ranks in `failures` failed while
    doing `what`; ranks that failed alike are named together (an argument
    error is usually the same on every rank)."""
    by_text: dict[str, list[int]] = {}
    for rank, text in failures.items():
        by_text.setdefault(text, []).append(rank)
    lines = "; ".join(
        f"{'ranks' if len(group) > 1 else 'rank'} {', '.join(map(str, group))}: {text}"
        for text, group in by_text.items()
    )
    return DistributedSaveError(
        f"save_model_streaming failed while {what} on {len(failures)} of {ranks.size} ranks: "
        f"{lines}", failures)
