"""The asynchronous saves running in this process: one per folder, their
threads, and the exit handler that lets them finish (or aborts them
cleanly on Ctrl-C) before the interpreter ends. Knows nothing of staging
or writing."""

from __future__ import annotations

import atexit
import concurrent.futures
import errno
import os
import sys
import threading


# realpath of a folder -> the save writing it.
_running: dict[str, concurrent.futures.Future] = {}
_running_lock = threading.Lock()


def _claim(directory: str, save: concurrent.futures.Future) -> str:
    key = os.path.realpath(directory)
    with _running_lock:
        other = _running.get(key)
        if other is not None:
            raise OSError(
                errno.EBUSY,
                f"an asynchronous save to {directory!r} is still running; wait for its future "
                "(future.result()) before saving to that folder again, or save to another folder",
                directory,
            )
        _running[key] = save
    return key


def _unclaim(key: str) -> None:
    with _running_lock:
        _running.pop(key, None)


def _interrupted_at_exit() -> KeyboardInterrupt:
    return KeyboardInterrupt("the asynchronous save was interrupted at interpreter exit")


def _interruptible(items, save, interrupted):
    """`items`, until a stop asked at exit (Ctrl-C, ``save._abort``): then
    `interrupted()` is raised between two tensors, and the writer aborts
    (the temporary files go, nothing is published)."""
    iterator = iter(items)
    while True:
        if save._abort.is_set():
            raise interrupted()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item


# The save threads started and not yet joined. The exit handler joins them
# after their Futures are done: a daemon thread still unwinding its frames
# when the interpreter finalizes is ended mid-call, which can abort the
# process ("terminate called without an active exception").
_threads: list[threading.Thread] = []


def _start(target, name: str) -> None:
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        thread.start()
        with _running_lock:
            _threads[:] = [t for t in _threads if t.is_alive()] + [thread]
    except RuntimeError:
        # At interpreter shutdown no thread may start: the save then runs
        # here, which keeps its promise to finish before exit.
        target()


def _exit_if_failed(saves) -> None:
    """A save still running when the program ended that then failed is a
    failed program: say so and exit 1, never 0 with nothing saved (an
    exit hook cannot change the status otherwise)."""
    failed = [save for save in saves if save.exception() is not None]
    if not failed:
        return
    for save in failed:
        print(f"trinity_stream_saver: the asynchronous save to {save.directory!r}, still "
              f"running when the program ended, failed: {save.exception()!r}; nothing of it "
              "was published.", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _finish_at_exit() -> None:
    """Waits for the running saves before the interpreter ends; a Ctrl-C
    meanwhile aborts them cleanly rather than killing them mid-file."""
    with _running_lock:
        running = list(_running.values())
        threads = list(_threads)
    if not running and not threads:
        return
    try:
        concurrent.futures.wait(running)
        for thread in threads:
            thread.join()
        _exit_if_failed(running)
    except KeyboardInterrupt:
        for save in running:
            save._stop(_interrupted_at_exit())
        while True:
            try:
                concurrent.futures.wait(running)
                break
            except KeyboardInterrupt:
                continue  # the abort itself is short: let it finish
        for thread in threads:
            thread.join()
        aborted = sum(1 for save in running if save.exception() is not None)
        print(f"trinity_stream_saver: {aborted} asynchronous save(s) aborted at exit; "
              "nothing of them was published.", file=sys.stderr)


def _forget_in_child() -> None:
    """A child forked while saves run (a DataLoader worker, multiprocessing
    with fork) has none of their threads: it forgets the parent's saves,
    so that it exits at once instead of waiting for them, and takes fresh
    locks, which the fork may have copied while held."""
    global _running_lock
    saving = bool(_threads or _running)  # (threading marked them stopped already)
    _running_lock = threading.Lock()
    _running.clear()
    _threads.clear()
    if saving:
        # A module a save's thread was importing at the fork (ours, or
        # torch.distributed's that a save imports when it runs) stays half
        # initialized in the child, where that thread does not exist:
        # dropped, it is imported afresh when the child needs it.
        for name, module in list(sys.modules.items()):
            if (name.startswith(_IMPORTED_BY_SAVES)
                    and getattr(getattr(module, "__spec__", None), "_initializing", False)):
                del sys.modules[name]


_IMPORTED_BY_SAVES = ("trinity_stream_saver.", "torch.distributed.")


def _register_at_exit() -> None:
    """Runs _finish_at_exit when the main thread ends, before
    concurrent.futures shuts its pools down (a save to object storage
    uploads through one, which refuses work once shut down), and again
    from atexit, for an exit that skips the first."""
    import concurrent.futures.thread  # noqa: F401  (its exit hook is registered first)

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        # threading runs these in reverse order of registration: ours,
        # registered after concurrent.futures', runs before it.
        register(_finish_at_exit)
    atexit.register(_finish_at_exit)


_register_at_exit()
os.register_at_fork(after_in_child=_forget_in_child)
