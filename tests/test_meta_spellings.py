"""state_dict_meta may be written in every spelling the original accepted,
and collect_state_dict_meta builds it from a state dict."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    SAFETENSORS_TO_TORCH,
    SUPPORTED_NAMES,
    assert_tensors_identical,
    make_tensor,
    read_bytes,
)
from trinity_stream_saver import (
    StateDictMeta,
    TensorMeta,
    collect_state_dict_meta,
    save_safetensors_streaming,
)


def spellings(name: str) -> dict[str, object]:
    dtype = SAFETENSORS_TO_TORCH[name]
    return {
        "safetensors": name,
        "torch_dtype": dtype,
        "torch_name": str(dtype).removeprefix("torch."),
        "qualified_name": str(dtype),
    }


TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_TO_TORCH.items()}
SPELLING_CASES = [(name, kind) for name in SUPPORTED_NAMES for kind in spellings(name)]


def canonical_file(tmp_path, items) -> bytes:
    """The file written with the plainest meta: safetensors names, list shapes."""
    path = tmp_path / "canonical.safetensors"
    meta = [(n, TORCH_TO_SAFETENSORS[t.dtype], list(t.shape)) for n, t in items]
    save_safetensors_streaming(iter(items), path, meta)
    return read_bytes(path)


@pytest.mark.parametrize("name,spelling", SPELLING_CASES, ids=[f"{n}-{k}" for n, k in SPELLING_CASES])
def test_every_dtype_spelling_gives_the_same_file(tmp_path, name, spelling):
    dtype_spelled = spellings(name)[spelling]
    items = [("w", make_tensor(SAFETENSORS_TO_TORCH[name], (3, 4))), ("b", torch.ones(2))]
    path = tmp_path / "spelled.safetensors"
    meta = [("w", dtype_spelled, [3, 4]), ("b", "F32", [2])]
    save_safetensors_streaming(iter(items), path, meta)
    assert read_bytes(path) == canonical_file(tmp_path, items)


@pytest.mark.parametrize(
    "shape", [(3, 4), [3, 4], torch.Size([3, 4])], ids=["tuple", "list", "torch.Size"]
)
def test_shape_may_be_a_tuple_list_or_torch_size(tmp_path, shape):
    items = [("w", make_tensor(torch.float32, (3, 4)))]
    path = tmp_path / "shaped.safetensors"
    save_safetensors_streaming(iter(items), path, [("w", "F32", shape)])
    assert read_bytes(path) == canonical_file(tmp_path, items)


@pytest.mark.parametrize(
    "row",
    [
        TensorMeta("w", "BF16", [2, 3]),
        ("w", "BF16", (2, 3)),
        ["w", torch.bfloat16, [2, 3]],
        ("w", "bfloat16", torch.Size([2, 3])),
        ("w", "torch.bfloat16", (2, 3)),
    ],
    ids=["TensorMeta", "tuple", "list", "name+Size", "qualified"],
)
def test_tensor_meta_and_plain_rows_are_equivalent(tmp_path, row):
    items = [("w", make_tensor(torch.bfloat16, (2, 3)))]
    path = tmp_path / "rows.safetensors"
    save_safetensors_streaming(iter(items), path, [row])
    assert read_bytes(path) == canonical_file(tmp_path, items)


def test_state_dict_meta_may_be_any_iterable_of_rows(tmp_path):
    items = [("a", torch.ones(2)), ("b", torch.zeros(3))]
    path = tmp_path / "gen.safetensors"
    rows = (row for row in [("a", "F32", [2]), ("b", "F32", [3])])
    save_safetensors_streaming(iter(items), path, rows)
    assert read_bytes(path) == canonical_file(tmp_path, items)


def test_scalar_meta_with_empty_shape(tmp_path):
    items = [("s", torch.tensor(2.5, dtype=torch.bfloat16))]
    path = tmp_path / "scalar.safetensors"
    save_safetensors_streaming(iter(items), path, [TensorMeta("s", torch.bfloat16, [])])
    assert load_file(path)["s"].item() == 2.5


def test_tensor_meta_is_a_named_tuple_of_name_dtype_shape():
    meta = TensorMeta("w", "F32", [1, 2])
    assert meta == ("w", "F32", [1, 2])
    assert (meta.name, meta.dtype, meta.shape) == ("w", "F32", [1, 2])
    assert TensorMeta._fields == ("name", "dtype", "shape")


def test_state_dict_meta_alias_is_a_list_of_tensor_meta():
    assert StateDictMeta == list[TensorMeta]


def test_calling_without_state_dict_meta_is_a_type_error(dest):
    with pytest.raises(TypeError, match="state_dict_meta"):
        save_safetensors_streaming(iter([("a", torch.ones(1))]), dest)


# --------------------------------------------------------------------------
# collect_state_dict_meta
# --------------------------------------------------------------------------


def test_collect_state_dict_meta_returns_tensor_meta_per_tensor():
    state_dict = {
        "w": torch.zeros(3, 4, dtype=torch.bfloat16),
        "s": torch.tensor(1.0),
        "f8": torch.zeros(2, dtype=torch.float8_e5m2),
    }
    meta = collect_state_dict_meta(state_dict.items())
    assert meta == [("w", "BF16", [3, 4]), ("s", "F32", []), ("f8", "F8_E5M2", [2])]
    assert all(type(row) is TensorMeta for row in meta)
    assert all(type(row.shape) is list for row in meta)


@pytest.mark.parametrize("name", SUPPORTED_NAMES)
def test_collect_state_dict_meta_names_every_supported_dtype(name):
    tensor = make_tensor(SAFETENSORS_TO_TORCH[name], (2, 3))
    assert collect_state_dict_meta([("t", tensor)]) == [TensorMeta("t", name, [2, 3])]


def test_collect_state_dict_meta_keeps_the_torch_shape_of_packed_float4():
    tensor = make_tensor(torch.float4_e2m1fn_x2, (2, 3))
    assert collect_state_dict_meta([("t", tensor)]) == [TensorMeta("t", "F4", [2, 3])]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32, torch.uint4, torch.bits8])
def test_collect_state_dict_meta_skips_unsupported_dtypes(dtype):
    items = [("a", torch.ones(2)), ("bad", torch.zeros(2, dtype=dtype)), ("b", torch.ones(1))]
    assert collect_state_dict_meta(items) == [("a", "F32", [2]), ("b", "F32", [1])]


def test_collect_state_dict_meta_result_saves_the_same_tensors(dest):
    state_dict = {f"t{i}": make_tensor(torch.float16, (i + 1, 2), seed=i) for i in range(4)}
    meta = collect_state_dict_meta(state_dict.items())
    save_safetensors_streaming(state_dict.items(), dest, meta)
    loaded = load_file(dest)
    for name, tensor in state_dict.items():
        assert_tensors_identical(loaded[name], tensor)


def test_collect_state_dict_meta_rejects_a_dict_with_a_hint():
    with pytest.raises(TypeError, match=r"items\(\)"):
        collect_state_dict_meta({"a": torch.ones(1)})


@pytest.mark.parametrize(
    "bad_item",
    [torch.ones(2), ("a", torch.ones(2), "extra"), (1, torch.ones(2)), ("a", [1.0, 2.0])],
    ids=["bare_tensor", "triple", "int_name", "list_value"],
)
def test_collect_state_dict_meta_rejects_a_bad_item_as_a_save_does(bad_item, dest):
    items = [("ok", torch.ones(1)), bad_item]
    with pytest.raises(TypeError) as collected:
        collect_state_dict_meta(items)
    with pytest.raises(TypeError) as saved:
        save_safetensors_streaming(iter(items), dest, [("ok", "F32", [1]), ("a", "F32", [2])])
    assert "item 1" in str(collected.value)
    assert str(collected.value) == str(saved.value)


def test_collect_state_dict_meta_holds_no_tensor_after_its_entry():
    refs: list[weakref.ref] = []

    def item(i):
        tensor = torch.full((4, 4), float(i))
        refs.append(weakref.ref(tensor))
        return (f"t{i}", tensor)

    def generate():
        for i in range(5):
            if refs:
                assert refs[-1]() is None, f"tensor t{i - 1} still alive when t{i} was requested"
            yield item(i)
        assert refs[-1]() is None, "last tensor still alive when the iterator was exhausted"

    meta = collect_state_dict_meta(generate())
    assert [row.name for row in meta] == [f"t{i}" for i in range(5)]
    assert all(ref() is None for ref in refs)


def test_collect_state_dict_meta_accepts_tensors_on_the_meta_device():
    with torch.device("meta"):
        model = torch.nn.Linear(8, 4, dtype=torch.bfloat16)
    meta = collect_state_dict_meta(model.state_dict().items())
    assert meta == [("weight", "BF16", [4, 8]), ("bias", "BF16", [4])]
