"""The feed: the iterator a rank's writer pulls, yielding the tensors this
rank writes, whole, on the CPU, cast, in state dict order.

Sent entries: ``post_sends()`` first sends this rank's piece of every entry
another rank writes (non-blocking, from the parameter's own memory); the
writer receives the pieces of its entries into one reused buffer. So a rank
receives only what it writes, and the ranks write their files at the same
time. Gathered entries are collectives that every rank makes in order,
whether it writes the entry or not.

The feed remembers how far it got, so that after a failure ``drain()``
receives what was sent to this rank and makes the remaining collectives: no
rank is left waiting on this one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._state_dict import saved_dtype
from .staging import Buffer, PinnedRing
from .transport import Layout


class Feed:
    """The tensors this rank writes, as (name, CPU tensor), each whole."""

    def __init__(self, entries, layouts: list[Layout], writer_of: dict, rank: int, transport,
                 dtype: Optional[torch.dtype], sizes: dict, ring_bytes: int):
        self._entries = entries
        self._layouts = layouts
        self._writer_of = writer_of  # tensor name -> the rank that writes it
        self._rank = rank
        self._transport = transport
        self._dtype = dtype
        self._sizes = sizes  # bytes saved of each tensor
        self._ring_bytes = ring_bytes
        self._ring: Optional[PinnedRing] = None
        self._whole = Buffer()  # a sent entry, its pieces received into it
        self._column_piece = Buffer()  # a piece of an entry split along a dimension other than 0
        self._cast = Buffer()
        self.progress = None  # a tqdm bar advanced by the bytes of each tensor yielded
        self._writing = True
        self._sends: list = []
        self._position = 0  # the next entry not yet received or gathered
        self._sources: set = set()  # the ranks whose piece of that entry has come
        self._ahead = None  # (name, tensor, event): gathered, copied, not yet yielded

    def post_sends(self) -> None:
        """Sends this rank's piece of every sent entry another rank writes;
        they complete as the writers receive them."""
        for index, (name, tensor) in enumerate(self._entries):
            writer = self._writer_of.get(name)
            if self._layouts[index] is not Layout.SENT or writer == self._rank:
                continue
            local = tensor._local_tensor.detach()
            if local.numel() > 0:
                self._sends.append(self._transport.send(local, writer, index))

    def wait_for_sends(self) -> None:
        """Once every rank has received what it writes (or drained)."""
        sends, self._sends = self._sends, []
        for send in sends:
            send.wait()

    def finish(self) -> None:
        """The collectives after this rank's last tensor (none when the
        writer asked for the end of the iteration, as it does), then this
        rank's sends, which complete as the other ranks receive."""
        self.drain()
        self.wait_for_sends()

    def finish_after_failure(self) -> None:
        """What was sent to this rank is received, the collectives are
        made, and this rank's sends complete: no rank is left waiting (a
        broken process group ends at its timeout instead)."""
        for step in (self.drain, self.wait_for_sends):
            try:
                step()
            except Exception:
                pass  # the first error is the one to report

    def __iter__(self):
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
            if layout is Layout.GATHERED:
                full = self._transport.gather(tensor)
            elif layout is Layout.SENT and mine:
                full = self._transport.receive(self._own(index), index, self._rank, self._whole,
                                               self._column_piece, self._sources)
            elif mine and self._writing:
                full = self._own(index).detach()
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
            return self._staged(name, full)
        return None

    def _own(self, index: int) -> torch.Tensor:
        """This rank's tensor of an entry it writes (its piece of a sent
        one), read when the entry's turn comes. A hook: the bounded
        asynchronous save hands its staged copies over here."""
        return self._entries[index][1]

    def _staged(self, name: str, full: torch.Tensor):
        """(name, the tensor as written on the CPU, the event its copy
        completes at or None)."""
        saved = saved_dtype(full.dtype, self._dtype)
        if saved != full.dtype:
            if full.device.type == "cpu":
                full = self._cast.view(saved, full.shape).copy_(full)
            else:
                full = full.to(saved)
        if full.device.type == "cuda":
            if self._ring is None:
                self._ring = PinnedRing(self._ring_bytes)
            staged, copied = self._ring.stage(full)
            return name, staged, copied
        if full.device.type != "cpu":
            full = full.cpu()
        return name, full, None
