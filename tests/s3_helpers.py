"""A real S3 server on 127.0.0.1 for the object-storage tests: moto's
ThreadedMotoServer (as s3fs and fsspec test themselves), and a small
proxy in front of it that answers chosen requests with server errors.
Nothing here reaches beyond loopback."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import uuid
from typing import Callable, NamedTuple, Optional

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS environment pointing boto3 at `endpoint`, with
    fake credentials and no config files of the machine's user."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "NO_PROXY": "127.0.0.1,localhost",
    }


class Bucket(NamedTuple):
    client: object
    name: str

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def objects(self) -> dict[str, bytes]:
        listing = self.client.list_objects_v2(Bucket=self.name)
        return {
            entry["Key"]: self.client.get_object(Bucket=self.name, Key=entry["Key"])["Body"].read()
            for entry in listing.get("Contents", [])
        }

    def pending_uploads(self) -> list[str]:
        listing = self.client.list_multipart_uploads(Bucket=self.name)
        return [upload["Key"] for upload in listing.get("Uploads", [])]

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 for the test module; its URL."""
    moto_server = pytest.importorskip("moto.server", reason="object-storage tests need moto[server]")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch) -> Bucket:
    """A new bucket, and the standard AWS environment pointing at it."""
    boto3 = pytest.importorskip("boto3", reason="object-storage tests need boto3")
    for key, value in s3_environment(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


class Reply(NamedTuple):
    """A reply the proxy sends: status, headers (name, value) and body."""

    status: int
    headers: list
    body: bytes


class FaultyProxy:
    """Forwards HTTP requests to `upstream` (host, port), except that a
    request for which `fail(method, path_and_query)` is true gets a 500
    InternalError reply without being forwarded (or, if it returns a
    Reply, that reply). Counts the failures, and
    the bytes of the response bodies it forwards (`served`).

    `edit(method, path, reply)` may return another Reply to send instead of
    the upstream's (a hostile server), and `dribble(method, path)` a number
    of seconds to wait before each byte of the body (a slow one)."""

    def __init__(self, upstream: tuple[str, int], fail: Callable[[str, str], bool],
                 edit: Optional[Callable[[str, str, Reply], Optional[Reply]]] = None,
                 dribble: Optional[Callable[[str, str], float]] = None) -> None:
        self.failures = 0
        self.served = 0
        self._lock = threading.Lock()
        self.fail = fail
        self.edit = edit
        self.dribble = dribble
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            # Trailers, then the blank line that ends them.
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self) -> None:
                body = self._body()
                failure = proxy.fail(self.command, self.path)
                if isinstance(failure, Reply):  # an answer of the test's, not forwarded
                    proxy.failures += 1
                    self.send_response(failure.status)
                    for key, value in failure.headers:
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(failure.body)))
                    self.end_headers()
                    self.wfile.write(failure.body)
                    return
                if failure:
                    proxy.failures += 1
                    reply = (
                        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError"
                        b"</Code><Message>injected by the test proxy</Message></Error>"
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                connection = http.client.HTTPConnection(*upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = f"{upstream[0]}:{upstream[1]}"
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                reply = Reply(response.status, response.getheaders(), data)
                if proxy.edit is not None:
                    reply = proxy.edit(self.command, self.path, reply) or reply
                self.send_response(reply.status)
                for key, value in reply.headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # A HEAD reply has no body but the object's length.
                length = dict((k.lower(), v) for k, v in reply.headers).get("content-length") \
                    if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    pause = proxy.dribble(self.command, self.path) if proxy.dribble else 0
                    if pause:
                        for position in range(len(reply.body)):
                            self.wfile.write(reply.body[position:position + 1])
                            self.wfile.flush()
                            time.sleep(pause)
                    else:
                        self.wfile.write(reply.body)
                    with proxy._lock:
                        proxy.served += len(reply.body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "FaultyProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
