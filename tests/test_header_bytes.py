"""Our files are byte-for-byte the ones the original seek-back saver writes,
and the header JSON is exactly Python's json.dumps of it."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import (
    SAFETENSORS_TO_TORCH,
    SUPPORTED_NAMES,
    assert_nothing_lost,
    assert_tensors_identical,
    make_tensor,
    meta_for,
    read_bytes,
    read_header,
)
from reference_saver import reference_save, reserved_header_size
from trinity_stream_saver import save_safetensors_streaming


def both_files(tmp_path, items, meta, metadata=None) -> tuple[bytes, bytes]:
    """(our file, the reference's file) for the same input."""
    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "reference.safetensors"
    save_safetensors_streaming(iter(items), ours, meta, metadata=metadata)
    reference_save(iter(items), theirs, meta, metadata=metadata)
    return read_bytes(ours), read_bytes(theirs)


def assert_same_as_reference(tmp_path, items, meta=None, metadata=None) -> None:
    if meta is None:
        meta = meta_for(items)
    ours, theirs = both_files(tmp_path, items, meta, metadata)
    assert ours[:8] == theirs[:8], "header length N differs"
    assert ours == theirs


# --------------------------------------------------------------------------
# dtypes and shapes
# --------------------------------------------------------------------------


# A 0-dim packed float4 tensor has no last dimension to unpack; safetensors
# cannot store it (test_bad_input covers its rejection).
DTYPE_SHAPE_CASES = [
    (name, shape)
    for name in SUPPORTED_NAMES
    for shape in [(), (0,), (1,), (3, 5), (2, 0, 4), (4, 3, 2)]
    if not (name == "F4" and shape == ())
]


@pytest.mark.parametrize(
    "name,shape", DTYPE_SHAPE_CASES, ids=[f"{n}-{list(s)}" for n, s in DTYPE_SHAPE_CASES]
)
def test_same_bytes_as_reference_for_dtype_and_shape(tmp_path, name, shape):
    dtype = SAFETENSORS_TO_TORCH[name]
    items = [("first", make_tensor(dtype, shape, seed=1)), ("second", make_tensor(dtype, (2,), seed=2))]
    assert_same_as_reference(tmp_path, items)


def test_same_bytes_as_reference_for_a_mixed_model(tmp_path):
    items = [
        (f"model.layers.{i}.{kind}", make_tensor(SAFETENSORS_TO_TORCH[name], shape, seed=i))
        for i, (name, kind, shape) in enumerate(
            [
                ("BF16", "q_proj.weight", (64, 32)),
                ("F32", "norm.weight", (32,)),
                ("F16", "k_proj.weight", (16, 32)),
                ("I64", "position_ids", (1, 128)),
                ("BOOL", "mask", (8, 8)),
                ("F8_E4M3", "w8", (16, 16)),
                ("F4", "w4", (16, 8)),
                ("C64", "rotary", (4, 4)),
                ("U8", "bytes", (0,)),
                ("F64", "scale", ()),
            ]
        )
    ]
    assert_same_as_reference(tmp_path, items)


def test_same_bytes_as_reference_for_non_contiguous_tensors(tmp_path):
    base = make_tensor(torch.float32, (6, 10), seed=5)
    items = [
        ("t", base.t()),
        ("s", base[::2, 1::3]),
        ("e", torch.arange(4, dtype=torch.int16).expand(3, 4)),
        ("b", make_tensor(torch.bfloat16, (5, 6), seed=6).t()),
    ]
    assert_same_as_reference(tmp_path, items)


# --------------------------------------------------------------------------
# names that need escaping
# --------------------------------------------------------------------------

AWKWARD_NAMES = {
    "latin1": "caf\u00e9.weight",
    "cjk": "\u5c42.\u6743\u91cd",
    "above_bmp": "emoji\U0001f600.and\U00010348",
    "max_codepoint": "\U0010ffff",
    "bmp_edges": "\ud7ff\ue000\uffff\u0080\u00ff\u0100",
    "line_separators": "a\u2028b\u2029c",
    "control_characters": "".join(chr(c) for c in range(0x20)),
    "short_escapes": "\b\f\n\r\t",
    "nul": "nul\x00byte",
    "delete_0x7f": "del\x7fete",
    "quotes": 'say "hi"',
    "backslashes": "back\\slash\\\\double\\u0041",
    "slash": "a/b</script>",
    "json_lookalike": '{"dtype":"F32"},',
    "spaces": "   ",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(AWKWARD_NAMES))
def test_same_bytes_as_reference_for_awkward_names(tmp_path, case):
    items = [(AWKWARD_NAMES[case], torch.arange(3, dtype=torch.float32)), ("plain", torch.ones(2))]
    assert_same_as_reference(tmp_path, items)


def test_same_bytes_as_reference_for_all_awkward_names_together(tmp_path):
    items = [(name, torch.full((2,), float(i))) for i, name in enumerate(AWKWARD_NAMES.values())]
    assert_same_as_reference(tmp_path, items)


@pytest.mark.parametrize(
    "name,escaped",
    [
        ("a\x7fb", rb'"a\u007fb"'),
        ("\x00\x1f", rb'"\u0000\u001f"'),
        ("\b\f\n\r\t", rb'"\b\f\n\r\t"'),
        ('q"\\', rb'"q\"\\"'),
        ("\u00e9\u2028", rb'"\u00e9\u2028"'),
        ("\U0001f600", rb'"\ud83d\ude00"'),
        ("\uabcd", rb'"\uabcd"'),
        ("a/b", rb'"a/b"'),
    ],
    ids=["0x7f", "controls", "short_escapes", "quote_backslash", "bmp", "surrogate_pair", "lowercase_hex", "slash"],
)
def test_names_are_escaped_as_python_json_escapes_them(dest, name, escaped):
    save_safetensors_streaming(iter([(name, torch.ones(1))]), dest, [(name, "F32", [1])])
    assert read_header(dest).json_bytes == b"{" + escaped + b':{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'


def test_header_is_pure_ascii_even_for_non_ascii_names(dest):
    name = "\u00e9\u5c42\U0001f600\x7f\x01"
    save_safetensors_streaming(iter([(name, torch.ones(1))]), dest, [(name, "F32", [1])])
    raw = read_header(dest).raw
    assert all(0x20 <= byte <= 0x7E for byte in raw)
    assert name in load_file(dest)


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {"format": "pt"},
        {"z": "1", "a": "2", "m": "3"},
        {"caf\u00e9": "\U0001f600\n\"\\\x7f", "": ""},
        {"long": "x" * 5000},
    ],
    ids=["absent", "one", "unsorted", "awkward", "long"],
)
def test_same_bytes_as_reference_with_metadata(tmp_path, metadata):
    items = [("w", make_tensor(torch.bfloat16, (4, 4))), ("b", make_tensor(torch.float32, (4,)))]
    assert_same_as_reference(tmp_path, items, metadata=metadata)


def test_empty_metadata_dict_is_written_as_save_file_writes_it(tmp_path):
    tensor = torch.ones(2)
    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "save_file.safetensors"
    save_safetensors_streaming(iter([("a", tensor)]), ours, [("a", "F32", [2])], metadata={})
    save_file({"a": tensor}, theirs, metadata={})
    assert read_header(ours).entries == read_header(theirs).entries


# --------------------------------------------------------------------------
# meta that differs from what is yielded (where the original's file is valid)
# --------------------------------------------------------------------------


# Deliberately unlike the original, which saves the shorter file: a
# generator that died early must not look like a good checkpoint.
@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_fewer_tensors_yielded_than_meta_rows_fail_and_leave_nothing(existing_dest, count):
    all_items = [(f"t{i}", make_tensor(torch.float16, (i + 1, 3), seed=i)) for i in range(6)]
    with pytest.raises(ValueError, match=f"stopped after {count} tensors, but state_dict_meta lists 6: {6 - count} missing"):
        save_safetensors_streaming(iter(all_items[:count]), existing_dest, meta_for(all_items))
    assert_nothing_lost(existing_dest)


def test_a_skipped_middle_tensor_fails_and_is_named(existing_dest):
    all_items = [(f"t{i}", make_tensor(torch.float32, (4,), seed=i)) for i in range(4)]
    items = [all_items[0], all_items[2], all_items[3]]
    with pytest.raises(ValueError, match="1 missing.*never yielded by name: 't1'"):
        save_safetensors_streaming(iter(items), existing_dest, meta_for(all_items))
    assert_nothing_lost(existing_dest)


def test_same_bytes_as_reference_when_meta_has_longer_different_names(tmp_path):
    items = [("a", torch.ones(3)), ("b", torch.zeros(2, dtype=torch.int8))]
    meta = [("a_much_longer_name", "F32", [3]), ("another_long_name", "I8", [2])]
    assert_same_as_reference(tmp_path, items, meta=meta)


def test_same_bytes_as_reference_when_meta_describes_bigger_tensors(tmp_path):
    items = [("a", torch.ones(3))]
    meta = [("a", "F64", [1000, 1000])]
    assert_same_as_reference(tmp_path, items, meta=meta)


def test_same_bytes_as_reference_when_yield_order_differs_but_fits(tmp_path):
    big, small = torch.zeros(2500, dtype=torch.uint8), torch.ones(2, dtype=torch.uint8)
    # meta order puts the big tensor first, so its offsets are the longer ones
    meta = [("big", "U8", [2500]), ("small", "U8", [2])]
    assert_same_as_reference(tmp_path, [("small", small), ("big", big)], meta=meta)


def test_reserved_size_is_computed_from_meta_not_from_the_tensors(tmp_path):
    items = [("a", torch.ones(2)), ("b", torch.ones(1))]
    meta = [("a", "F32", [2]), ("a_longer_name_for_b", "BF16", [7, 7])]
    path = tmp_path / "ours.safetensors"
    save_safetensors_streaming(iter(items), path, meta)
    assert read_header(path).size == reserved_header_size(meta)
    assert read_header(path).size > reserved_header_size(meta_for(items))


@pytest.mark.parametrize(
    "dtype,shape",
    [("U8", [2**62, 2]), ("F64", [2**60]), ("BF16", [2**62]), ("F32", [3, 2**60])],
    ids=["u8_2^63_bytes", "f64_2^63_bytes", "bf16_2^63_bytes", "f32_near_2^64_bytes"],
)
def test_reserved_size_matches_reference_for_meta_of_huge_tensors(tmp_path, dtype, shape):
    # Byte sizes below 2**64 but with more than 2**64 bits: too big to
    # allocate, not to describe. The offsets in the described header must be
    # the true ones, as the original computes them with Python ints.
    meta = [("huge", dtype, shape), ("after", "U8", [1])]
    path = tmp_path / "ours.safetensors"
    # Empty stand-ins, one per row: their entries fit the reserved header.
    items = [("huge", torch.empty(0, dtype=SAFETENSORS_TO_TORCH[dtype])), ("after", torch.empty(0, dtype=torch.uint8))]
    save_safetensors_streaming(iter(items), path, meta)
    assert read_header(path).size == reserved_header_size(meta)


# --------------------------------------------------------------------------
# the header text is json.dumps of itself
# --------------------------------------------------------------------------


def test_header_json_equals_python_json_dumps_of_the_loaded_header(dest):
    items = [(name, torch.full((2,), 1.0)) for name in AWKWARD_NAMES.values()]
    metadata = {"caf\u00e9": "\U0001f600", "ctl": "\x00\x7f"}
    save_safetensors_streaming(iter(items), dest, meta_for(items), metadata=metadata)
    header = read_header(dest)
    assert header.json_bytes == json.dumps(header.entries, separators=(",", ":")).encode("ascii")
    assert list(header.entries) == ["__metadata__"] + [name for name, _ in items]


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12
)
tensor_specs = st.lists(
    st.tuples(
        names,
        st.sampled_from(SUPPORTED_NAMES),
        st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=3),
    ),
    min_size=0,
    max_size=6,
    unique_by=lambda spec: spec[0],
).filter(lambda specs: "__metadata__" not in {spec[0] for spec in specs})


@settings(
    derandomize=True,
    database=None,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    specs=tensor_specs,
    metadata=st.none() | st.dictionaries(names, names, min_size=1, max_size=3),
    yielded=st.integers(min_value=0, max_value=6),
)
def test_same_bytes_as_reference_for_generated_inputs(specs, metadata, yielded):
    items = [
        (name, make_tensor(SAFETENSORS_TO_TORCH[dtype], shape, seed=i))
        for i, (name, dtype, shape) in enumerate(specs)
    ]
    meta = meta_for(items)
    items = items[: min(yielded, len(items))]
    with tempfile.TemporaryDirectory() as directory:
        ours = os.path.join(directory, "ours.safetensors")
        theirs = os.path.join(directory, "reference.safetensors")
        if len(items) < len(meta):  # the one rule where we depart from the original
            with pytest.raises(ValueError, match="missing"):
                save_safetensors_streaming(iter(items), ours, meta, metadata=metadata)
            assert not os.path.exists(ours) and not os.path.exists(ours + ".tmp")
            return
        save_safetensors_streaming(iter(items), ours, meta, metadata=metadata)
        reference_save(iter(items), theirs, meta, metadata=metadata)
        ours_bytes = read_bytes(ours)
        assert ours_bytes == read_bytes(theirs)
        header = read_header(ours)
        assert header.json_bytes == json.dumps(header.entries, separators=(",", ":")).encode()
        loaded = load_file(ours)
        for name, tensor in items:
            assert_tensors_identical(loaded[name], tensor)
