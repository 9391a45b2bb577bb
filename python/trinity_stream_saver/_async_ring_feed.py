"""Bounded staging across ranks: this rank's share of the model goes
through a staging ring (``_staging.StagingRing``) while training runs, and
the synchronous distributed save writes from it.

A ``PieceSender`` is the ring's one consumer, on its own thread. In state
dict order it sends this rank's piece of each entry another rank writes to
that rank (the piece's bytes stay in the ring until they have arrived), and
lends each tensor this rank writes (its piece of a sent entry, or a whole
tensor) to the ``RingFeed``, the feed of this rank's writer, until the feed
moves on. Every rank stages and sends in the same order and every writer
receives in it, so the entry that comes first and is not yet written is
always staged and sent: the ranks cannot wait on one another in a cycle,
however small the ring.

After a failure on this rank (the ring stopped: a tensor changed before it
was copied, Ctrl-C at exit) the sender sends zeros for every piece it has
not sent, so that no writer waits for it; the save fails on every rank
anyway, and nothing is published.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch

from .distributed.feed import Feed


class Lent(NamedTuple):
    """One tensor of this rank's share, in staging order."""

    index: int  # the entry's index in state dict order (the tag of its piece)
    writer: int  # the rank that writes it
    shape: tuple
    dtype: torch.dtype


class PieceSender:
    """See the module's docstring. ``plan``: what the ring yields, in order."""

    def __init__(self, ring, plan: list[Lent], rank: int):
        self._ring = ring
        self._plan = plan
        self._rank = rank
        self._transport = None
        self._condition = threading.Condition()
        self._lent: Optional[tuple[int, torch.Tensor]] = None  # (index, staged tensor)
        self._discarding = False  # the feed takes nothing more: lent tensors come straight back
        self._done = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="trinity_stream_saver-async-sender")

    def start(self, transport) -> None:
        self._transport = transport
        self._thread.start()

    def _run(self) -> None:
        position = 0
        try:
            for _, staged in self._ring:
                item = self._plan[position]
                if item.writer != self._rank:
                    if staged.numel() > 0:  # empty pieces are not sent (as feed.post_sends)
                        self._transport.send(staged, item.writer, item.index).wait()
                else:
                    self._lend(item.index, staged)
                position += 1
            if position < len(self._plan):
                raise RuntimeError("the asynchronous save's staging stopped early")
        except BaseException as error:  # reported by the feed, which fails the save
            if not isinstance(error, Exception):
                # Ctrl-C at exit (KeyboardInterrupt): an Exception, so that
                # the save's phases report it to every rank.
                error = RuntimeError(f"the asynchronous save was interrupted: {error}")
            with self._condition:
                self.error = error
                self._condition.notify_all()  # a feed waiting in take() fails now
            self._send_zeros_from(position)
        finally:
            with self._condition:
                self._done = True
                self._condition.notify_all()

    def _lend(self, index: int, staged: torch.Tensor) -> None:
        with self._condition:
            if self._discarding:
                return
            self._lent = (index, staged)
            self._condition.notify_all()
            while self._lent is not None and not self._discarding:
                self._condition.wait()
            self._lent = None

    def _send_zeros_from(self, position: int) -> None:
        for item in self._plan[position:]:
            if item.writer == self._rank or 0 in item.shape:
                continue
            try:
                self._transport.send(torch.zeros(item.shape, dtype=item.dtype), item.writer,
                                     item.index).wait()
            except Exception:
                return  # the process group is broken: the save ends at its timeout

    # What the feed calls.

    def take(self, index: int) -> torch.Tensor:
        """The staged tensor of entry `index`, which this rank writes; the
        one lent before goes back to the ring."""
        with self._condition:
            if self._lent is not None and self._lent[0] == index:
                return self._lent[1]
            self._lent = None
            self._condition.notify_all()
            while self._lent is None or self._lent[0] != index:
                if self.error is not None:
                    raise self.error
                if self._done:
                    raise RuntimeError(f"entry {index} was never staged")
                self._condition.wait()
            return self._lent[1]

    def stop_lending(self) -> None:
        """The feed takes nothing more: what is lent goes back, and the
        sender keeps sending the other ranks their pieces."""
        with self._condition:
            self._discarding = True
            self._lent = None
            self._condition.notify_all()

    def join(self) -> None:
        self.stop_lending()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()


class RingFeed(Feed):
    """The feed of the synchronous save over placeholder entries: the
    tensors this rank writes come from the sender as they are staged, and
    this rank's pieces for other ranks go through the sender too."""

    def __init__(self, *args, sender: PieceSender, **kwargs):
        super().__init__(*args, **kwargs)
        self._sender = sender

    def post_sends(self) -> None:
        self._sender.start(self._transport)

    def wait_for_sends(self) -> None:
        self._sender.join()
        if self._sender.error is not None:
            raise self._sender.error

    def _own(self, index: int) -> torch.Tensor:
        placeholder = self._entries[index][1]
        if self._writing:
            staged = self._sender.take(index)
        else:
            # Draining after a failure: what this rank holds no longer
            # matters, only that the other ranks' pieces are received.
            self._sender.stop_lending()
            local = placeholder._local_tensor if hasattr(placeholder, "_local_tensor") \
                else placeholder
            staged = torch.zeros(local.shape, dtype=local.dtype)
        if not hasattr(placeholder, "device_mesh"):
            return staged
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(staged, placeholder.device_mesh, placeholder.placements,
                                  run_check=False, shape=placeholder.shape,
                                  stride=placeholder.stride())
