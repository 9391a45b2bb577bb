"""Hostile and odd input, generated: every file written for any names
(control characters, quotes, backslashes, the empty string, very long
names, anything but lone surrogates), shapes (scalars, zero-size and up to
8 dimensions, contiguous or not), dtypes and metadata loads back bit-exact,
carries exactly the header Python's json.dumps writes, and is byte-for-byte
the reference saver's file. Malformed state_dict_meta gets TypeError or
ValueError and writes nothing.

Derandomized, with modest example counts, so that the file runs in well
under a minute and fails the same way every time.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import (
    PREEXISTING,
    SAFETENSORS_TO_TORCH,
    SUPPORTED_NAMES,
    all_torch_dtypes,
    assert_nothing_lost,
    assert_tensors_identical,
    make_tensor,
    meta_for,
    read_bytes,
    read_header,
)
from reference_saver import reference_save, reserved_header_size
from trinity_stream_saver import _C, save_safetensors_streaming

PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------

# Any code point but a lone surrogate (which is not valid Unicode and is
# rejected, see test_bad_input.py). Control characters, quotes, backslashes,
# 0x7F, non-BMP characters included.
any_character = st.characters(exclude_categories=("Cs",))
awkward_character = st.sampled_from(['"', "\\", "\x00", "\n", "\x1f", "\x7f", "\u2028", "\U0001f600", "/"])
short_text = st.text(any_character, max_size=16)
awkward_text = st.builds(lambda *parts: "".join(parts), short_text, st.text(awkward_character, min_size=1, max_size=4), short_text)
long_text = st.builds(lambda piece, times: piece * times, st.text(any_character, min_size=1, max_size=4), st.integers(500, 4000))
names = st.one_of(short_text, awkward_text, awkward_text, long_text)

# Up to 8 dimensions of 1..3, some with a zero-size dimension;
# the empty shape is a scalar.
sizes = st.lists(st.integers(min_value=1, max_value=3), max_size=8)
with_zero = st.builds(lambda dims, at: dims[:at] + [0] + dims[at:], st.lists(st.integers(1, 3), max_size=7), st.integers(0, 7))
shapes = st.one_of(sizes, sizes, sizes, with_zero).map(tuple)

LAYOUTS = ["contiguous", "transposed", "strided_slice"]


def build_tensor(dtype: torch.dtype, shape: tuple, layout: str, seed: int) -> torch.Tensor:
    """A tensor of `shape`, contiguous or a non-contiguous view of another."""
    if layout == "transposed" and len(shape) >= 2:
        # Row-major storage of the reversed shape, viewed in reverse order.
        return make_tensor(dtype, shape[::-1], seed).permute(*reversed(range(len(shape))))
    if layout == "strided_slice" and len(shape) >= 1:
        wider = shape[:-1] + (2 * shape[-1] + 1,)
        return make_tensor(dtype, wider, seed)[..., 1::2]
    return make_tensor(dtype, shape, seed)


@st.composite
def checkpoints(draw):
    """(items, metadata): uniquely named tensors of any supported dtype,
    shape and layout, and a str -> str metadata dict or None."""
    specs = draw(
        st.lists(
            st.tuples(names, st.sampled_from(SUPPORTED_NAMES), shapes, st.sampled_from(LAYOUTS)),
            max_size=6,
            unique_by=lambda spec: spec[0],
        ).filter(lambda specs: all(spec[0] != "__metadata__" for spec in specs))
    )
    items = []
    for seed, (name, dtype_name, shape, layout) in enumerate(specs):
        if dtype_name == "F4" and shape == ():
            shape = (1,)  # a packed 0-dim tensor has no last dimension to unpack
        items.append((name, build_tensor(SAFETENSORS_TO_TORCH[dtype_name], shape, layout, seed)))
    metadata = draw(st.none() | st.dictionaries(names, names, max_size=4))
    return items, metadata


def save_in(directory: str, items, metadata, file_name: str = "model.safetensors") -> str:
    path = os.path.join(directory, file_name)
    save_safetensors_streaming(iter(items), path, meta_for(items), metadata=metadata)
    return path


def expected_header_json(items, metadata) -> bytes:
    """The header built as a plain dict in yield order and dumped by Python."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        shape = list(tensor.shape)
        if tensor.dtype == torch.float4_e2m1fn_x2:
            shape[-1] *= 2  # safetensors counts the unpacked F4 values
        header[name] = {"dtype": _C.safetensors_dtype(tensor.dtype), "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return json.dumps(header, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------
# every file written is right
# --------------------------------------------------------------------------


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(checkpoint=checkpoints())
def test_every_file_written_loads_back_bit_exact_with_json_dumps_header_and_reference_bytes(checkpoint):
    # One save per example, three claims about it: writing the file is the
    # cost, and the same checkpoints serve all three.
    items, metadata = checkpoint
    with tempfile.TemporaryDirectory() as directory:
        path = save_in(directory, items, metadata)
        loaded = load_file(path)
        header = read_header(path)
        ours = read_bytes(path)
        theirs_path = os.path.join(directory, "reference.safetensors")
        reference_save(iter(items), theirs_path, meta_for(items), metadata=metadata)
        theirs = read_bytes(theirs_path)
    # Loads back bit-exact.
    assert sorted(loaded) == sorted(name for name, _ in items)
    for name, tensor in items:
        assert_tensors_identical(loaded[name], tensor)
    # The header is Python's json.dumps of its content, padded to the reserved size.
    expected = expected_header_json(items, metadata)
    assert header.json_bytes == expected
    assert header.size == reserved_header_size(meta_for(items), metadata)
    assert header.raw == expected + b" " * (header.size - len(expected))
    # Byte for byte the reference saver's file.
    assert ours == theirs


# --------------------------------------------------------------------------
# malformed state_dict_meta
# --------------------------------------------------------------------------

# torch dtypes that safetensors cannot store, as objects and by name.
UNSUPPORTED_TORCH_DTYPES = [dtype for dtype in all_torch_dtypes() if _C.safetensors_dtype(dtype) is None]
unknown_dtype_names = st.sampled_from(
    ["F33", "f32", "bf16", "BF 16", "", "float128", "Tensor", "nn", "torch.", "torch.F32"]
    + [str(dtype) for dtype in UNSUPPORTED_TORCH_DTYPES]
    + [str(dtype).removeprefix("torch.") for dtype in UNSUPPORTED_TORCH_DTYPES]
) | st.text(any_character, max_size=12).filter(
    # Not a safetensors name, and not torch's name for a dtype it has.
    lambda text: text not in SUPPORTED_NAMES and not hasattr(torch, text.removeprefix("torch."))
)

not_rows = st.sampled_from([5, 1.5, None, "w", b"abc", "abc", {"name": "w"}, {"w", "F32"}, object()])
wrong_length_rows = st.lists(st.just("w"), max_size=6).filter(lambda row: len(row) != 3).map(tuple)
not_str_names = st.sampled_from([None, 7, 1.5, b"w", ("w",), ["w"], torch.ones(1)])
wrongly_typed_dtypes = st.sampled_from([None, 3, 1.5, b"F32", ["F32"], float, int, object()])
wrongly_typed_shapes = st.sampled_from([None, 3, 1.5, "12", b"12", {3}, {0: 3}, object(), iter([3])])
wrongly_typed_dims = st.sampled_from([1.0, "3", None, True, False, b"1", [1], (2,), torch.tensor(2.5)])
not_meta = st.sampled_from([None, 5, 1.5, "meta", b"meta", object(), {"w": ("F32", [1])}])

# (how a valid meta is broken, the exception that must follow)
CORRUPTIONS = {
    "row_not_a_row": TypeError,
    "row_of_wrong_length": TypeError,
    "name_not_a_str": TypeError,
    "name_lone_surrogate": ValueError,
    "name_reserved": ValueError,
    "name_duplicated": ValueError,
    "dtype_wrong_type": TypeError,
    "dtype_unknown": ValueError,
    "dtype_torch_unsupported": ValueError,
    "shape_wrong_type": TypeError,
    "dim_wrong_type": TypeError,
    "dim_negative": ValueError,
    "dim_too_large": ValueError,
    "meta_not_a_list_of_rows": TypeError,
}


@st.composite
def malformed_metas(draw):
    """(items, malformed meta, expected exception): a valid checkpoint whose
    meta is broken in one way at a random row (or as a whole)."""
    count = draw(st.integers(min_value=1, max_value=5))
    items = [(f"t{i}", torch.full((2, 3), float(i))) for i in range(count)]
    meta = [list(row) for row in meta_for(items)]
    corruption = draw(st.sampled_from(sorted(CORRUPTIONS)))
    at = draw(st.integers(min_value=0, max_value=count - 1))
    row = meta[at]
    if corruption == "row_not_a_row":
        meta[at] = draw(not_rows)
    elif corruption == "row_of_wrong_length":
        meta[at] = draw(wrong_length_rows)
    elif corruption == "name_not_a_str":
        row[0] = draw(not_str_names)
    elif corruption == "name_lone_surrogate":
        row[0] = draw(short_text) + draw(st.characters(categories=("Cs",))) + draw(short_text)
    elif corruption == "name_reserved":
        row[0] = "__metadata__"
    elif corruption == "name_duplicated":
        meta.insert(draw(st.integers(0, count)), list(meta[at]))
    elif corruption == "dtype_wrong_type":
        row[1] = draw(wrongly_typed_dtypes)
    elif corruption == "dtype_unknown":
        row[1] = draw(unknown_dtype_names)
    elif corruption == "dtype_torch_unsupported":
        row[1] = draw(st.sampled_from(UNSUPPORTED_TORCH_DTYPES))
    elif corruption == "shape_wrong_type":
        row[2] = draw(wrongly_typed_shapes)
    else:
        dims = list(row[2])
        position = draw(st.integers(0, len(dims) - 1))
        if corruption == "dim_wrong_type":
            dims[position] = draw(wrongly_typed_dims)
        elif corruption == "dim_negative":
            dims[position] = draw(st.integers(max_value=-1))
        elif corruption == "dim_too_large":
            dims[position] = draw(st.integers(min_value=2**63))
        row[2] = draw(st.sampled_from([list, tuple]))(dims)
    if corruption == "meta_not_a_list_of_rows":
        meta = draw(not_meta)
    elif isinstance(meta, list):
        meta = [tuple(entry) if isinstance(entry, list) else entry for entry in meta]
    return items, meta, CORRUPTIONS[corruption]


class Tracked:
    """An iterator over items that remembers whether it was ever advanced."""

    def __init__(self, items):
        self.items = iter(items)
        self.advanced = False

    def __iter__(self):
        return self

    def __next__(self):
        self.advanced = True
        return next(self.items)


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(case=malformed_metas())
def test_malformed_meta_is_a_type_or_value_error_before_the_iterator_is_advanced_and_writes_nothing(case):
    # The header size comes from state_dict_meta alone, before any tensor
    # arrives: no tensor is produced (gathered, copied to CPU) in vain.
    items, meta, exception_type = case
    tracked = Tracked(items)
    with tempfile.TemporaryDirectory() as directory:
        dest = os.path.join(directory, "model.safetensors")
        with open(dest, "wb") as file:
            file.write(PREEXISTING)
        with pytest.raises(exception_type):
            save_safetensors_streaming(tracked, dest, meta)
        assert not tracked.advanced
        assert_nothing_lost(dest)
        assert os.listdir(directory) == ["model.safetensors"]
