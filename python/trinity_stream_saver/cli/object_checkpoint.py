"""Checkpoints in object storage (``s3://bucket/ckpt``, or a protocol
fsspec knows) for ``inspect`` and ``verify``: an ObjectPath stands where
the command line takes a pathlib.Path, so that finding the files of a
checkpoint (a folder, an index, a file) is the same code for both.

Only what is needed is read, by HTTP range requests: a safetensors
object's size, its first 8 bytes (the header length N), then its N header
bytes, judged by the same C++ checks as a local file; the data only for
``verify --against``, one tensor at a time. Credentials and endpoint come
from the standard AWS environment and config (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``), as boto3 reads them.
"""

from __future__ import annotations

import fnmatch
import functools
import struct
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .._extension import _C
from .._meta import DTYPE_TO_SAFETENSORS
from .._object_store import Store, open_store, url_protocol

_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_TO_SAFETENSORS.items()}


def as_path(text: Union[str, Path]) -> Union[Path, "ObjectPath"]:
    """An ObjectPath for a URL, else a pathlib.Path."""
    if url_protocol(str(text), "PATH") is None:
        return Path(text)
    from .checkpoint import CheckpointError

    try:
        store, key = open_store(str(text), None, prefix=True)
        store.connect(4)
    except ImportError as error:
        raise CheckpointError(f"{text}: {error}") from None
    return ObjectPath(store, key)


def refuse_remote_torch(path, kind: str) -> None:
    """Raises CheckpointError for a torch.save checkpoint in object
    storage: torch.load reads a local file."""
    if kind == "torch" and isinstance(path, ObjectPath):
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"{path}: torch.save files are read from local disk only; download the checkpoint "
            "first (object storage is read for safetensors checkpoints)."
        )


def _translated(method):
    """Errors of the store's client (no such bucket, access denied, a
    server error after retries) become OSError naming the object, which
    the command line reports as it reports a file it cannot read."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError:
            raise
        except Exception as error:
            if type(error).__module__.split(".")[0] not in ("botocore", "boto3", "s3fs", "fsspec",
                                                          "aiobotocore", "gcsfs", "adlfs"):
                raise
            raise OSError(f"{self}: {error}") from None

    return call


class ObjectPath:
    """An object or a prefix ("folder") of a store, with the part of
    pathlib.Path's interface the command line uses."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key.strip("/")

    # ---- names ----

    def __str__(self) -> str:
        return self.store.url(self.key)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "ObjectPath") -> bool:
        # Sorted as pathlib sorts the files of a folder: by name.
        if not isinstance(other, ObjectPath):
            return NotImplemented
        return str(self) < str(other)

    def __truediv__(self, name: str) -> "ObjectPath":
        return ObjectPath(self.store, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.store, self.key.rpartition("/")[0])

    def relative_to(self, base: "ObjectPath") -> str:
        return self.key[len(base.key):].lstrip("/") if base.key else self.key

    # ---- listing ----

    def _children(self) -> dict[str, int]:
        return self.store.sizes(f"{self.key}/" if self.key else "")

    @_translated
    def size(self) -> Optional[int]:
        return self.store.size(self.key) if self.key else None

    def is_file(self) -> bool:
        return self.size() is not None

    @_translated
    def is_dir(self) -> bool:
        return bool(self._children())

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_symlink(self) -> bool:
        return False

    @_translated
    def iterdir(self) -> Iterator["ObjectPath"]:
        return iter([self / name for name in sorted(self._children())])

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        return (path for path in self.iterdir() if fnmatch.fnmatchcase(path.name, pattern))

    # ---- reading ----

    @_translated
    def read(self, start: int, length: int) -> bytes:
        return self.store.read(self.key, start, length)

    def read_bytes(self) -> bytes:
        size = self.size()
        if size is None:
            raise FileNotFoundError(f"{self}: no such object.")
        return self.read(0, size)

    def read_header(self) -> bytes:
        """The header's N bytes of a complete safetensors object, read by
        two range requests; raises ValueError as _C.check_file does."""
        size = self.size()
        if size is None:
            raise FileNotFoundError(f"{self}: no such object.")
        prefix = self.read(0, min(size, 8))
        problem = _C.header_length_problem(prefix, size)
        if problem is None:
            (length,) = struct.unpack("<Q", prefix)
            header = self.read(8, length)
            problem = _C.header_problem(header, size)
        if problem is not None:
            raise ValueError(f"'{self}' is not a complete safetensors file: {problem}.")
        return header


class ObjectTensors:
    """A safetensors object's tensors, each read by one range request when
    asked for: the interface of safetensors.safe_open that the command
    line uses."""

    def __init__(self, path: ObjectPath, header: dict[str, dict], data_start: int) -> None:
        self._path = path
        self._header = header
        self._data_start = data_start

    def __enter__(self) -> "ObjectTensors":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def offset_keys(self) -> list[str]:
        return sorted(self._header, key=lambda name: self._header[name]["data_offsets"][0])

    def get_tensor(self, name: str) -> torch.Tensor:
        from .checkpoint import CheckpointError

        info = self._header[name]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None or dtype.itemsize * _count(info["shape"]) != end - start:
            raise CheckpointError(
                f"{self._path}: tensor {name!r} has dtype {info['dtype']}, which cannot be read "
                "from object storage; download the file and run the command on it."
            )
        data = bytearray(self._path.read(self._data_start + start, end - start))
        if not data:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])


def _count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
