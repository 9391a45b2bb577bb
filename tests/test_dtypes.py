"""The dtypes we write are exactly those safetensors.torch.save_file writes,
under the same names and header shapes; the rest are rejected clearly."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import (
    SUPPORTED_NAMES,
    all_torch_dtypes,
    assert_nothing_lost,
    read_bytes,
    read_header,
)
from trinity_stream_saver import _C, save_safetensors_streaming

SHAPE = (2, 4)


def sample(dtype: torch.dtype):
    """A small tensor of `dtype` with known bytes, or None if torch cannot
    make one (some dtypes have no tensors outside special constructors)."""
    width = dtype.itemsize
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.arange(SHAPE[0] * SHAPE[1] * width, dtype=torch.uint8) % 61
            return raw.reshape(SHAPE[0], SHAPE[1] * width).view(dtype)
    except (RuntimeError, TypeError):
        return None


def save_file_result(dtype: torch.dtype):
    """(header entry, data bytes) that save_file writes for sample(dtype), or
    None if save_file cannot save that dtype."""
    tensor = sample(dtype)
    if tensor is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "reference.safetensors")
        try:
            save_file({"x": tensor}, path)
        except Exception:  # noqa: BLE001 - any refusal means "cannot save"
            return None
        header = read_header(path)
        return header.entries["x"], read_bytes(path)[8 + header.size:]


SAVE_FILE_RESULTS = {dtype: save_file_result(dtype) for dtype in all_torch_dtypes()}
SAVEABLE = [dtype for dtype, result in SAVE_FILE_RESULTS.items() if result is not None]
NOT_SAVEABLE = [dtype for dtype, result in SAVE_FILE_RESULTS.items() if result is None]
CONSTRUCTIBLE_NOT_SAVEABLE = [dtype for dtype in NOT_SAVEABLE if sample(dtype) is not None]


def test_save_file_can_save_every_dtype_we_support():
    assert sorted(_C.safetensors_dtype(dtype) for dtype in SAVEABLE) == sorted(SUPPORTED_NAMES)


@pytest.mark.parametrize("dtype", SAVEABLE, ids=str)
def test_header_entry_matches_save_file(dest, dtype):
    expected_entry, expected_data = SAVE_FILE_RESULTS[dtype]
    tensor = sample(dtype)
    meta = [("x", _C.safetensors_dtype(dtype), list(tensor.shape))]
    save_safetensors_streaming(iter([("x", tensor)]), dest, meta)
    header = read_header(dest)
    assert header.entries["x"]["dtype"] == expected_entry["dtype"]
    assert header.entries["x"]["shape"] == expected_entry["shape"]
    assert header.entries["x"]["data_offsets"] == expected_entry["data_offsets"]
    assert read_bytes(dest)[8 + header.size:] == expected_data


@pytest.mark.parametrize("dtype", SAVEABLE, ids=str)
def test_safetensors_dtype_of_every_saveable_torch_dtype_is_known(dtype):
    assert _C.safetensors_dtype(dtype) == SAVE_FILE_RESULTS[dtype][0]["dtype"]


@pytest.mark.parametrize("dtype", NOT_SAVEABLE, ids=str)
def test_unsaveable_dtype_has_no_safetensors_name(dtype):
    assert _C.safetensors_dtype(dtype) is None


@pytest.mark.parametrize("dtype", CONSTRUCTIBLE_NOT_SAVEABLE, ids=str)
def test_tensor_of_unsaveable_dtype_is_rejected_listing_supported(existing_dest, dtype):
    tensor = sample(dtype)
    meta = [("ok", "F32", [2]), ("bad", "F64", list(SHAPE))]
    items = [("ok", torch.ones(2)), ("bad", tensor)]
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming(iter(items), existing_dest, meta)
    message = str(raised.value)
    assert "'bad'" in message
    assert all(name in message for name in SUPPORTED_NAMES)
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize("dtype", NOT_SAVEABLE, ids=str)
def test_meta_of_unsaveable_dtype_is_rejected_listing_supported(existing_dest, dtype):
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming(iter([]), existing_dest, [("bad", dtype, [2])])
    message = str(raised.value)
    assert "'bad'" in message
    assert all(name in message for name in SUPPORTED_NAMES)
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize("spelling", ["C128", "complex128", "torch.complex128", "float128", "fp8", ""])
def test_meta_dtype_name_that_is_not_saveable_is_rejected_listing_supported(existing_dest, spelling):
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming(iter([]), existing_dest, [("bad", spelling, [2])])
    message = str(raised.value)
    assert "'bad'" in message and spelling.removeprefix("torch.") in message
    assert all(name in message for name in SUPPORTED_NAMES)
    assert_nothing_lost(existing_dest)
