"""progress=True: a tqdm bar in bytes over the items a save pulls."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


#: Off a terminal (a training log), a line this often instead of a bar.
LOG_INTERVAL_S = 30.0

_clock = time.monotonic  # (the tests' clock)


class _ProgressLines:
    """progress=True when stderr is no terminal: a bar redrawn with "\r"
    thousands of times would fill a training log, so one line every
    LOG_INTERVAL_S seconds, and one at the end."""

    def __init__(self, total: int, description: str) -> None:
        self._total = total
        self._description = description
        self._done = 0
        self._said = -1  # bytes done at the last line
        self._started = self._last = _clock()

    def update(self, size: int) -> None:
        self._done += size
        now = _clock()
        if now - self._last >= LOG_INTERVAL_S:
            self._last = now
            self._line(now)

    def close(self) -> None:
        if self._said != self._done:
            self._line(_clock())

    def _line(self, now: float) -> None:
        self._said = self._done
        share = self._done / self._total if self._total else 1.0
        print(f"{self._description}: {self._done / (1 << 20):.0f} of "
              f"{self._total / (1 << 20):.0f} MiB ({share:.0%}) in {now - self._started:.0f} s",
              file=sys.stderr, flush=True)


def _progress_bar(total: int, description: str):
    if not _stderr_is_a_terminal():
        return _ProgressLines(total, description)
    # tqdm is needed only for progress=True, so it is not a dependency of
    # the package (pip install tqdm, or the "progress" extra).
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress=True shows a tqdm progress bar, but tqdm is not installed; "
            "install it (pip install tqdm) or pass progress=False."
        ) from error
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)

def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def _item_bytes(item: object) -> int:
    try:
        return int(item[1].nbytes)  # type: ignore[index]
    except Exception:
        return 0  # not a (name, tensor) pair: the saver raises the real error

def _counted(items: Iterable, bar) -> Iterator:
    """`items`, advancing `bar` by each tensor's bytes once the saver asks for
    the next item (the tensor is then written, or being written with
    overlap). The item is dropped before the next is pulled, so the wrapper
    never keeps a tensor alive."""
    for item in items:
        size = _item_bytes(item)
        yield item
        del item
        bar.update(size)
