"""The command line: ``trinity-stream-saver`` (or ``python -m
trinity_stream_saver``) with ``convert``, ``inspect`` and ``verify``.

This module only parses arguments and turns errors into messages and exit
statuses: 0 success, 1 failure (a bad checkpoint, an unreadable source),
2 a usage error, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .._arguments import _parse_size
from .checkpoint import CheckpointError

PROG = "trinity-stream-saver"

_DESCRIPTION = """\
Convert, inspect and verify safetensors checkpoints, one tensor in memory.

examples:
  %(prog)s convert pytorch_model.bin out/ --dtype bf16
  %(prog)s inspect out/
  %(prog)s verify out/ --against pytorch_model.bin
  %(prog)s convert model_folder/ s3://bucket/run/ckpt
  %(prog)s inspect s3://bucket/run/ckpt

s3:// paths use the standard AWS environment and config (AWS_ENDPOINT_URL,
AWS_PROFILE, credentials), as boto3 reads them.
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint to sharded safetensors",
        description=(
            "Convert SRC into a sharded safetensors checkpoint in the folder DST, with "
            "model.safetensors.index.json, streaming one tensor at a time. SRC is a "
            "torch.save file (.bin, .pt, .pth), a folder holding pytorch_model.bin or "
            "pytorch_model-0000k-of-0000n.bin shards with pytorch_model.bin.index.json, or "
            "a safetensors file or folder (to re-shard). The other files of a source folder "
            "(config.json, generation_config.json, tokenizer files...) are copied. Tensors "
            "that share storage are written once. DST may be an object storage prefix "
            "(s3://bucket/prefix): the shards are streamed into multipart uploads and the "
            "side files uploaded, nothing appearing unless the whole conversion succeeds."
        ),
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint file or folder to convert")
    convert.add_argument("destination", metavar="DST",
                         help="folder to write (created if missing), or s3://bucket/prefix")
    convert.add_argument(
        "--max-shard-size",
        default="5GB",
        type=_shard_size,
        metavar="SIZE",
        help='largest shard, as the hub writes it: "5GB" (10^9 bytes), "500MiB", or bytes (default: 5GB)',
    )
    convert.add_argument(
        "--dtype",
        choices=("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
        help="cast floating-point tensors (F16, BF16, F32, F64) to this dtype; others are kept",
    )
    convert.add_argument(
        "--fsync", action="store_true", help="put the data and the renames on disk before returning"
    )
    convert.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    inspect = commands.add_parser(
        "inspect",
        help="list the tensors of a checkpoint",
        description=(
            "Print a table of every tensor of the checkpoint at PATH (name, dtype, shape, "
            "bytes, file), then totals (tensors, parameters, bytes, files) and the metadata. "
            "Reads headers only (by range requests for s3://). PATH is a safetensors or "
            "torch.save file, an index, or a folder; or a safetensors object, index or "
            "prefix in s3://."
        ),
    )
    inspect.add_argument("path", metavar="PATH", help="checkpoint file or folder")
    inspect.add_argument("--json", action="store_true", help="print the same data as JSON")

    verify = commands.add_parser(
        "verify",
        help="check that a safetensors checkpoint is whole",
        description=(
            "Check every safetensors file of PATH (header length and JSON, known dtypes, "
            "byte lengths equal to dtype size times shape, offsets contiguous from 0 covering "
            "the data, file size 8 + N + data) and its index (every file exists and holds its "
            "tensors, no tensor missing or duplicated, total_size right). Exits 0 when "
            "everything holds, 1 naming each bad file and what is wrong. PATH may be in "
            "s3://: only the headers are read (by range requests), and the data for --against."
        ),
    )
    verify.add_argument("path", metavar="PATH", help="safetensors file, index, or folder")
    verify.add_argument(
        "--against",
        metavar="SRC",
        help="also compare every tensor's values with this checkpoint (any layout convert reads)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    arguments = build_parser(prog).parse_args(argv)
    try:
        if arguments.command == "convert":
            from .convert import convert

            convert(
                arguments.source,
                arguments.destination,
                max_shard_size=arguments.max_shard_size,
                dtype=arguments.dtype,
                fsync=arguments.fsync,
                progress=not arguments.no_progress,
            )
            return 0
        if arguments.command == "inspect":
            from . import inspect

            return inspect.run(arguments.path, arguments.json)
        from . import verify

        return verify.run(arguments.path, arguments.against)
    except BrokenPipeError:
        # The reader (`| head`) has gone: stop quietly, as other tools do,
        # and keep Python from complaining again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CheckpointError, OSError, ValueError, TypeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    """The installed distribution's version, with the torch it was built for."""
    from importlib import metadata

    try:
        version = metadata.version("trinity_stream_saver")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    import torch

    return f"{version} (torch {torch.__version__})"


def _shard_size(text: str) -> int:
    """Bytes, read as the saver reads max_shard_size (as the hub does), so
    that a bad size is a usage error before anything is read."""
    try:
        return _parse_size(int(text) if text.isdigit() else text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
