"""Argument normalising shared by the save functions: paths, dtype
spellings, metadata and sizes become what the C++ core takes, and what
cannot be used gets a clear TypeError or ValueError here."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Optional

import torch

from ._extension import _C


def _unsupported_dtype(name: object, dtype: object) -> ValueError:
    return ValueError(
        f"state_dict_meta entry {_C.short_repr(name)} has dtype {_C.short_repr(dtype)}, which cannot be "
        f"saved. Use a torch.dtype, its name (e.g. 'bfloat16') or a safetensors "
        f"dtype: {', '.join(_C.supported_dtypes())}."
    )

def _resolve_dtype(name: object, dtype: object) -> str:
    """The safetensors name of a dtype given as torch.bfloat16, "bfloat16" or
    "torch.bfloat16" (safetensors names such as "BF16" never reach here)."""
    if isinstance(dtype, str):
        torch_dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise _unsupported_dtype(name, dtype)
        dtype = torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"state_dict_meta entry {_C.short_repr(name)} has a dtype of type "
            f"{type(dtype).__name__}; expected a str or a torch.dtype."
        )
    safetensors_name = _C.safetensors_dtype(dtype)
    if safetensors_name is None:
        raise _unsupported_dtype(name, dtype)
    return safetensors_name

def _check_meta(state_dict_meta: object) -> None:
    # Entries are checked in C++ as they are read: a Python loop over the
    # tens of thousands of entries of a large model costs more than saving
    # its small tensors.
    if isinstance(state_dict_meta, (str, bytes, Mapping)) or not isinstance(
        state_dict_meta, Iterable
    ):
        raise TypeError(
            "state_dict_meta must be a list of TensorMeta or (name, dtype, shape) "
            f"tuples, not {type(state_dict_meta).__name__}."
        )

def _path(argument: str, value: object) -> str:
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{argument} must be a str or os.PathLike of str, not {_C.short_repr(path)}.")
    if "\0" in path:
        raise ValueError(
            f"{argument} {_C.short_repr(path)} contains a null byte; no file can have that name."
        )
    return path

def _reject_mapping(tensor_iter: object) -> None:
    # Iterating a dict yields its keys, which would fail on the first item
    # with a less helpful message.
    if isinstance(tensor_iter, Mapping):
        raise TypeError(
            "tensor_iter must yield (name, tensor) pairs, but a dict was passed; "
            "pass state_dict.items() instead."
        )

def _normalise_metadata(metadata: object) -> Optional[list[tuple[str, str]]]:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a dict of str to str, not {type(metadata).__name__}."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str, but has {_C.short_repr(key)}: "
                f"{_C.short_repr(value)}; convert values with str() first."
            )
    return list(metadata.items())

def _max_queued_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_queued_bytes must be an int, not {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"max_queued_bytes must not be negative, but is {value}.")
    return min(value, 2**64 - 1)

# huggingface_hub's units (parse_size_to_int): "5GB" is 5 * 10**9 bytes.
_DECIMAL_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}

# Binary units, as transformers also reads them: "5GiB" is 5 * 2**30 bytes.
_BINARY_UNITS = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10}

_MAX_SIZE = (1 << 64) - 1

def _parse_size(max_shard_size: object) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "1.5GB" or
    "2GiB", as huggingface_hub's parse_size_to_int computes them."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise TypeError(
            "max_shard_size must be an int (bytes) or a str such as '5GB', not "
            f"{type(max_shard_size).__name__}."
        )
    if isinstance(max_shard_size, int):
        size = max_shard_size
    else:
        text = max_shard_size.strip()
        for units, width in ((_BINARY_UNITS, 3), (_DECIMAL_UNITS, 2)):
            unit = text[-width:].upper()
            if unit in units:
                try:
                    size = int(float(text[:-width].strip()) * units[unit])
                except (ValueError, OverflowError):
                    raise ValueError(
                        f"max_shard_size {max_shard_size!r} does not start with a number."
                    ) from None
                break
        else:
            raise ValueError(
                f"max_shard_size {max_shard_size!r} has no known unit; use TB, GB, MB, KB "
                "(powers of 10, as huggingface_hub), TiB, GiB, MiB, KiB, or an int of bytes."
            )
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"max_shard_size {max_shard_size!r} must be between 0 and 2**64 - 1 bytes.")
    return size
