"""Shared helpers for the trinity_stream_saver test suite.

The helpers here read files the way safetensors defines them (8-byte
little-endian header length N, N bytes of JSON padded with spaces, then the
data) without going through the library under test, so that a test can state
exactly what it expects of the bytes on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import trinity_stream_saver
from trinity_stream_saver import _C

# Child processes import the package from where this process found it (the
# source tree with PYTHONPATH=python, or an installed copy).
PACKAGE_DIR = Path(trinity_stream_saver.__file__).resolve().parent.parent

# Where peak_memory.py lives: the one reader of a process's peak memory
# (VmHWM), for the benchmarks and for the tests that measure a child's.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


# --------------------------------------------------------------------------
# the quick loop (pytest -m "not slow")
# --------------------------------------------------------------------------

# Modules whose tests run in process groups of fresh interpreters, a few
# seconds each: all of them are slow.
SLOW_MODULES = ("test_distributed.py",)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------


def all_torch_dtypes() -> list[torch.dtype]:
    """Every distinct torch.dtype the installed torch exposes, in a fixed order."""
    found = {}
    for attribute in sorted(dir(torch)):
        value = getattr(torch, attribute)
        if isinstance(value, torch.dtype):
            found.setdefault(value, None)
    return sorted(found, key=str)


def _safetensors_to_torch() -> dict[str, torch.dtype]:
    table = {}
    for dtype in all_torch_dtypes():
        name = _C.safetensors_dtype(dtype)
        if name is not None:
            assert name not in table, f"{name} maps to {table[name]} and {dtype}"
            table[name] = dtype
    return table


# safetensors dtype name -> torch dtype, for every dtype the library writes.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = _safetensors_to_torch()
SUPPORTED_NAMES: list[str] = list(_C.supported_dtypes())

# Integer dtypes as wide as a tensor element, for bit-exact views.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_NORMAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def make_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """A deterministic random tensor of any supported dtype.

    Dtypes without a random generator in torch (float8, float4 packed, ...)
    are made by viewing random bytes.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype in _NORMAL_FLOATS:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if dtype == torch.complex64:
        return torch.randn(shape, generator=generator, dtype=torch.complex64)
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        info = torch.iinfo(dtype)
        low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
        return torch.randint(low, high, shape, generator=generator, dtype=dtype)
    # Everything else: random bytes reinterpreted (uint16/32/64, float8, F4).
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, shape + (width,), generator=generator, dtype=torch.uint8)
    return raw.view(_SAME_WIDTH_INT[width]).squeeze(-1).view(dtype)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The C-order little-endian bytes of a tensor (what safetensors stores)."""
    tensor = tensor.detach().resolve_conj().resolve_neg().contiguous()
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    width = tensor.element_size()
    return tensor.view(_SAME_WIDTH_INT[width]).numpy().tobytes()


def assert_tensors_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, same shape, same bytes (so NaNs and -0.0 compare exactly)."""
    assert actual.dtype == expected.dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    assert tensor_bytes(actual) == tensor_bytes(expected)


def meta_for(items) -> list[tuple[str, str, list[int]]]:
    """state_dict_meta rows describing `items` exactly, built without the
    library's collect_state_dict_meta."""
    return [(name, _C.safetensors_dtype(t.dtype), list(t.shape)) for name, t in items]


# --------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------


class Header(NamedTuple):
    size: int  # N, as stored in the first 8 bytes
    raw: bytes  # the N header bytes, padding included
    json_bytes: bytes  # raw without the trailing space padding
    entries: dict  # the parsed JSON, in file order


def read_header(path) -> Header:
    with open(path, "rb") as file:
        prefix = file.read(8)
        assert len(prefix) == 8, f"{path} is shorter than 8 bytes"
        (size,) = struct.unpack("<Q", prefix)
        raw = file.read(size)
    assert len(raw) == size, f"{path}: header says {size} bytes, file has {len(raw)}"
    json_bytes = raw.rstrip(b" ")
    return Header(size, raw, json_bytes, json.loads(json_bytes))


def read_bytes(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


# --------------------------------------------------------------------------
# destinations and "nothing was lost"
# --------------------------------------------------------------------------

PREEXISTING = b"an earlier checkpoint that must survive a failed save\n" * 3


@pytest.fixture
def dest(tmp_path) -> str:
    """A destination path in an empty temporary directory."""
    return str(tmp_path / "model.safetensors")


@pytest.fixture
def existing_dest(tmp_path) -> str:
    """A destination path where a file (PREEXISTING) already exists."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(PREEXISTING)
    return str(path)


def assert_nothing_lost(path, previous: Optional[bytes] = PREEXISTING) -> None:
    """After a failed save: no temp file is left behind, and the file that was
    at `path` before (or its absence, if previous is None) is unchanged."""
    path = os.fspath(path)
    assert not os.path.lexists(path + ".tmp"), f"temp file {path}.tmp was left behind"
    if previous is None:
        assert not os.path.lexists(path), f"{path} was created by a failed save"
    else:
        assert read_bytes(path) == previous, f"{path} was changed by a failed save"


# --------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------


def child_env(*paths) -> dict:
    """This process's environment, with the package and `paths` (such as
    BENCHMARKS_DIR) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_DIR), *map(str, paths)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def run_python(code: str, *args: str, timeout: float = 120, paths=()) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that can import the package (and
    the modules in `paths`)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(*paths),
    )


def bytes_written(pid: int | str = "self", tid: int | None = None) -> int:
    """Bytes a process (or one of its threads) has passed to write() so far,
    from /proc. The saver preallocates its whole file, so the temp file's
    size says nothing about progress; this does."""
    path = f"/proc/{pid}/task/{tid}/io" if tid is not None else f"/proc/{pid}/io"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


# --------------------------------------------------------------------------
# small filesystems
# --------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mounts tmpfs filesystems of a given size under tmp_path, unmounting
    them afterwards; skips the test (saying why) where mounting is not
    permitted. Usage: `directory = mount_tmpfs(1 << 20)`."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root and mount(8)")
        mount_point = tmp_path / f"tmpfs{len(mounted)}"
        mount_point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in reversed(mounted):
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def free_bytes(directory) -> int:
    """Bytes an unprivileged writer may still allocate in `directory`'s filesystem."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


# --------------------------------------------------------------------------
# a tiny transformers model, built from a config (no download)
# --------------------------------------------------------------------------

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


def tiny_model(tied: bool = False, seed: int = 0):
    """A 2-layer Llama built from a config, with random weights from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tied)).eval()


def logits(model) -> torch.Tensor:
    tokens = torch.arange(16).reshape(2, 8) * 7 % TINY_LLAMA["vocab_size"]
    with torch.no_grad():
        return model(tokens).logits


def load_logits(folder) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    return logits(LlamaForCausalLM.from_pretrained(folder).eval())
