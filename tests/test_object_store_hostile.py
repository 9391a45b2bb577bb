"""Object storage against hostile input and hostile servers: mistyped
URLs never become local folders, replies that lack what the save needs,
a server that dribbles its reply, botocore's own options, and the publish
order when an older single file cannot be deleted. A real S3 server
(moto) on 127.0.0.1, with a proxy in front that edits or slows replies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import child_env, meta_for
from s3_helpers import FaultyProxy, Reply, bucket, moto_endpoint  # noqa: F401 (fixtures)

boto3 = pytest.importorskip("boto3", reason="object-storage tests need boto3 (requirements-dev.txt)")
from botocore.config import Config  # noqa: E402

from trinity_stream_saver import (  # noqa: E402
    save_model_streaming, save_safetensors_streaming, save_sharded_streaming,
)

MiB = 1 << 20
PART = 5 * MiB
ITEMS = [("a", torch.arange(12, dtype=torch.float32)), ("b", torch.ones(3, 4))]


def save_single(destination, **kwargs):
    return save_safetensors_streaming(iter(ITEMS), destination, meta_for(ITEMS), **kwargs)


def save_sharded(destination, **kwargs):
    return save_sharded_streaming(iter(ITEMS), destination, meta_for(ITEMS), **kwargs)


def save_model(destination, **kwargs):
    model = torch.nn.Linear(4, 3)
    return save_model_streaming(model, destination, **kwargs)


SAVES = {"single file": save_single, "sharded": save_sharded, "model": save_model}


def through_proxy(moto_endpoint, monkeypatch, **hooks) -> FaultyProxy:
    host, port = moto_endpoint.rsplit("//", 1)[1].split(":")
    proxy = FaultyProxy((host, int(port)), hooks.pop("fail", lambda method, path: False), **hooks)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    return proxy


# ---- mistyped URLs ------------------------------------------------------------

MISTYPED = {
    "s3:/bucket/run/ckpt": "s3://bucket/run/ckpt",
    "s3:bucket/run/ckpt": "s3://bucket/run/ckpt",
    " s3://bucket/run/ckpt": "s3://bucket/run/ckpt",
    "s3://bucket/run/ckpt\n": "s3://bucket/run/ckpt",
    "gs:/bucket/ckpt": "gs://bucket/ckpt",
}


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("given", MISTYPED)
def test_a_mistyped_url_is_an_error_naming_the_likely_url(tmp_path, monkeypatch, save, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(repr(MISTYPED[given]))):
        SAVES[save](given)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("save", SAVES)
def test_a_local_name_that_looks_like_a_scheme_is_written_with_dot_slash(tmp_path, monkeypatch, save):
    monkeypatch.chdir(tmp_path)
    destination = "./s3:/run" if save != "single file" else "./s3:model.safetensors"
    if save == "single file":
        SAVES[save](destination)
        assert os.path.isfile(tmp_path / "s3:model.safetensors")
    else:
        SAVES[save](destination)
        assert os.listdir(tmp_path / "s3:" / "run") == ["model.safetensors"]


@pytest.mark.parametrize("save", SAVES)
def test_a_url_without_a_bucket_is_a_value_error_even_under_python_O(tmp_path, save):
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_object_store_hostile as t\n"
        f"t.SAVES[{save!r}]('s3://')\n"
    )
    result = subprocess.run([sys.executable, "-O", "-c", code, os.path.dirname(__file__)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=child_env())
    assert result.returncode == 1
    assert "ValueError: 's3://' does not name" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


# ---- replies that lack what the save needs -------------------------------------


def without(field: str, where: str):
    """An edit that takes `field` out of the replies to requests matching
    `where` (its XML element, or its header)."""
    def edit(method, path, reply: Reply):
        if not re.search(where, f"{method} {path}"):
            return None
        body = re.sub(rf"<{field}>.*?</{field}>".encode(), b"", reply.body)
        headers = [(k, v) for k, v in reply.headers if k.lower() != field.lower()]
        return Reply(reply.status, headers, body)
    return edit


@pytest.mark.parametrize("field, where, operation", [
    ("UploadId", r"^POST .*\?uploads", "CreateMultipartUpload"),
    ("ETag", r"^PUT .*partNumber=", "UploadPart 1"),
])
def test_a_reply_without_what_the_save_needs_names_the_request_and_object(
        bucket, moto_endpoint, monkeypatch, field, where, operation):
    with through_proxy(moto_endpoint, monkeypatch, edit=without(field, where)):
        url = bucket.url("run/model.safetensors")
        with pytest.raises(OSError) as raised:
            save_single(url)
    message = str(raised.value)
    assert f"{operation} of {url}" in message and f"has no {field}" in message, message
    assert bucket.objects() == {}
    if field == "UploadId":
        # The upload the server made has no id to abort it by: the error says so.
        assert "lifecycle rule" in " ".join(raised.value.__notes__)
        assert bucket.pending_uploads() == ["run/model.safetensors"]
    else:
        assert bucket.pending_uploads() == []


def test_a_malformed_listing_fails_before_the_index_with_an_os_error(bucket, moto_endpoint,
                                                                    monkeypatch):
    def garbled(method, path, reply):
        if method == "GET" and "list-type=2" in path:
            return Reply(200, [("Content-Type", "application/xml")], b"<ListBucketResult><Conte")
        return None

    old = {"ckpt/model.safetensors": b"older"}
    bucket.put("ckpt/model.safetensors", b"older")
    with through_proxy(moto_endpoint, monkeypatch, edit=garbled):
        with pytest.raises(OSError, match="ListObjectsV2 of s3://"):
            save_sharded(bucket.url("ckpt"), max_shard_size=48)
    objects = bucket.objects()
    assert objects["ckpt/model.safetensors"] == old["ckpt/model.safetensors"]
    assert "ckpt/model.safetensors.index.json" not in objects
    assert bucket.pending_uploads() == []


# ---- a slow server, and botocore's own options -----------------------------------


def completing(method, path) -> bool:
    return method == "POST" and "uploadId=" in path


def local_bytes(tmp_path) -> bytes:
    save_single(tmp_path / "local.safetensors")
    return (tmp_path / "local.safetensors").read_bytes()


def test_a_dribbling_server_is_bounded_by_the_save_timeout(bucket, moto_endpoint, monkeypatch,
                                                          tmp_path):
    with through_proxy(moto_endpoint, monkeypatch,
                       dribble=lambda method, path: 2.0 if completing(method, path) else 0):
        url = bucket.url("run/model.safetensors")
        started = time.monotonic()
        with pytest.raises(TimeoutError) as raised:
            save_single(url, storage_options={"timeout": 4, "read_timeout": 3})
        took = time.monotonic() - started
    assert f"while it was waiting for CompleteMultipartUpload of {url}" in str(raised.value)
    assert took < 15, took
    # The server had completed the upload before it began to dribble the
    # reply: the abort (on another connection) finds none, and says that
    # the object is the new file, whole. Nothing is pending.
    assert "was completed after all" in " ".join(raised.value.__notes__)
    assert bucket.objects() == {"run/model.safetensors": local_bytes(tmp_path)}
    assert bucket.pending_uploads() == []


@pytest.mark.parametrize("options", [
    {"config": Config(read_timeout=1, retries={"max_attempts": 1})},
    {"client_kwargs": {"config": Config(read_timeout=1, retries={"max_attempts": 1})}},
    {"read_timeout": 1, "retries": 1},
])
def test_botocore_timeouts_given_in_storage_options_apply(bucket, moto_endpoint, monkeypatch,
                                                          options):
    def silent(method, path, reply):
        if completing(method, path):
            time.sleep(6)  # no byte at all for far longer than read_timeout
        return None

    with through_proxy(moto_endpoint, monkeypatch, edit=silent):
        started = time.monotonic()
        with pytest.raises(OSError, match="CompleteMultipartUpload of s3://.* failed: Read timeout"):
            save_single(bucket.url("m.safetensors"), storage_options=options)
        # The read timeout (1 s), not the server's reply (6 s), ended it.
        assert time.monotonic() - started < 5


def test_a_botocore_config_is_merged_with_ours(bucket):
    save_single(bucket.url("m.safetensors"),
                storage_options={"config": Config(connect_timeout=5, read_timeout=30)})
    assert list(bucket.objects()) == ["m.safetensors"]


@pytest.mark.parametrize("options, error, match", [
    ({"timeout": 0}, ValueError, "'timeout' must be positive"),
    ({"timeout": float("inf")}, ValueError, "'timeout' must be positive"),
    ({"timeout": float("nan")}, ValueError, "'timeout' must be positive"),
    ({"timeout": "10"}, TypeError, "'timeout' must be a number"),
    ({"config": {"read_timeout": 1}}, TypeError, "must be a botocore.config.Config"),
    ({"retries": 0}, ValueError, "'retries' must be an int of at least 1"),
])
def test_bad_client_options_are_clear_errors(bucket, options, error, match):
    with pytest.raises(error, match=match):
        save_single(bucket.url("m.safetensors"), storage_options=options)
    assert bucket.pending_uploads() == []


# ---- the publish order when the older single file cannot go ---------------------


def deletes(method, path) -> bool:
    return method == "POST" and path.split("?", 1)[1:] and "delete" in path.split("?", 1)[1]


def denied(method, path):
    if not deletes(method, path):
        return False
    body = (b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult><Error><Key>ckpt/model.safetensors'
            b'</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error></DeleteResult>')
    return Reply(200, [("Content-Type", "application/xml")], body)


@pytest.mark.parametrize("failure", ["denied", "server error"])
def test_an_older_single_file_that_cannot_be_deleted_keeps_the_new_index_unpublished(
        bucket, moto_endpoint, monkeypatch, failure):
    save_single(bucket.url("ckpt/model.safetensors"))
    old = bucket.objects()
    hooks = {"fail": denied if failure == "denied" else deletes}
    with through_proxy(moto_endpoint, monkeypatch, **hooks):
        with pytest.raises(OSError) as raised:
            save_sharded(bucket.url("ckpt"), max_shard_size=48, storage_options={"retries": 1})
    assert "loaders still read the older checkpoint" in str(raised.value)
    objects = bucket.objects()
    # What transformers loads: model.safetensors first, the index only
    # without it. The older file is whole and no index stands beside it.
    assert objects["ckpt/model.safetensors"] == old["ckpt/model.safetensors"]
    assert "ckpt/model.safetensors.index.json" not in objects
    assert bucket.pending_uploads() == []
