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

import errno
import io
import re
import threading
from collections.abc import Mapping
from typing import Any, Optional

from ._store_requests import Requests, check_timeout, reply_error

#: A URL's scheme, as RFC 3986 spells it (a Windows drive "C:\\" has no "//").
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)

#: A first path component that starts as a scheme does ("s3:", "s3:bucket",
#: "gs:"): a URL with a slash too few, or none, which would otherwise
#: become a local folder named "s3:".
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")

_S3_PROTOCOLS = ("s3", "s3a")

#: S3 takes at most 10000 parts, each but the last at least 5 MiB.
S3_MAX_PARTS = 10_000
S3_MIN_PART_SIZE = 5 << 20


def url_protocol(path: object, argument: str = "path") -> Optional[str]:
    """The protocol of a URL such as ``s3://bucket/key`` (lower case), or
    None for a local path. This is the one place that tells a URL from a
    local path: every save and command asks it.

    Raises ValueError for what is almost surely a mistyped URL, rather than
    writing a local folder of that name: white space around a URL, or a
    first component that starts like a scheme ("s3:/bucket/run",
    "s3:bucket"). A local name of that shape is written "./s3:..."."""
    if not isinstance(path, str):
        return None
    match = _URL.match(path)
    if match and path == path.strip():
        return match.group(1).lower()
    stripped = path.strip()
    if stripped != path and (_URL.match(stripped) or _SCHEME_LIKE.match(stripped)):
        raise ValueError(
            f"{argument} {path!r} has white space around a URL; did you mean {stripped!r}? "
            "Remove the white space."
        )
    scheme = _SCHEME_LIKE.match(path)
    if scheme:
        likely = f"{scheme.group(1)}://{path[scheme.end():].lstrip('/')}"
        raise ValueError(
            f"{argument} {path!r} looks like a mistyped URL; did you mean {likely!r}? "
            f"A URL is written {scheme.group(1)}://...; for a local file or folder of this "
            f"name write './{path}'."
        )
    return None


def check_url(url: str, *, prefix: bool = False) -> None:
    """Raises ValueError unless `url` names an object (or, with `prefix`,
    a prefix: a trailing "/" is allowed) of a protocol an installed library
    knows, ImportError naming what to install; connects to nothing."""
    protocol = url_protocol(url)
    if protocol is None:
        raise ValueError(f"{url!r} is not a URL (protocol://...).")
    if protocol in _S3_PROTOCOLS:
        bucket, _, key = _URL.match(url).group(2).partition("/")
        if prefix:
            key = key.rstrip("/")
        if not bucket or not key or key.endswith("/"):
            what = "prefix: give s3://bucket/prefix (e.g. s3://bucket/checkpoints/step-1000)" \
                if prefix else "object: give s3://bucket/key (e.g. s3://bucket/checkpoints/model.safetensors)"
            raise ValueError(f"{url!r} does not name an {what}.")
        return
    _fsspec_class(url, protocol)


def open_store(url: str, storage_options: Optional[Mapping[str, Any]], *,
               prefix: bool = False) -> tuple["Store", str]:
    """The store a URL names and the key (or, with `prefix`, the prefix,
    without its trailing "/") within it. Raises as check_url does, and
    TypeError for storage_options that are not a dict."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(
            f"storage_options must be a dict, not {type(storage_options).__name__}."
        )
    check_url(url, prefix=prefix)
    if prefix:
        url = url.rstrip("/")
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
#: Keys of storage_options that shape botocore's Config, and the save's own.
_CONFIG_KEYS = {"config", "connect_timeout", "read_timeout", "retries"}
_SAVE_KEYS = {"client_kwargs", "profile", "timeout"}


def default_retries() -> int:
    """Attempts per request: AWS_MAX_ATTEMPTS where set (as boto3 reads
    it), else 5. A closed port fails after them, for every save and
    command alike."""
    import os

    text = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(text) if text.isdigit() and int(text) > 0 else 5


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
    options.pop("timeout", None)  # the save's deadline: see _store_requests
    given = [options.pop("config", None), arguments.pop("config", None)]
    retries = options.pop("retries", None)
    timeouts = {name: options.pop(name) for name in ("connect_timeout", "read_timeout")
                if name in options}
    for name, value in options.items():
        name = _S3FS_NAMES.get(name, name)
        if name not in _CLIENT_ARGUMENTS:
            raise ValueError(
                f"storage_options key {name!r} is not known for s3://; use "
                f"{sorted(_CLIENT_ARGUMENTS | set(_S3FS_NAMES) | _CONFIG_KEYS | _SAVE_KEYS)}."
            )
        arguments[name] = value
    # Credentials, region and endpoint (AWS_ENDPOINT_URL) come from the
    # standard environment and config files unless given here. Standard
    # retries (throttling, 5xx, broken connections) before a part fails;
    # a user's Config (storage_options "config", or client_kwargs') is
    # merged over ours, and the explicit keys over both.
    config = Config(
        retries={"max_attempts": default_retries(), "mode": "standard"},
        max_pool_connections=max(10, connections),
    )
    for user_config in given:
        if user_config is None:
            continue
        if not isinstance(user_config, Config):
            raise TypeError(f"storage_options 'config' must be a botocore.config.Config, not "
                            f"{type(user_config).__name__}.")
        config = config.merge(user_config)
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"storage_options 'retries' must be an int of at least 1 "
                             f"(attempts per request), not {retries!r}.")
        config = config.merge(Config(retries={"max_attempts": retries, "mode": "standard"}))
    if timeouts:
        config = config.merge(Config(**timeouts))
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


def _field(response: Any, name: str, what: str) -> Any:
    """`response[name]`, or an OSError saying which reply lacked it."""
    if not isinstance(response, Mapping) or not response.get(name):
        raise reply_error(what, f"has no {name}")
    return response[name]


class CompletedAfterAll(OSError):
    """An abort found the upload completed: the object is in place, whole."""


class _S3Upload:
    """One multipart upload."""

    def __init__(self, store: "S3Store", key: str) -> None:
        self._store = store
        self._url = store.url(key)
        self._target = {"Bucket": store.bucket, "Key": key}
        client = store.client
        what = f"CreateMultipartUpload of {self._url}"
        try:
            self._id = _field(store.requests.call(what, client.create_multipart_upload,
                                                  **self._target), "UploadId", what)
        except OSError as error:
            # Without its id an upload the server made cannot be aborted.
            error.add_note("If the server made the upload, the bucket's lifecycle rule for "
                           "incomplete multipart uploads removes it.")
            raise
        self._etags: dict[int, str] = {}
        self._lock = threading.Lock()
        self._completing = False

    def upload_part(self, number: int, data: memoryview) -> None:
        what = f"UploadPart {number} of {self._url}"
        response = self._store.requests.call(
            what, self._store.client.upload_part, **self._target, UploadId=self._id,
            PartNumber=number, Body=_PartBody(data))
        etag = _field(response, "ETag", what)
        with self._lock:
            self._etags[number] = etag

    def complete(self) -> None:
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        self._completing = True
        self._store.requests.call(
            f"CompleteMultipartUpload of {self._url}", self._store.client.complete_multipart_upload,
            **self._target, UploadId=self._id, MultipartUpload={"Parts": parts})

    def abort(self) -> None:
        try:
            self._store.requests.call_to_clean_up(
                f"AbortMultipartUpload of {self._url}", self._store.client.abort_multipart_upload,
                **self._target, UploadId=self._id)
        except FileNotFoundError as error:  # NoSuchUpload
            if not self._completing:
                raise
            # A completion whose reply never came (a timeout) took effect.
            raise CompletedAfterAll(error.errno, f"{self._url} was completed after all: the completion's "
                          "reply did not arrive in time, but the server made the object, "
                          "which holds the new file, whole.") from error


class S3Store(Store):
    """A bucket, through boto3: one client (thread-safe) for every upload;
    every request through `requests` (the save's deadline, errors that
    name the request)."""

    min_part_size = S3_MIN_PART_SIZE
    max_parts = S3_MAX_PARTS

    def __init__(self, bucket: str, options: dict[str, Any], prefix: str) -> None:
        self._options = options
        self.bucket = bucket
        self.prefix = prefix
        self.client = None
        self.requests = Requests(check_timeout(options.get("timeout")))

    def connect(self, connections: int) -> None:
        """Makes the client, with a connection for each upload in flight."""
        self.client = self.requests.call(f"making the S3 client for {self.prefix}", _s3_client,
                                         options=dict(self._options), connections=connections)

    def start(self, key: str) -> _S3Upload:
        return _S3Upload(self, key)

    def put(self, key: str, data: bytes) -> None:
        self.requests.call(f"PutObject of {self.url(key)}", self.client.put_object,
                           Bucket=self.bucket, Key=key, Body=data)

    def sizes(self, prefix: str) -> dict[str, int]:
        what = f"ListObjectsV2 of {self.url(prefix)}"

        def listing() -> dict[str, int]:
            found = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    if "Key" not in entry or "Size" not in entry:
                        raise reply_error(what, "lists an object without its key or size")
                    found[entry["Key"][len(prefix):]] = entry["Size"]
            return found

        return self.requests.call(what, listing)

    def size(self, key: str) -> Optional[int]:
        what = f"HeadObject of {self.url(key)}"
        try:
            response = self.requests.call(what, self.client.head_object, Bucket=self.bucket,
                                          Key=key)
        except FileNotFoundError:
            return None
        if not isinstance(response.get("ContentLength"), int):
            raise reply_error(what, "has no ContentLength")
        return response["ContentLength"]

    def read(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object, by one ranged GET
        (fewer at its end)."""
        if length <= 0:
            return b""
        return self.requests.call(
            f"GetObject of {self.url(key)} (bytes {start}-{start + length - 1})",
            lambda: self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )["Body"].read())

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys
            batch = keys[start:start + 1000]
            response = self.requests.call(
                f"DeleteObjects of {self.url(batch[0])} and {len(batch) - 1} more",
                self.client.delete_objects, Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch]},
            )
            if response.get("Errors"):
                error = response["Errors"][0]
                raise OSError(
                    errno.EACCES if error.get("Code") == "AccessDenied" else errno.EIO,
                    f"could not delete {self.url(error.get('Key', '?'))} "
                    f"({error.get('Code')}: {error.get('Message')})."
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
