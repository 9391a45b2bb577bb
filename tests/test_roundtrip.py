"""Files written by save_safetensors_streaming load back through safetensors
with the same names, dtypes, shapes and bytes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    PREEXISTING,
    SAFETENSORS_TO_TORCH,
    SUPPORTED_NAMES,
    assert_nothing_lost,
    assert_tensors_identical,
    make_tensor,
    meta_for,
    read_bytes,
    read_header,
    tensor_bytes,
)
from trinity_stream_saver import _C, save_safetensors_streaming


def save(items, path, **kwargs):
    items = list(items)
    return save_safetensors_streaming(iter(items), path, meta_for(items), **kwargs)


def assert_loads_back(path, items) -> None:
    """Both safetensors readers return exactly `items`."""
    expected = dict(items)
    loaded = load_file(path)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert_tensors_identical(loaded[name], tensor)
    with safe_open(path, framework="pt") as file:
        assert set(file.keys()) == set(expected)
        for name, tensor in expected.items():
            assert_tensors_identical(file.get_tensor(name), tensor)


# --------------------------------------------------------------------------
# every dtype
# --------------------------------------------------------------------------


def test_every_supported_dtype_maps_to_one_torch_dtype():
    assert sorted(SAFETENSORS_TO_TORCH) == sorted(SUPPORTED_NAMES)


@pytest.mark.parametrize("name", SUPPORTED_NAMES)
def test_every_dtype_round_trips(dest, name):
    dtype = SAFETENSORS_TO_TORCH[name]
    items = [("a", make_tensor(dtype, (3, 5), seed=1)), ("b", make_tensor(dtype, (7,), seed=2))]
    save(items, dest)
    assert_loads_back(dest, items)


@pytest.mark.parametrize("name", SUPPORTED_NAMES)
def test_every_dtype_is_written_under_its_safetensors_name(dest, name):
    dtype = SAFETENSORS_TO_TORCH[name]
    save([("x", make_tensor(dtype, (2, 4)))], dest)
    entry = read_header(dest).entries["x"]
    assert entry["dtype"] == name
    expected_shape = [2, 8] if name == "F4" else [2, 4]
    assert entry["shape"] == expected_shape


def test_float4_header_doubles_the_last_dimension(dest):
    tensor = make_tensor(torch.float4_e2m1fn_x2, (3, 5))
    save([("f4", tensor)], dest)
    entry = read_header(dest).entries["f4"]
    assert entry == {"dtype": "F4", "shape": [3, 10], "data_offsets": [0, 15]}
    assert_loads_back(dest, [("f4", tensor)])


# --------------------------------------------------------------------------
# shapes and counts
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64]
)
def test_zero_dim_scalar_round_trips(dest, dtype):
    items = [("scalar", make_tensor(dtype, ()))]
    save(items, dest)
    assert read_header(dest).entries["scalar"]["shape"] == []
    assert_loads_back(dest, items)


def test_zero_dim_bfloat16_that_the_original_crashed_on_round_trips(dest):
    items = [("s", torch.tensor(1.5, dtype=torch.bfloat16))]
    save(items, dest)
    assert load_file(dest)["s"].item() == 1.5


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)])
def test_zero_size_tensor_round_trips(dest, shape):
    items = [("before", torch.arange(3.0)), ("empty", torch.empty(shape)), ("after", torch.arange(2.0))]
    save(items, dest)
    entries = read_header(dest).entries
    assert entries["empty"]["shape"] == list(shape)
    assert entries["empty"]["data_offsets"] == [12, 12]
    assert entries["after"]["data_offsets"] == [12, 20]
    assert_loads_back(dest, items)


def test_single_tensor_round_trips(dest):
    items = [("only", make_tensor(torch.float32, (16, 16)))]
    save(items, dest)
    assert_loads_back(dest, items)


def test_zero_tensors_write_an_empty_but_valid_file(dest):
    save_safetensors_streaming(iter([]), dest, [])
    header = read_header(dest)
    assert header.raw == b"{}      "
    assert os.path.getsize(dest) == 16
    assert load_file(dest) == {}


def test_many_tensors_of_mixed_dtypes_round_trip(dest):
    items = [
        (f"layer.{i}.{name}", make_tensor(SAFETENSORS_TO_TORCH[name], (i % 4 + 1, 3), seed=i))
        for i, name in enumerate(SUPPORTED_NAMES * 3)
    ]
    save(items, dest)
    assert_loads_back(dest, items)


def test_data_follows_the_header_in_yield_order(dest):
    items = [("z", torch.tensor([1, 2], dtype=torch.int8)), ("a", torch.tensor([3], dtype=torch.int8))]
    save(items, dest)
    header = read_header(dest)
    assert list(header.entries) == ["z", "a"]
    assert read_bytes(dest)[8 + header.size :] == bytes([1, 2, 3])


# --------------------------------------------------------------------------
# kinds of iterables and paths
# --------------------------------------------------------------------------


def test_generator_input_round_trips(dest):
    tensors = {f"t{i}": make_tensor(torch.float32, (i + 1,), seed=i) for i in range(5)}
    meta = meta_for(tensors.items())
    save_safetensors_streaming(((k, v) for k, v in tensors.items()), dest, meta)
    assert_loads_back(dest, tensors.items())


def test_dict_items_input_round_trips(dest):
    state_dict = {"w": make_tensor(torch.float16, (4, 4)), "b": make_tensor(torch.float16, (4,))}
    save_safetensors_streaming(state_dict.items(), dest, meta_for(state_dict.items()))
    assert_loads_back(dest, state_dict.items())


def test_list_items_may_be_lists_instead_of_tuples(dest):
    tensor = make_tensor(torch.float32, (3,))
    save_safetensors_streaming([["a", tensor]], dest, [("a", "F32", [3])])
    assert_loads_back(dest, [("a", tensor)])


def test_rename_true_returns_the_destination_as_str_and_leaves_no_temp(dest):
    result = save([("a", torch.ones(2))], dest)
    assert result == dest and type(result) is str
    assert not os.path.exists(dest + ".tmp")


def test_rename_true_replaces_an_existing_destination(existing_dest):
    items = [("a", torch.ones(2))]
    save(items, existing_dest)
    assert_loads_back(existing_dest, items)


def test_rename_false_returns_the_temp_path_and_leaves_destination_untouched(existing_dest):
    items = [("a", make_tensor(torch.float32, (5,)))]
    result = save(items, existing_dest, rename=False)
    assert result == existing_dest + ".tmp"
    assert read_bytes(existing_dest) == PREEXISTING
    assert_loads_back(result, items)


def test_rename_false_without_existing_destination_does_not_create_it(dest):
    save([("a", torch.ones(1))], dest, rename=False)
    assert not os.path.exists(dest)
    assert os.path.exists(dest + ".tmp")


def test_filepath_may_be_a_pathlib_path(tmp_path):
    path = tmp_path / "model.safetensors"
    items = [("a", torch.arange(4))]
    result = save(items, path)
    assert result == str(path) and type(result) is str
    assert_loads_back(path, items)


def test_pathlib_path_with_rename_false_returns_str_temp_path(tmp_path):
    path = tmp_path / "model.safetensors"
    result = save([("a", torch.arange(4))], path, rename=False)
    assert result == str(path) + ".tmp" and type(result) is str


def test_stale_temp_file_is_replaced(dest):
    with open(dest + ".tmp", "wb") as file:
        file.write(b"x" * 10_000)
    items = [("a", torch.ones(2))]
    save(items, dest)
    assert not os.path.exists(dest + ".tmp")
    assert os.path.getsize(dest) == 8 + read_header(dest).size + 8


def test_file_gets_the_permissions_open_would_give_it(dest):
    umask = os.umask(0o022)
    try:
        save([("a", torch.ones(2))], dest)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------


def test_metadata_round_trips_through_safe_open(dest):
    metadata = {"format": "pt", "step": "1200", "note": "héllo \"quoted\" \n"}
    items = [("a", torch.ones(2))]
    save(items, dest, metadata=metadata)
    with safe_open(dest, framework="pt") as file:
        assert file.metadata() == metadata
    assert_loads_back(dest, items)


def test_metadata_is_the_first_header_key(dest):
    save([("a", torch.ones(2)), ("b", torch.ones(1))], dest, metadata={"k": "v"})
    assert list(read_header(dest).entries) == ["__metadata__", "a", "b"]


def test_metadata_keeps_the_callers_key_order(dest):
    metadata = {"zeta": "1", "alpha": "2", "mid": "3"}
    save([("a", torch.ones(2))], dest, metadata=metadata)
    assert list(read_header(dest).entries["__metadata__"]) == ["zeta", "alpha", "mid"]


def test_metadata_with_zero_tensors_round_trips(dest):
    save_safetensors_streaming([], dest, [], metadata={"k": "v"})
    with safe_open(dest, framework="pt") as file:
        assert file.metadata() == {"k": "v"}
        assert list(file.keys()) == []


def test_no_metadata_means_no_metadata_key(dest):
    save([("a", torch.ones(2))], dest)
    assert "__metadata__" not in read_header(dest).entries


# --------------------------------------------------------------------------
# header size
# --------------------------------------------------------------------------


def test_header_size_is_exact_with_500_long_names(dest):
    items = [
        (f"model.layers.{i}.self_attn." + "very_long_projection_name_" * 8 + f"{i}.weight",
         torch.full((i % 3 + 1, 2), float(i), dtype=torch.bfloat16))
        for i in range(500)
    ]
    meta = meta_for(items)
    save_safetensors_streaming(iter(items), dest, meta)
    offset, described = 0, {}
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        described[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    json_size = len(json.dumps(described, separators=(",", ":")))
    header = read_header(dest)
    assert header.size == (json_size + 7) // 8 * 8
    assert header.size % 8 == 0
    assert header.size - len(header.json_bytes) < 8
    assert_loads_back(dest, items)


def test_metadata_counts_in_the_reserved_header_size(dest):
    metadata = {"description": "x" * 1000}
    items = [("a", torch.ones(2))]
    save(items, dest, metadata=metadata)
    described = {"__metadata__": metadata, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    json_size = len(json.dumps(described, separators=(",", ":")))
    assert read_header(dest).size == (json_size + 7) // 8 * 8


def test_a_header_shorter_than_reserved_is_padded_with_spaces(dest):
    meta = [("a", "F32", [2]), ("a_long_name_for_b", "F32", [100, 100])]
    items = [("a", torch.ones(2)), ("b", torch.zeros(3))]
    save_safetensors_streaming(items, dest, meta)
    header = read_header(dest)
    assert set(header.raw[len(header.json_bytes):]) == {ord(" ")}
    assert list(header.entries) == ["a", "b"]
    assert_loads_back(dest, items)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_iterator_that_stops_early_fails_the_save(existing_dest, overlap):
    meta = [("a", "F32", [2]), ("b", "F32", [100, 100])]
    with pytest.raises(ValueError, match="1 missing.*'b'"):
        save_safetensors_streaming([("a", torch.ones(2))], existing_dest, meta, overlap=overlap)
    assert_nothing_lost(existing_dest)


def test_renamed_keys_count_as_the_rows_they_stand_for(dest):
    # e.g. FSDP prefixes stripped after the meta was collected
    meta = [("_fsdp_wrapped_module.a", "F32", [2])]
    save_safetensors_streaming([("a", torch.ones(2))], dest, meta)
    assert_loads_back(dest, [("a", torch.ones(2))])


# --------------------------------------------------------------------------
# non-contiguous inputs are written in C order
# --------------------------------------------------------------------------


def _noncontiguous_cases():
    base = make_tensor(torch.float32, (6, 8), seed=3)
    complex_base = make_tensor(torch.complex64, (4, 5), seed=4)
    cases = {
        "transposed": base.t(),
        "sliced_with_steps": base[1::2, ::3],
        "narrowed_columns": base[:, 2:5],
        "storage_offset_contiguous": base[2:],
        "expanded_zero_stride": torch.arange(5.0).expand(4, 5),
        "expanded_scalar": torch.tensor(7, dtype=torch.int16).expand(3, 2),
        "channels_last": make_tensor(torch.float32, (2, 3, 4, 5), seed=5).to(memory_format=torch.channels_last),
        "conj_view": complex_base.conj(),
        "conj_transposed": complex_base.conj().t(),
        "neg_view": complex_base.conj().imag,
        "requires_grad": make_tensor(torch.float32, (3, 4), seed=6).requires_grad_(),
        "requires_grad_transposed": make_tensor(torch.float32, (3, 4), seed=7).requires_grad_().t(),
        "non_leaf_with_grad": (make_tensor(torch.float32, (3, 4), seed=8).requires_grad_() * 2).t(),
        "bfloat16_transposed": make_tensor(torch.bfloat16, (5, 7), seed=9).t(),
        "bool_sliced": make_tensor(torch.bool, (9, 4), seed=10)[::2],
        "float8_transposed": make_tensor(torch.float8_e4m3fn, (5, 3), seed=11).t(),
        "float4_transposed": make_tensor(torch.float4_e2m1fn_x2, (5, 3), seed=12).t(),
        "uint64_sliced": make_tensor(torch.uint64, (6, 4), seed=13)[:, ::2],
        "complex_sliced": complex_base[::2, 1::2],
        "permuted_3d": make_tensor(torch.int32, (2, 3, 4), seed=14).permute(2, 0, 1),
        "zero_dim_conj": torch.tensor(1 + 2j, dtype=torch.complex64).conj(),
    }
    # The cases must exercise what their names say.
    assert cases["conj_view"].is_conj() and cases["zero_dim_conj"].is_conj()
    assert cases["neg_view"].is_neg()
    assert cases["storage_offset_contiguous"].storage_offset() > 0
    special = {"conj_view", "zero_dim_conj", "storage_offset_contiguous", "requires_grad"}
    assert not any(t.is_contiguous() for name, t in cases.items() if name not in special)
    return cases


NONCONTIGUOUS = _noncontiguous_cases()


@pytest.mark.parametrize("case", sorted(NONCONTIGUOUS))
def test_non_contiguous_input_is_saved_in_c_order(dest, case):
    tensor = NONCONTIGUOUS[case]
    save([("x", tensor)], dest)
    header = read_header(dest)
    data = read_bytes(dest)[8 + header.size:]
    assert data == tensor_bytes(tensor)
    assert_loads_back(dest, [("x", tensor.detach())])


def test_non_contiguous_inputs_are_left_unchanged(dest):
    complex_base = make_tensor(torch.complex64, (4, 5), seed=4)
    view = complex_base.conj()
    before = complex_base.clone()
    save([("x", view), ("y", complex_base.t())], dest)
    assert view.is_conj()
    assert torch.equal(complex_base, before)


def test_large_non_contiguous_tensor_bigger_than_a_chunk_round_trips(dest):
    # ~100 MiB of int16 as a transposed view: larger than CHUNK_BYTES, so it
    # is put in C order piece by piece.
    generator = torch.Generator().manual_seed(42)
    base = torch.randint(-(2**15), 2**15, (5000, 10500), dtype=torch.int16, generator=generator)
    view = base.t()
    assert view.numel() * view.element_size() > _C.CHUNK_BYTES
    save([("small", torch.ones(3)), ("big", view), ("tail", torch.arange(3))], dest)
    with safe_open(dest, framework="pt") as file:
        assert torch.equal(file.get_tensor("big"), view)
        assert torch.equal(file.get_tensor("small"), torch.ones(3))
        assert torch.equal(file.get_tensor("tail"), torch.arange(3))


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.bfloat16, torch.float32, torch.complex64],
                         ids=str)
def test_large_transposed_matrix_of_every_element_width_round_trips(dest, dtype):
    # Rows of a transposed matrix go through the tiled transpose, one chunk
    # of rows at a time; odd sizes leave partial tiles at both edges.
    width = torch.empty((), dtype=dtype).element_size()
    rows = (_C.CHUNK_BYTES + (3 << 20)) // (width * 1027)
    view = make_tensor(dtype, (1027, rows), seed=width).t()
    assert view.stride(0) == 1 and view.numel() * width > _C.CHUNK_BYTES
    save([("big", view)], dest)
    with safe_open(dest, framework="pt") as file:
        assert_tensors_identical(file.get_tensor("big"), view)


def test_large_tensor_whose_single_row_exceeds_a_chunk_round_trips(dest):
    generator = torch.Generator().manual_seed(43)
    base = torch.randint(0, 256, (1, 2 * (_C.CHUNK_BYTES + (8 << 20))), dtype=torch.uint8, generator=generator)
    view = base[:, ::2]
    assert view.numel() > _C.CHUNK_BYTES
    save([("row", view)], dest)
    with safe_open(dest, framework="pt") as file:
        assert torch.equal(file.get_tensor("row"), view)


def test_large_contiguous_tensor_bigger_than_a_chunk_round_trips(dest):
    generator = torch.Generator().manual_seed(44)
    tensor = torch.randint(0, 256, (_C.CHUNK_BYTES + 12345,), dtype=torch.uint8, generator=generator)
    save([("a", torch.ones(1)), ("flat", tensor)], dest)
    with safe_open(dest, framework="pt") as file:
        assert torch.equal(file.get_tensor("flat"), tensor)


# --------------------------------------------------------------------------
# tensor subclasses and threads
# --------------------------------------------------------------------------


class TaggedTensor(torch.Tensor):
    pass


def test_parameters_and_plain_subclasses_round_trip(dest):
    parameter = torch.nn.Parameter(make_tensor(torch.float32, (3, 4)))
    tagged = make_tensor(torch.bfloat16, (2, 5)).as_subclass(TaggedTensor)
    items = [("param", parameter), ("param_t", parameter.t()), ("tagged", tagged)]
    save(items, dest)
    assert_loads_back(dest, [(name, t.detach().as_subclass(torch.Tensor)) for name, t in items])


def test_inference_mode_tensors_round_trip(dest):
    with torch.inference_mode():
        tensor = make_tensor(torch.float32, (4, 3)).t()
    save([("inference", tensor)], dest)
    with torch.inference_mode():
        expected = tensor.clone()
    assert_loads_back(dest, [("inference", expected)])


def test_save_from_a_background_thread(dest):
    import threading

    items = [("a", make_tensor(torch.float32, (1000, 100))), ("b", make_tensor(torch.int8, (10,)).t())]
    errors = []

    def run():
        try:
            save(items, dest)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert errors == []
    assert_loads_back(dest, items)
