"""The command line on object storage (moto's S3 server on 127.0.0.1,
reached through the standard AWS environment, AWS_ENDPOINT_URL, as boto3
reads it): `convert SRC s3://...` writes the objects of a local
conversion, side files included, atomically; `inspect` and `verify` read
s3:// checkpoints by range requests, the headers only (and the data for
`verify --against`)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cli_helpers import SIDE_FILES, make_source, run_cli, run_cli_subprocess
from conftest import read_bytes, tiny_model
from s3_helpers import FaultyProxy, bucket, moto_endpoint  # noqa: F401 (fixtures)

pytest.importorskip("boto3", reason="object-storage tests need boto3 (requirements-dev.txt)")

MiB = 1 << 20


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def source(model, tmp_path_factory):
    """A model folder (config, tokenizer files, pytorch_model.bin)."""
    return make_source("bin_folder", model, tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def local(source, tmp_path_factory):
    """The local conversion of `source`, to compare with."""
    folder = tmp_path_factory.mktemp("local") / "out"
    result = run_cli("convert", source, folder, "--max-shard-size", "150KB", "--no-progress")
    assert result.returncode == 0, result.stderr
    return folder


def folder_objects(folder, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{name}": read_bytes(folder / name) for name in os.listdir(folder)}


def convert_to(bucket, source, key: str = "out"):
    return run_cli("convert", source, bucket.url(key), "--max-shard-size", "150KB", "--no-progress")


# ---- convert ------------------------------------------------------------------


def test_convert_to_s3_writes_the_objects_of_a_local_conversion_side_files_included(
        bucket, source, local):
    result = convert_to(bucket, source)
    assert result.returncode == 0, result.stderr
    assert f"into {bucket.url('out/model.safetensors.index.json')}" in result.stdout
    expected = folder_objects(local, "out")
    assert {f"out/{name}" for name in SIDE_FILES} <= set(expected)
    assert bucket.objects() == expected
    assert bucket.pending_uploads() == []


def test_a_failed_convert_to_s3_adds_no_object_and_leaves_no_upload(bucket, source, monkeypatch):
    from trinity_stream_saver.cli import convert as convert_module

    real = convert_module.save_sharded_streaming

    def failing_after_three(tensors, *args, **kwargs):
        def stream():
            for count, item in enumerate(tensors):
                if count == 3:
                    raise OSError("injected: the source could not be read")
                yield item

        return real(stream(), *args, **kwargs)

    bucket.put("out/config.json", b"an older config")
    monkeypatch.setattr(convert_module, "save_sharded_streaming", failing_after_three)
    result = convert_to(bucket, source)
    assert result.returncode == 1
    assert "injected: the source could not be read" in result.stderr
    assert bucket.objects() == {"out/config.json": b"an older config"}
    assert bucket.pending_uploads() == []


def test_convert_to_an_unknown_protocol_is_an_error_and_never_a_local_folder(
        source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("convert", source, "nosuchstore://bucket/out", "--no-progress")
    assert result.returncode == 1
    assert "protocol 'nosuchstore' is not known" in result.stderr
    assert os.listdir(tmp_path) == []


# ---- inspect and verify --------------------------------------------------------


def without_paths(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "path"}


@pytest.mark.parametrize("where", ["folder", "index", "single file"])
def test_inspect_of_s3_reports_what_inspect_of_the_local_checkpoint_does(
        bucket, source, local, tmp_path, where):
    if where == "single file":
        run_cli("convert", source, tmp_path / "one", "--no-progress")
        bucket.client.upload_file(str(tmp_path / "one" / "model.safetensors"), bucket.name,
                                  "one/model.safetensors")
        local_path, url = tmp_path / "one" / "model.safetensors", bucket.url("one/model.safetensors")
    else:
        assert convert_to(bucket, source).returncode == 0
        suffix = "/model.safetensors.index.json" if where == "index" else ""
        local_path, url = f"{local}{suffix}", bucket.url("out") + suffix
    remote = run_cli("inspect", url, "--json")
    assert remote.returncode == 0, remote.stderr
    mine = json.loads(remote.stdout)
    assert mine["path"] == url
    assert without_paths(mine) == without_paths(json.loads(run_cli("inspect", local_path, "--json").stdout))


def test_verify_of_s3_checks_every_object_and_the_values_against_the_source(bucket, source):
    assert convert_to(bucket, source).returncode == 0
    result = run_cli("verify", bucket.url("out"), "--against", source)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK {bucket.url('out')}: ")
    assert "values equal to" in result.stdout


def test_verify_of_s3_names_an_object_cut_short_and_a_tensor_that_differs(bucket, source, model):
    assert convert_to(bucket, source).returncode == 0
    shards = sorted(key for key in bucket.objects() if key.endswith("-of-00004.safetensors")
                    or key.endswith(".safetensors"))
    cut, changed = shards[0], shards[-1]
    data = bucket.objects()
    bucket.put(cut, data[cut][:-1])
    # The same size, one byte of data flipped: only --against sees it.
    flipped = bytearray(data[changed])
    flipped[-1] ^= 0xFF
    bucket.put(changed, bytes(flipped))
    result = run_cli("verify", bucket.url("out"), "--against", source)
    assert result.returncode == 1
    assert f"BAD '{bucket.url(cut)}' is not a complete safetensors file" in result.stdout
    assert f"BAD {bucket.url(changed)}: tensor" in result.stdout and "different values" in result.stdout


def test_inspect_of_a_large_s3_object_reads_only_its_header(bucket, moto_endpoint, monkeypatch):
    from trinity_stream_saver import save_safetensors_streaming

    items = [("small", torch.ones(4)), ("large", torch.zeros(48 * MiB, dtype=torch.uint8))]
    url = bucket.url("big/model.safetensors")
    save_safetensors_streaming(iter(items), url, [(n, t.dtype, list(t.shape)) for n, t in items])
    host, port = moto_endpoint.rsplit("//", 1)[1].split(":")
    with FaultyProxy((host, int(port)), lambda method, path: False) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        inspected = run_cli("inspect", url)
        verified = run_cli("verify", bucket.url("big"))
    assert inspected.returncode == 0, inspected.stderr
    assert "large" in inspected.stdout and "50,331,648" in inspected.stdout
    assert verified.returncode == 0, verified.stdout
    # Two headers of under 200 bytes each, and a listing; not the 48 MiB.
    assert 0 < proxy.served < 8192, proxy.served


def test_inspect_of_a_torch_file_in_s3_says_to_download_it(bucket, tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.bin")
    bucket.client.upload_file(str(tmp_path / "model.bin"), bucket.name, "m/pytorch_model.bin")
    result = run_cli("inspect", bucket.url("m/pytorch_model.bin"))
    assert result.returncode == 1
    assert "torch.save files are read from local disk only" in result.stderr


def test_inspect_of_a_missing_s3_checkpoint_is_an_error_naming_it(bucket):
    result = run_cli("inspect", bucket.url("nothing/here"))
    assert result.returncode == 1
    assert f"{bucket.url('nothing/here')}: no such file or folder" in result.stderr


# ---- as a user runs it ---------------------------------------------------------


@pytest.mark.slow
def test_convert_then_verify_against_s3_in_fresh_interpreters_with_only_the_aws_environment(
        bucket, source):
    converted = run_cli_subprocess("convert", source, bucket.url("run"), "--max-shard-size", "150KB")
    assert converted.returncode == 0, converted.stderr
    verified = run_cli_subprocess("verify", bucket.url("run"), "--against", source)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"OK {bucket.url('run')}: ")
    assert bucket.pending_uploads() == []


# ---- an unreachable store, and no credentials ------------------------------------


def unreachable(monkeypatch, attempts: int = 2) -> None:
    """The AWS environment pointing at a closed port, with `attempts`
    attempts per request (the standard AWS_MAX_ATTEMPTS)."""
    from s3_helpers import free_port, s3_environment

    for key, value in s3_environment(f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))


def one_error_line(result, prog: str = "python -m trinity_stream_saver") -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


def test_convert_to_a_closed_port_fails_with_one_error_line_in_bounded_time(source, monkeypatch):
    import time

    unreachable(monkeypatch)
    started = time.monotonic()
    result = run_cli_subprocess("convert", source, "s3://bucket/out", "--no-progress")
    line = one_error_line(result)
    assert "of s3://bucket/out/" in line and "Could not connect" in line, line
    # A fresh interpreter imports torch (seconds) before its two attempts.
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("command", [["inspect", "s3://bucket/out"],
                                     ["verify", "s3://bucket/out"],
                                     ["convert", None, "s3://bucket/out", "--no-progress"]])
def test_every_command_fails_on_a_closed_port_within_the_same_bound(source, monkeypatch, command):
    import time

    unreachable(monkeypatch)
    started = time.monotonic()
    result = run_cli(*[source if part is None else part for part in command])
    line = one_error_line(result)
    assert "s3://bucket/out" in line and "Could not connect" in line, line
    # Two attempts with the standard back-off: about a second or two,
    # whichever the command.
    assert time.monotonic() - started < 8


def test_convert_without_credentials_fails_with_one_error_line(source, moto_endpoint, monkeypatch):
    from s3_helpers import s3_environment

    for key, value in s3_environment(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    line = one_error_line(run_cli("convert", source, "s3://bucket/out", "--no-progress"))
    assert "Unable to locate credentials" in line, line


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_prefix_of_shards_without_an_index_is_checked_as_the_same_folder(
        bucket, source, local, tmp_path, command):
    # What a save killed before its index leaves.
    assert convert_to(bucket, source).returncode == 0
    bucket.client.delete_object(Bucket=bucket.name, Key="out/model.safetensors.index.json")
    folder = tmp_path / "out"
    folder.mkdir()
    for name in os.listdir(local):
        if name.endswith(".safetensors"):
            (folder / name).write_bytes(read_bytes(local / name))
    shards = sorted(name for name in os.listdir(folder))
    assert len(shards) >= 2
    remote, here = run_cli(command, bucket.url("out")), run_cli(command, folder)
    assert "Traceback" not in remote.stderr and "not supported" not in remote.stderr, remote.stderr
    assert remote.returncode == here.returncode, (remote.stdout, remote.stderr)
    assert remote.stdout.replace(bucket.url("out"), str(folder)) == here.stdout
