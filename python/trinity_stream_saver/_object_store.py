"""Object stores as destinations: which URLs name one, and how bytes reach
it. ``s3://`` goes through boto3 multipart uploads; any other protocol
fsspec knows goes through fsspec. The saves themselves (what is uploaded
when, what is aborted on failure) live in ``_object_save``; this module
knows nothing of safetensors.

A store hands out uploads: ``start(key)`` begins one object, whose parts
come in order (numbered from 1); ``complete()`` makes the object appear,
``abort()`` discards it. Besides: ``put`` (a small object at once),
``sizes`` (the objects directly under a prefix, by name, with their sizes)
and ``delete``; for the command line's reading, ``size`` (one object's, or
None) and ``read`` (a range of bytes).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Mapping
from typing import Any, Optional

#: A URL's scheme, as RFC 3986 spells it (a Windows drive "C:\\" has no "//").
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)

_S3_PROTOCOLS = ("s3", "s3a")

#: S3 takes at most 10000 parts, each but the last at least 5 MiB.
S3_MAX_PARTS = 10_000
S3_MIN_PART_SIZE = 5 << 20


def url_protocol(path: object) -> Optional[str]:
    """The protocol of a URL such as ``s3://bucket/key`` (lower case), or
    None for a local path."""
    if not isinstance(path, str):
        return None
    match = _URL.match(path)
    return match.group(1).lower() if match else None


def check_url(url: str) -> None:
    """Raises ValueError unless `url` names an object (a prefix is named
    without its last "/") of a protocol an installed library knows,
    ImportError naming what to install; connects to nothing."""
    protocol = url_protocol(url)
    assert protocol is not None, url
    if protocol in _S3_PROTOCOLS:
        bucket, _, key = _URL.match(url).group(2).partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ValueError(
                f"{url!r} does not name an object: give s3://bucket/key "
                "(e.g. s3://bucket/checkpoints/model.safetensors)."
            )
        return
    _fsspec_class(url, protocol)


def open_store(url: str, storage_options: Optional[Mapping[str, Any]]) -> tuple["Store", str]:
    """The store a URL names and the key within it. Raises as check_url
    does, and TypeError for storage_options that are not a dict."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(
            f"storage_options must be a dict, not {type(storage_options).__name__}."
        )
    check_url(url)
    protocol = url_protocol(url)
    options = dict(storage_options or {})
    if protocol in _S3_PROTOCOLS:
        bucket, _, key = _URL.match(url).group(2).partition("/")
        return S3Store(bucket, options, f"{protocol}://{bucket}/"), key
    return FsspecStore.for_url(url, protocol, options)


class Store:
    """See the module's docstring. ``min_part_size``: the smallest part
    the store takes (but for the last); ``max_parts``: the most parts of
    one object; ``parallel_parts``: whether parts may upload at once."""

    min_part_size = 1
    max_parts: Optional[int] = None
    parallel_parts = True

    def url(self, key: str) -> str:
        return self.prefix + key


# ---- S3, through boto3 ----------------------------------------------------

# boto3 keyword arguments under the names s3fs (and so pandas, datasets)
# give them in storage_options.
_S3FS_NAMES = {
    "key": "aws_access_key_id",
    "secret": "aws_secret_access_key",
    "token": "aws_session_token",
}
_CLIENT_ARGUMENTS = {
    "endpoint_url",
    "region_name",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "verify",
    "use_ssl",
}


def _s3_client(options: dict[str, Any], connections: int):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:
        raise ImportError(
            "saving to s3:// needs boto3: pip install 'trinity_stream_saver[s3]'."
        ) from error
    arguments: dict[str, Any] = dict(options.pop("client_kwargs", None) or {})
    profile = options.pop("profile", None)
    retries = options.pop("retries", 5)
    for name, value in options.items():
        name = _S3FS_NAMES.get(name, name)
        if name not in _CLIENT_ARGUMENTS:
            raise ValueError(
                f"storage_options key {name!r} is not known for s3://; use "
                f"{sorted(_CLIENT_ARGUMENTS | set(_S3FS_NAMES) | {'client_kwargs', 'profile', 'retries'})}."
            )
        arguments[name] = value
    # Credentials, region and endpoint (AWS_ENDPOINT_URL) come from the
    # standard environment and config files unless given here. Standard
    # retries (throttling, 5xx, broken connections) before a part fails.
    config = Config(
        retries={"max_attempts": int(retries), "mode": "standard"},
        max_pool_connections=max(10, connections),
    )
    return boto3.session.Session(profile_name=profile).client("s3", config=config, **arguments)


class _PartBody(io.RawIOBase):
    """A part's memory as the seekable file botocore reads a body from
    (to checksum it, then to send it, again on a retry), without a copy:
    read() returns views of the part, which the checksum and the socket
    take as they take bytes. Copies made one read at a time would cost
    allocations the size of a read on every upload thread."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1) -> memoryview:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        chunk = self._view[self._position:end]
        self._position = max(self._position, end)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _S3Upload:
    """One multipart upload."""

    def __init__(self, client, bucket: str, key: str) -> None:
        self._client = client
        self._target = {"Bucket": bucket, "Key": key}
        self._id = client.create_multipart_upload(**self._target)["UploadId"]
        self._etags: dict[int, str] = {}
        self._lock = threading.Lock()

    def upload_part(self, number: int, data: memoryview) -> None:
        response = self._client.upload_part(
            **self._target, UploadId=self._id, PartNumber=number, Body=_PartBody(data)
        )
        with self._lock:
            self._etags[number] = response["ETag"]

    def complete(self) -> None:
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        self._client.complete_multipart_upload(
            **self._target, UploadId=self._id, MultipartUpload={"Parts": parts}
        )

    def abort(self) -> None:
        self._client.abort_multipart_upload(**self._target, UploadId=self._id)


class S3Store(Store):
    """A bucket, through boto3: one client (thread-safe) for every upload."""

    min_part_size = S3_MIN_PART_SIZE
    max_parts = S3_MAX_PARTS

    def __init__(self, bucket: str, options: dict[str, Any], prefix: str) -> None:
        self._options = options
        self._bucket = bucket
        self.prefix = prefix
        self._client = None

    def connect(self, connections: int) -> None:
        """Makes the client, with a connection for each upload in flight."""
        self._client = _s3_client(dict(self._options), connections)

    def start(self, key: str) -> _S3Upload:
        return _S3Upload(self._client, self._bucket, key)

    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self._bucket, Key=key, Body=data)

    def sizes(self, prefix: str) -> dict[str, int]:
        found = {}
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            for entry in page.get("Contents", []):
                found[entry["Key"][len(prefix):]] = entry["Size"]
        return found

    def size(self, key: str) -> Optional[int]:
        from botocore.exceptions import ClientError

        try:
            return self._client.head_object(Bucket=self._bucket, Key=key)["ContentLength"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object, by one ranged GET
        (fewer at its end)."""
        if length <= 0:
            return b""
        response = self._client.get_object(
            Bucket=self._bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
        )
        return response["Body"].read()

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys
            response = self._client.delete_objects(
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": key} for key in keys[start:start + 1000]]},
            )
            if response.get("Errors"):
                error = response["Errors"][0]
                raise OSError(
                    f"could not delete {self.url(error['Key'])} ({error.get('Message')}); "
                    "the new checkpoint is complete, delete the object by hand."
                )


# ---- Any other protocol, through fsspec -------------------------------------


class _FsspecUpload:
    """One file opened for writing without autocommit: it appears at
    commit(), discard() drops it (for s3fs, gcsfs: complete or abort the
    upload; for local files: rename or remove a temporary file)."""

    def __init__(self, fs, path: str) -> None:
        self._file = fs.open(path, "wb", autocommit=False)

    def upload_part(self, number: int, data: memoryview) -> None:
        self._file.write(data)  # parts come in order (parallel_parts is False)

    def complete(self) -> None:
        self._file.close()
        self._file.commit()

    def abort(self) -> None:
        self._file.discard()


def _fsspec_class(url: str, protocol: str):
    """fsspec's filesystem class for `protocol`."""
    try:
        import fsspec
    except ImportError as error:
        raise ImportError(
            f"saving to {protocol}:// needs fsspec (and its implementation of {protocol}://); "
            "pip install fsspec, or use s3:// or a local path."
        ) from error
    try:
        return fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(
            f"{url!r}: the protocol {protocol!r} is not known to fsspec; give a local "
            "path, an s3:// URL, or a URL of a protocol fsspec knows "
            "(e.g. gs://, az://, file://)."
        ) from None
    except ImportError as error:
        raise ImportError(f"{url!r}: {error}") from error


class FsspecStore(Store):
    """A filesystem fsspec knows, as the protocol's fsspec implementation
    writes it; parts go one after the other, in order."""

    parallel_parts = False

    @classmethod
    def for_url(cls, url: str, protocol: str, options: dict[str, Any]) -> tuple["FsspecStore", str]:
        fs_class = _fsspec_class(url, protocol)
        fs = fs_class(**options)
        path = fs_class._strip_protocol(url)
        parent, _, name = path.rpartition("/")
        return cls(fs, protocol, parent), name

    def __init__(self, fs, protocol: str, root: str) -> None:
        self._fs = fs
        self._root = root
        self.prefix = f"{protocol}://{root}/" if root else f"{protocol}://"

    def connect(self, connections: int) -> None:
        pass

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if self._root else key

    def start(self, key: str) -> _FsspecUpload:
        return _FsspecUpload(self._fs, self._path(key))

    def put(self, key: str, data: bytes) -> None:
        self._fs.pipe_file(self._path(key), data)

    def sizes(self, prefix: str) -> dict[str, int]:
        directory = self._path(prefix).rstrip("/")
        if not self._fs.exists(directory):
            return {}
        return {
            entry["name"].rstrip("/").rpartition("/")[2]: entry["size"]
            for entry in self._fs.ls(directory, detail=True)
            if entry.get("type") != "directory"
        }

    def size(self, key: str) -> Optional[int]:
        path = self._path(key)
        return self._fs.size(path) if self._fs.isfile(path) else None

    def read(self, key: str, start: int, length: int) -> bytes:
        return self._fs.cat_file(self._path(key), start=start, end=start + length)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._fs.rm_file(self._path(key))
