"""A crash, a full disk, Ctrl-C or a failing iterator never costs the last
good checkpoint: afterwards the destination is byte-for-byte the file that
was there before or a complete valid new file, and no temp file is left
except where a crash made cleanup impossible. Such a stale temp file does
not break the next save.

Cases already covered by test_bad_input.py are not repeated here: a
read-only directory, a destination that is a directory, a path through a
missing directory, ENOSPC and EFBIG for one large contiguous tensor whose
size the metadata states exactly. test_interrupt.py covers Ctrl-C in
general; this file adds only its one-second bound.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    PREEXISTING,
    assert_nothing_lost,
    assert_tensors_identical,
    bytes_written,
    child_env,
    free_bytes,
    meta_for,
    read_bytes,
    run_python,
)
from trinity_stream_saver import _C, save_safetensors_streaming

MiB = 1 << 20

# The two ways of feeding the writer: each tensor written before the next is
# requested (the default), or written on a C++ thread while the iterator
# produces the next (overlap=True). Failures must leave nothing behind in both.
SAVE_MODES = {"in_turn": {}, "overlap": {"overlap": True}}


def child_source(*functions) -> str:
    """The source of module-level helpers, for a child process to define
    them exactly as this module does."""
    return "\n".join(textwrap.dedent(inspect.getsource(function)) for function in functions)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# SIGKILL at random moments of a large save
# --------------------------------------------------------------------------


def crash_checkpoint(count: int = 19, rows: int = 1024, cols: int = 2048, notes: int = 2 << 20):
    """The "new" checkpoint of the crash test: `count` bf16 matrices of
    rows x cols, every one with different bytes, and `notes` characters of
    metadata (a config or log stored in the header), which makes writing
    the header take long enough for kills to land in it. Built the same way
    in the zygote and in the test that checks the file.

    4 MiB a matrix is as small as the claims allow: as large as the file
    sink's buffer, so each is written straight from the tensor's memory, as
    real weights are; and 19 of them spread the kills over many tensors.
    2 MiB of notes keep the header window open for the kills planned after
    the data without making the moments before the first tensor (where
    the header is sized) outweigh the data. The zygote makes some 45 saves
    of it (78 MiB each)."""
    import torch

    items = []
    for index in range(count):
        pattern = torch.arange(rows * cols * 2, dtype=torch.int32)
        pattern.mul_(2 * index + 1).add_(index).bitwise_and_(255)
        items.append((f"model.layers.{index}.weight", pattern.to(torch.uint8).view(torch.bfloat16).view(rows, cols)))
    metadata = {"format": "pt", "notes": ("0123456789abcdef" * (notes // 16 + 1))[:notes]}
    return items, metadata


# The zygote imports torch once and forks one grandchild per trial; each
# grandchild runs the same save and is killed with SIGKILL at a planned
# moment. The grandchild reports its progress through a shared memory page
# (a killed process cannot report anything else): how many tensors the
# saver has requested, whether it asked past the last one (all data handed
# over: from then on the header is written, the file closed and renamed),
# and whether the save returned.
ZYGOTE = r"""
import hashlib, json, mmap, os, random, signal, struct, sys, time

config = json.loads(sys.argv[1])
import torch
# Before any tensor op: a thread pool created before fork() does not exist
# in the child, and a child that uses it can hang.
torch.set_num_threads(1)
from trinity_stream_saver import save_safetensors_streaming

dest = config["dest"]
temp = dest + ".tmp"
items, metadata = crash_checkpoint()
meta = [(name, "BF16", list(tensor.shape)) for name, tensor in items]
with open(dest, "rb") as file:
    old = file.read()

board = mmap.mmap(-1, 64)  # MAP_SHARED | MAP_ANONYMOUS: survives fork()
REQUESTED, EXHAUSTED, RETURNED, FAILED, T_FIRST, T_EXHAUSTED, T_RETURNED = range(7)

def put(slot, value):
    struct.pack_into("<d", board, 8 * slot, value)

def get(slot):
    return struct.unpack_from("<d", board, 8 * slot)[0]

def generate():
    for index, item in enumerate(items):
        if index == 0:
            put(T_FIRST, time.monotonic())
        put(REQUESTED, index + 1)
        yield item
    put(T_EXHAUSTED, time.monotonic())
    put(EXHAUSTED, 1)

def grandchild():
    try:
        save_safetensors_streaming(generate(), dest, meta, metadata=metadata)
    except BaseException:
        put(FAILED, 1)
        os._exit(3)
    put(T_RETURNED, time.monotonic())
    put(RETURNED, 1)
    while True:  # every trial ends with a SIGKILL, even after the save
        time.sleep(60)

def fork_save():
    board[:] = bytes(len(board))
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            grandchild()
        finally:
            os._exit(4)
    return pid, started

def wait_for(pid, condition, timeout=120.0, spin=False):
    deadline = time.monotonic() + timeout
    while not condition():
        # WNOWAIT: notice a grandchild that died, but leave it for kill() to reap.
        died = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        if died or get(FAILED) or time.monotonic() > deadline:
            return False
        if not spin:
            time.sleep(0.0002)
    return True

def kill(pid):
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

def sleep_until(deadline):
    while (left := deadline - time.monotonic()) > 0:
        if left > 0.002:  # sleep() overshoots; spin through the last moments
            time.sleep(left - 0.001)

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()

def destination_state():
    try:
        size = os.stat(dest).st_size
    except FileNotFoundError:
        return "missing"
    if size == len(old):
        with open(dest, "rb") as file:
            return "old" if file.read() == old else "other"
    if size == expected["size"]:
        return "new" if sha256(dest) == expected["sha256"] else "other"
    return f"other (size {size})"

def restore_old():
    with open(dest, "wb") as file:
        file.write(old)

def phase_of(state):
    if get(FAILED):
        return "save_failed"
    if state == "new":
        return "after_rename"
    if get(EXHAUSTED):
        return "header_or_rename"
    return "mid_data" if get(REQUESTED) else "before_first_tensor"

# Timings of the saves that ran to the end, calibration and trials alike:
# the expected duration is their running median, since one save on a
# shared machine can take several times as long as the next.
firsts, finishes, durations = [], [], []

def record_timings(started):
    if get(T_FIRST):
        firsts.append(get(T_FIRST) - started)
    if get(RETURNED):
        durations.append(get(T_RETURNED) - started)
        finishes.append(get(T_RETURNED) - get(T_EXHAUSTED))

def median(values):
    return sorted(values)[len(values) // 2]

# Calibration: three normal saves, timed, and the new file's digest.
for _ in range(3):
    restore_old()
    pid, started = fork_save()
    if not wait_for(pid, lambda: get(RETURNED)):
        print(json.dumps({"error": "a calibration save did not return"}))
        sys.exit(0)
    kill(pid)
    record_timings(started)
expected = {"size": os.stat(dest).st_size, "sha256": sha256(dest)}
calibration = {"first_tensor_s": median(firsts), "duration_s": median(durations),
               "finish_s": median(finishes)}

# The plan, as fractions of the running medians: kills spread evenly (one at
# a random moment in each of n equal slices) over the save's expected
# duration and a little beyond; some in its first moments, before the first
# tensor; and some just after the last tensor was handed over, where the
# header is written and the file renamed, a window too short for evenly
# spread kills to land in by chance.
rng = random.Random(config["seed"])
slices = config["spread_kills"]
plans = [("start", rng.random()) for _ in range(config["start_kills"])]
plans += [("spread", 1.2 * (i + rng.random()) / slices) for i in range(slices)]
plans += [("after_all_data", rng.random()) for _ in range(config["end_kills"])]
rng.shuffle(plans)

trials = []
for kind, fraction in plans:
    if destination_state() != "old":
        restore_old()
    stale_temp = os.path.lexists(temp)
    pid, started = fork_save()
    if kind == "after_all_data":
        delay = fraction * median(finishes)
        wait_for(pid, lambda: get(EXHAUSTED), spin=True)
        sleep_until(time.monotonic() + delay)
    else:
        delay = fraction * median(firsts if kind == "start" else durations)
        sleep_until(started + delay)
    killed_at = time.monotonic() - started
    killed = kill(pid)
    record_timings(started)
    state = destination_state()
    trials.append({
        "kind": kind, "delay_s": delay, "killed_at_s": killed_at, "killed_by_sigkill": killed,
        "phase": phase_of(state), "tensors_requested": int(get(REQUESTED)), "destination": state,
        "stale_temp_before": stale_temp, "temp_left": os.path.lexists(temp),
        "all_data_at_s": get(T_EXHAUSTED) - started if get(EXHAUSTED) else None,
        "returned_at_s": get(T_RETURNED) - started if get(RETURNED) else None,
    })

# A save killed mid-data leaves its temp file; the next save must succeed.
if destination_state() != "old":
    restore_old()
pid, started = fork_save()
wait_for(pid, lambda: get(REQUESTED) >= len(items) // 2 + 1)
kill(pid)
stale = {"exists": os.path.lexists(temp), "destination": destination_state()}
pid, started = fork_save()
returned = wait_for(pid, lambda: get(RETURNED))
failed = bool(get(FAILED))
kill(pid)
next_save = {
    "stale_temp": stale, "returned": returned, "failed": failed,
    "destination": destination_state(), "temp_left": os.path.lexists(temp),
}
print(json.dumps({"expected": expected, "calibration": calibration, "trials": trials,
                  "next_save": next_save}))
"""

OLD_CHECKPOINT = [("old.weight", torch.arange(64, dtype=torch.float32)), ("old.bias", torch.ones(8))]


@pytest.fixture(scope="module")
def crash_report(tmp_path_factory):
    """Runs the zygote once for every SIGKILL test of this module and returns
    its report, with the destination's path."""
    directory = tmp_path_factory.mktemp("crash")
    dest = str(directory / "model.safetensors")
    save_safetensors_streaming(iter(OLD_CHECKPOINT), dest, meta_for(OLD_CHECKPOINT))
    config = {"dest": dest, "seed": 20240611, "start_kills": 6, "spread_kills": 26, "end_kills": 8}
    code = child_source(crash_checkpoint) + ZYGOTE
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=900,
            env=child_env(),
        )
        assert result.returncode == 0, f"zygote failed: {result.stderr[-3000:]}"
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert "error" not in report, report
        report["dest"] = dest
        phases = collections.Counter(trial["phase"] for trial in report["trials"])
        print(
            f"\nSIGKILL: {len(report['trials'])} kills, "
            f"{len(report['trials']) - phases['after_rename']} before the rename and "
            f"{phases['after_rename']} after it; by phase {dict(phases)}; "
            f"median timings {report['calibration']}"
        )
        yield report
    finally:
        for path in (dest, dest + ".tmp"):
            if os.path.lexists(path):
                os.remove(path)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_old_file_or_the_complete_new_one(crash_report):
    trials = crash_report["trials"]
    assert len(trials) >= 30
    assert [t for t in trials if not t["killed_by_sigkill"]] == []
    assert [t for t in trials if t["phase"] == "save_failed"] == []
    assert [t for t in trials if t["destination"] not in ("old", "new")] == []


@pytest.mark.slow
def test_sigkill_moments_cover_the_save_from_before_the_data_to_after_the_rename(crash_report):
    trials = crash_report["trials"]
    phases = collections.Counter(trial["phase"] for trial in trials)
    before_rename = len(trials) - phases["after_rename"]
    assert before_rename >= 1 and phases["after_rename"] >= 1, phases
    assert phases["mid_data"] >= 1, phases
    # Spread over the data, not bunched on one tensor.
    in_progress = {t["tensors_requested"] for t in trials if t["phase"] == "mid_data"}
    assert len(in_progress) >= 3, in_progress
    # Every kill planned after the last tensor landed after it (the header,
    # close and rename window) or after the rename.
    late = [t["phase"] for t in trials if t["kind"] == "after_all_data"]
    assert late and set(late) <= {"header_or_rename", "after_rename"}, late


@pytest.mark.slow
def test_stale_temp_file_from_a_killed_save_does_not_break_the_next_save(crash_report):
    next_save = crash_report["next_save"]
    assert next_save["stale_temp"] == {"exists": True, "destination": "old"}
    assert next_save["returned"] and not next_save["failed"]
    assert next_save["destination"] == "new"
    assert not next_save["temp_left"]
    assert not os.path.lexists(crash_report["dest"] + ".tmp")


@pytest.mark.slow
def test_the_new_file_kills_were_compared_with_is_complete_and_valid(crash_report):
    # The zygote judged "new" by this digest; the file now at the destination
    # (from the save after the kills) has it, and loads as what was saved.
    dest = crash_report["dest"]
    assert sha256_of(dest) == crash_report["expected"]["sha256"]
    items, metadata = crash_checkpoint()
    with safe_open(dest, framework="pt") as file:
        assert file.metadata() == metadata
        assert sorted(file.keys()) == sorted(name for name, _ in items)
        for name, tensor in items:
            assert_tensors_identical(file.get_tensor(name), tensor)


# --------------------------------------------------------------------------
# full disk
# --------------------------------------------------------------------------


def full_disk_items(kind: str):
    """4 MiB of data, written through one of the writer's three paths."""
    import torch

    if kind == "small_tensors":  # gathered in the sink's buffer
        return [(f"t{i}", torch.full((64 << 10,), i % 251 + 1, dtype=torch.uint8)) for i in range(64)]
    if kind == "large_contiguous":  # written straight from tensor memory
        return [("big", torch.ones(4 << 20, dtype=torch.uint8))]
    if kind == "non_contiguous":  # put in C order through the staging buffer
        return [("big", torch.ones(1024, 4096, dtype=torch.uint8).t())]
    raise ValueError(kind)


def understated_meta(items):
    """state_dict_meta with room for the items' header entries that describes
    every tensor as empty. Preallocation then reserves only the header, so the
    disk fills while the data is written: the path a filesystem without
    fallocate takes, which a test cannot otherwise reach."""
    from trinity_stream_saver import _C

    return [(name + "_" * 48, _C.safetensors_dtype(tensor.dtype), [0]) for name, tensor in items]


WRITE_PATHS = ["small_tensors", "large_contiguous", "non_contiguous"]


@pytest.mark.parametrize("kind", WRITE_PATHS)
def test_disk_filling_up_while_data_is_written_is_enospc_and_loses_nothing(mount_tmpfs, kind):
    dest = str(mount_tmpfs(2 * MiB) / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    items = full_disk_items(kind)
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter(items), dest, understated_meta(items))
    assert raised.value.errno == errno.ENOSPC
    assert dest + ".tmp" in str(raised.value)
    assert_nothing_lost(dest)


_SAVE_UNDER_FILE_SIZE_LIMIT = r"""
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from trinity_stream_saver import save_safetensors_streaming
dest, kind = sys.argv[1], sys.argv[2]
items = full_disk_items(kind)
try:
    save_safetensors_streaming(iter(items), dest, understated_meta(items))
    print(json.dumps({"error": None}))
except OSError as error:
    print(json.dumps({"error": type(error).__name__, "errno": error.errno, "message": str(error)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", WRITE_PATHS)
def test_file_size_limit_reached_while_data_is_written_is_efbig_and_loses_nothing(existing_dest, kind):
    code = child_source(full_disk_items, understated_meta) + _SAVE_UNDER_FILE_SIZE_LIMIT
    result = run_python(code, existing_dest, kind)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] == "OSError", report
    assert report["errno"] == errno.EFBIG
    assert existing_dest + ".tmp" in report["message"]
    assert_nothing_lost(existing_dest)


def test_save_that_failed_on_a_full_disk_gives_the_space_back(mount_tmpfs):
    directory = mount_tmpfs(2 * MiB)
    dest = str(directory / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    free_before = free_bytes(directory)
    items = full_disk_items("small_tensors")
    with pytest.raises(OSError):
        save_safetensors_streaming(iter(items), dest, understated_meta(items))
    # A descriptor left open on the removed temp file would keep its blocks.
    assert free_bytes(directory) == free_before
    fits = [("t", torch.ones(free_before // 2, dtype=torch.uint8))]
    save_safetensors_streaming(iter(fits), dest, meta_for(fits))
    assert_tensors_identical(load_file(dest)["t"], fits[0][1])


def test_meta_describing_more_than_the_disk_holds_fails_before_the_first_tensor_is_requested(mount_tmpfs):
    # Needs the whole-file preallocation (fallocate) from the speed issue:
    # a full disk must fail at once, not after minutes of writing.
    dest = str(mount_tmpfs(1 * MiB) / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    requested = []

    def generate():
        requested.append("t")
        yield ("t", torch.ones(4 * MiB, dtype=torch.uint8))

    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(generate(), dest, [("t", "U8", [4 * MiB])])
    assert raised.value.errno == errno.ENOSPC
    assert dest + ".tmp" in str(raised.value)
    assert requested == [], "the iterator was asked for a tensor before the disk space was reserved"
    assert_nothing_lost(dest)


# --------------------------------------------------------------------------
# Ctrl-C: KeyboardInterrupt within one second
# --------------------------------------------------------------------------

INTERRUPT_BOUND_S = 1.0
INTERRUPT_ATTEMPTS = 3  # a loaded machine may stall one attempt; all three, never

_INTERRUPTED_SAVES = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
from trinity_stream_saver import save_safetensors_streaming

mode, path = sys.argv[1], sys.argv[2]
if mode == "contiguous":
    tensor = torch.empty(2 << 30, dtype=torch.uint8)
else:  # 2 GiB of one 1 MiB row, through the chunked staging path
    tensor = torch.arange(1 << 20, dtype=torch.int32).bitwise_and_(255).to(torch.uint8).expand(2048, -1)
meta = [("big", "U8", list(tensor.shape))]
while sys.stdin.readline():
    print("READY", flush=True)
    try:
        save_safetensors_streaming([("big", tensor)], path, meta)
        print(json.dumps({"finished": True}), flush=True)
    except KeyboardInterrupt:
        caught = time.monotonic()
        with open("/proc/self/io") as io:
            written = next(int(line.split()[1]) for line in io if line.startswith("wchar:"))
        print(json.dumps({"caught": caught, "written": written, "temp_exists": os.path.lexists(path + ".tmp")}), flush=True)
"""


class ChildLines:
    """Lines of a child's stdout, each read with a timeout, so that a hung
    child fails the test instead of hanging it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pending = b""

    def read(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                pytest.fail(f"child printed nothing for {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"child exited: {self.process.stderr.read().decode()[-3000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux per-process I/O accounting")
@pytest.mark.parametrize("mode", ["contiguous", "zero_stride"])
def test_ctrl_c_during_a_long_write_raises_keyboard_interrupt_within_one_second(existing_dest, mode):
    total = 2 << 30
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_SAVES, mode, existing_dest],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    lines = ChildLines(child)
    attempts = []
    try:
        for _ in range(INTERRUPT_ATTEMPTS):
            child.stdin.write(b"go\n")
            child.stdin.flush()
            assert lines.read(timeout=180) == "READY"
            baseline = bytes_written(child.pid)
            # Once a whole chunk is written the save is inside its write loop.
            deadline = time.monotonic() + 120
            while (written := bytes_written(child.pid) - baseline) < _C.CHUNK_BYTES:
                assert time.monotonic() < deadline, "the save wrote nothing"
                time.sleep(0.001)
            sent = time.monotonic()
            os.kill(child.pid, signal.SIGINT)
            report = json.loads(lines.read(timeout=120))
            assert "caught" in report, f"the save finished instead of stopping: {report}"
            assert report["temp_exists"] is False
            attempts.append({
                "written_before_signal": written,
                "written_when_caught": report["written"] - baseline,
                "delay_s": report["caught"] - sent,
            })
            if attempts[-1]["delay_s"] < INTERRUPT_BOUND_S:
                break
    finally:
        child.kill()
        child.wait()
    # The signal came early and stopped the write: a bound met only because
    # the whole tensor happened to be written within it would prove nothing.
    assert all(a["written_before_signal"] < total // 2 for a in attempts), attempts
    assert all(a["written_when_caught"] < total for a in attempts), attempts
    assert min(a["delay_s"] for a in attempts) < INTERRUPT_BOUND_S, attempts
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# the iterator fails at every position of a short stream
# --------------------------------------------------------------------------

STREAM_LENGTH = 5
ITEM_ELEMENTS = 512 << 10  # 2 MiB of float32: some items reach the disk, some the buffer


def stream_item(index: int):
    return (f"t{index}", torch.full((ITEM_ELEMENTS,), float(index)))


def stream_meta(bad_row=None, position=None):
    rows = [(f"t{i}", "F32", [ITEM_ELEMENTS]) for i in range(STREAM_LENGTH)]
    if bad_row is not None:
        rows.insert(position, bad_row)
    return rows


class IteratorFailure(Exception):
    pass


class IteratorBaseFailure(BaseException):
    """Not an Exception: a saver that only handles Exception would leak."""


@pytest.mark.parametrize("mode", sorted(SAVE_MODES))
@pytest.mark.parametrize("exception_type", [IteratorFailure, IteratorBaseFailure])
@pytest.mark.parametrize("position", range(STREAM_LENGTH + 1))
def test_iterator_raising_before_any_item_propagates_its_own_exception_and_loses_nothing(
    existing_dest, position, exception_type, mode
):
    error = exception_type(f"loader failed before item {position}", position)

    def generate():
        for index in range(position):
            yield stream_item(index)
        raise error

    with pytest.raises(exception_type) as raised:
        save_safetensors_streaming(generate(), existing_dest, stream_meta(), **SAVE_MODES[mode])
    assert raised.value is error
    assert raised.value.args == (f"loader failed before item {position}", position)
    assert_nothing_lost(existing_dest)


def _bad_items(position: int):
    """Each bad item, the meta row that describes it, the exception it must
    raise and a fragment the message must contain (its position or name)."""
    return {
        "not_a_tuple": (5, ("x", "F32", [1]), TypeError, f"item {position}"),
        "non_str_name": ((7, torch.ones(1)), ("x", "F32", [1]), TypeError, f"item {position}"),
        "non_tensor": (("bad", [1.0, 2.0]), ("bad", "F32", [2]), TypeError, "'bad'"),
        "meta_device": (("bad", torch.empty(4, device="meta")), ("bad", "F32", [4]), ValueError, "'bad'"),
        "unsupported_dtype": (("bad", torch.ones(2, dtype=torch.complex128)), ("bad", "C64", [4]), ValueError, "'bad'"),
    }


@pytest.mark.parametrize("mode", sorted(SAVE_MODES))
@pytest.mark.parametrize("case", sorted(_bad_items(0)))
@pytest.mark.parametrize("position", range(STREAM_LENGTH + 1))
def test_bad_item_at_any_position_is_the_right_error_and_loses_nothing(existing_dest, position, case, mode):
    item, row, exception_type, fragment = _bad_items(position)[case]
    items = [stream_item(i) for i in range(STREAM_LENGTH)]
    items.insert(position, item)
    with pytest.raises(exception_type) as raised:
        save_safetensors_streaming(iter(items), existing_dest, stream_meta(row, position), **SAVE_MODES[mode])
    assert fragment in str(raised.value)
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# paths (read-only directory, directory destination and missing directory:
# see test_bad_input.py)
# --------------------------------------------------------------------------


def test_path_through_a_regular_file_is_not_a_directory_error_and_creates_nothing(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_bytes(PREEXISTING)
    dest = str(blocker / "model.safetensors")
    with pytest.raises(NotADirectoryError) as raised:
        save_safetensors_streaming(iter([("a", torch.ones(4))]), dest, [("a", "F32", [4])])
    assert raised.value.errno == errno.ENOTDIR
    assert dest in str(raised.value)
    assert read_bytes(blocker) == PREEXISTING
    assert os.listdir(tmp_path) == ["checkpoints"]
