"""A pure-Python model of the original seek-back saver, written for the tests
from its description (trinity.utils.stream_saver), to compare bytes with.

The algorithm:
1. N = the length of the compact JSON header that state_dict_meta describes
   (one entry per meta row, in meta order, data offsets laid out in meta
   order, a leading "__metadata__" entry if metadata is given), rounded up
   to a multiple of 8.
2. Open path + ".tmp", skip 8 + N bytes.
3. For each (name, tensor) in yield order, append the tensor's C-order bytes
   and record its header entry.
4. json.dumps the entries (yield order, separators=(",", ":"), default
   ensure_ascii), pad with spaces to N, seek to 0, write N as a little-endian
   u64 and the header.
5. Rename onto path if asked to.

It only models inputs on which the original writes a valid file; where the
original would write a corrupt file (a header longer than N) this model
raises instead.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Optional

import torch

# torch dtype -> (safetensors name, header elements per torch element).
# float4_e2m1fn_x2 packs two F4 values per byte; safetensors writes the
# unpacked shape (last dimension doubled).
_DTYPES = {
    torch.bool: ("BOOL", 1),
    torch.uint8: ("U8", 1),
    torch.int8: ("I8", 1),
    torch.int16: ("I16", 1),
    torch.uint16: ("U16", 1),
    torch.int32: ("I32", 1),
    torch.uint32: ("U32", 1),
    torch.int64: ("I64", 1),
    torch.uint64: ("U64", 1),
    torch.float16: ("F16", 1),
    torch.bfloat16: ("BF16", 1),
    torch.float32: ("F32", 1),
    torch.float64: ("F64", 1),
    torch.complex64: ("C64", 1),
    torch.float8_e4m3fn: ("F8_E4M3", 1),
    torch.float8_e4m3fnuz: ("F8_E4M3FNUZ", 1),
    torch.float8_e5m2: ("F8_E5M2", 1),
    torch.float8_e5m2fnuz: ("F8_E5M2FNUZ", 1),
    torch.float8_e8m0fnu: ("F8_E8M0", 1),
    torch.float4_e2m1fn_x2: ("F4", 2),
}
_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}

# numpy holds none of bf16 / float8 / float4: write those (and everything
# else, harmlessly) through an integer dtype of the same width.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _torch_dtype(dtype) -> torch.dtype:
    """"BF16", torch.bfloat16, "bfloat16" or "torch.bfloat16" -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _BY_NAME:
        return _BY_NAME[dtype]
    value = getattr(torch, dtype.removeprefix("torch."))
    assert isinstance(value, torch.dtype), dtype
    return value


def _entry(dtype: torch.dtype, shape, begin: int) -> tuple[dict, int]:
    name, per_item = _DTYPES[dtype]
    shape = [int(dim) for dim in shape]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    header_shape = list(shape)
    if per_item != 1:
        header_shape[-1] *= per_item
    return {"dtype": name, "shape": header_shape, "data_offsets": [begin, begin + nbytes]}, begin + nbytes


def _dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("ascii")


def reserved_header_size(state_dict_meta, metadata: Optional[dict] = None) -> int:
    """N: the header that the metadata describes, rounded up to 8 bytes."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in state_dict_meta:
        header[name], offset = _entry(_torch_dtype(dtype), shape, offset)
    return (len(_dumps(header)) + 7) // 8 * 8


def _data_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().resolve_conj().resolve_neg().contiguous()
    tensor = tensor.view(_SAME_WIDTH_INT[tensor.element_size()])
    return tensor.numpy().tobytes()


def reference_save(
    tensor_iter,
    filepath,
    state_dict_meta,
    *,
    rename: bool = True,
    metadata: Optional[dict] = None,
) -> str:
    """Writes the file the original saver writes; returns the path written."""
    path = os.fspath(filepath)
    temp_path = path + ".tmp"
    reserved = reserved_header_size(state_dict_meta, metadata)
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    with open(temp_path, "wb") as file:
        file.write(b"\0" * (8 + reserved))
        offset = 0
        for name, tensor in tensor_iter:
            data = _data_bytes(tensor)
            file.write(data)
            header[name], offset = _entry(tensor.dtype, tensor.shape, offset)
            assert header[name]["data_offsets"][1] - header[name]["data_offsets"][0] == len(data)
            del tensor, data
        text = _dumps(header)
        if len(text) > reserved:
            raise ValueError(
                f"header of {len(text)} bytes does not fit the {reserved} reserved "
                "(the original would write a corrupt file here)"
            )
        file.seek(0)
        file.write(struct.pack("<Q", reserved) + text + b" " * (reserved - len(text)))
    if rename:
        os.replace(temp_path, path)
        return path
    return temp_path
