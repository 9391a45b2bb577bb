"""`convert` holds one tensor at a time: a checkpoint larger than the memory
the process may use converts.

The limit is a memory cgroup set for the child process alone. A cgroup
charges what really takes RAM (anonymous memory and the page cache the
process brings in) and reclaims clean file pages under pressure, as a
machine short of memory would. RLIMIT_AS would not do: it counts address
space, so the memory-mapped source alone would exceed it while using no
RAM.

To make sure the limit bites, the same child loading the checkpoint whole
(torch.load without mmap) must be killed under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from conftest import child_env

LIMIT = 200 << 20  # bytes the converting process may use
TENSORS = 10
TENSOR_BYTES = 32 << 20  # 320 MiB in all, well above LIMIT


def _own_cgroup(controller_root: Path, v1: bool) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v1 and "memory" in controllers.split(",")) or (not v1 and controllers == ""):
            return controller_root / path.lstrip("/")
    raise FileNotFoundError("no memory cgroup in /proc/self/cgroup")


@pytest.fixture
def memory_limited(tmp_path):
    """A command prefix that runs a command in a fresh memory cgroup limited
    to LIMIT bytes; skips (saying why) where cgroups cannot be made."""
    made: list[Path] = []
    name = f"tss-test-{os.getpid()}-{tmp_path.name}"
    attempts = [
        (Path("/sys/fs/cgroup/memory"), True, "memory.limit_in_bytes"),
        (Path("/sys/fs/cgroup"), False, "memory.max"),
    ]
    reasons = []
    for root, v1, limit_file in attempts:
        if not (root / "cgroup.procs").exists():
            continue
        try:
            group = _own_cgroup(root, v1) / name
            group.mkdir()
            made.append(group)
            (group / limit_file).write_text(str(LIMIT))
            break
        except OSError as error:
            reasons.append(f"{root}: {error}")
    else:
        pytest.skip(f"cannot make a memory cgroup here ({'; '.join(reasons) or 'no cgroup fs'}); needs root")
    procs = made[-1] / "cgroup.procs"
    # The shell moves itself into the group, then becomes the command.
    yield ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"]
    for group in made:
        try:
            group.rmdir()
        except OSError:
            pass


def _filesystem_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount_point, fstype = line.split()[:3]
        inside = str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, kind = mount_point, fstype
    return kind


@pytest.fixture
def large_checkpoint(tmp_path) -> Path:
    """A torch.save file of TENSORS float32 tensors, on disk and out of the
    page cache, so that reading it is charged to the reader."""
    if _filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(
            f"{tmp_path} is in memory ({_filesystem_type(tmp_path)}): files written there count "
            "against the memory limit and can never be reclaimed; set TMPDIR to a disk"
        )
    source = tmp_path / "large.bin"
    count = TENSOR_BYTES // 4
    torch.save(
        {f"layer.{k}.weight": torch.full((count,), float(k)) for k in range(TENSORS)}, source
    )
    with open(source, "rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert source.stat().st_size > LIMIT * 1.5
    return source


def run_limited(prefix: list[str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )


@pytest.mark.slow
def test_a_checkpoint_larger_than_the_memory_limit_converts(memory_limited, large_checkpoint, tmp_path):
    # The limit is real: loading the checkpoint whole is killed under it.
    whole = run_limited(
        memory_limited,
        "-c",
        "import sys, torch; torch.load(sys.argv[1], weights_only=True)",
        str(large_checkpoint),
    )
    assert whole.returncode != 0, "the memory limit did not stop a whole load; the test proves nothing"

    destination = tmp_path / "out"
    result = run_limited(
        memory_limited,
        "-m",
        "trinity_stream_saver",
        "convert",
        str(large_checkpoint),
        str(destination),
        "--max-shard-size",
        "100MB",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Checking the result needs no limit, nor a fresh interpreter.
    check = run_cli("verify", destination, "--against", large_checkpoint)
    assert check.returncode == 0, check.stdout + check.stderr
