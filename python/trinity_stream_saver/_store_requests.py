"""How a store's requests are made: bounded by the save's deadline, and
failing with an OSError that names the request and the object.

botocore's own timeouts bound each socket operation, not a request: a
server that dribbles its reply one byte every few seconds never trips
``read_timeout``. A save given ``storage_options={"timeout": seconds}``
runs each request on a thread of its own and stops waiting when the
deadline passes; the error then says which request was waiting. Knows
nothing of safetensors or of which store it serves.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from typing import Any, Callable, Optional

#: After the deadline, each abort of an upload still gets this long (or
#: the whole timeout, if shorter): leaving parts behind is worse than a
#: few more seconds.
ABORT_ALLOWANCE = 30.0


def check_timeout(value: object) -> Optional[float]:
    """storage_options' "timeout": None, or a positive number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"storage_options 'timeout' must be a number of seconds, not "
                        f"{type(value).__name__}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"storage_options 'timeout' must be positive seconds, not {value!r}; "
                         "leave it out for no deadline.")
    return float(value)


def _client_module(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in ("botocore", "boto3", "urllib3")


def reply_error(what: str, problem: str) -> OSError:
    """A reply the save cannot use (a field missing, malformed XML)."""
    return OSError(errno.EPROTO, f"{what}: the server's reply {problem}; nothing was "
                                 "published from this request. Check the endpoint "
                                 "(AWS_ENDPOINT_URL, endpoint_url) and retry the save.")


class Requests:
    """Makes a store's requests: ``call(what, function, **arguments)``.
    `timeout` (seconds, or None) bounds the whole save from the moment
    this object is made."""

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def call(self, what: str, function: Callable[..., Any], **arguments: Any) -> Any:
        """`function(**arguments)`; `what` names the request and its object
        (e.g. "UploadPart 3 of s3://bucket/key") in any error."""
        limit = None
        if self._end is not None:
            limit = self._end - time.monotonic()
            if limit <= 0:
                raise self._expired(what, waiting=False)
        return self._run(what, function, arguments, limit)

    def call_to_clean_up(self, what: str, function: Callable[..., Any], **arguments: Any) -> Any:
        """As call(), for an abort: allowed ABORT_ALLOWANCE even past the
        deadline."""
        limit = None
        if self._end is not None:
            limit = max(self._end - time.monotonic(), min(self.timeout, ABORT_ALLOWANCE))
        return self._run(what, function, arguments, limit)

    def _run(self, what: str, function, arguments: dict, limit: Optional[float]) -> Any:
        if limit is None:
            return _translated(what, function, arguments)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = _translated(what, function, arguments)
            except BaseException as error:  # raised on the waiting thread
                outcome["error"] = error

        # A daemon thread: one stuck on a dribbling socket must not keep
        # the interpreter from exiting once the save has failed.
        thread = threading.Thread(target=run, name="trinity_stream_saver-request", daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            raise self._expired(what, waiting=True)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _expired(self, what: str, waiting: bool) -> TimeoutError:
        when = "while it was waiting for" if waiting else "before"
        return TimeoutError(
            errno.ETIMEDOUT,
            f"the save's timeout of {self.timeout:g} s passed {when} {what}; the save was "
            "stopped and its uploads aborted. Raise storage_options['timeout'] for a "
            "slower store, or check the server.",
        )


def _translated(what: str, function, arguments: dict) -> Any:
    """botocore's errors (no credentials, a closed port, a server error
    after the retries, an unparsable reply) as OSError naming the request:
    callers, the command line among them, handle OSError."""
    try:
        return function(**arguments)
    except Exception as error:
        # botocore's timeouts are OSErrors too, but say no more than a URL.
        if not _client_module(error) or (isinstance(error, OSError) and
                                         not type(error).__module__.startswith("botocore")):
            raise
        code = (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
        number = errno.ENOENT if code in ("404", "NoSuchKey", "NoSuchBucket", "NoSuchUpload",
                                          "NotFound") else \
            errno.EACCES if code in ("403", "AccessDenied") else errno.EIO
        raise OSError(number, f"{what} failed: {error}") from error
