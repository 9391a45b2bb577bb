"""Every bad input raises a clear error of the right type, naming what is
wrong and saying what to do, and nothing is lost: no temp file is left and a
file already at the destination is byte-for-byte unchanged."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch
from safetensors import safe_open

from conftest import (
    PREEXISTING,
    SUPPORTED_NAMES,
    assert_nothing_lost,
    read_bytes,
    run_python,
)
from trinity_stream_saver import _C, save_safetensors_streaming


def ok_tensor(n: int = 4) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)


def fail_save(exception, items, path, meta, **kwargs) -> str:
    """Runs a save that must fail with `exception`; returns its message."""
    with pytest.raises(exception) as raised:
        save_safetensors_streaming(iter(items), path, meta, **kwargs)
    return str(raised.value)


# Items that come before the bad one, so that the failure happens after the
# temp file was created and data was written to it.
GOOD_PREFIX = [("first", ok_tensor(4)), ("second", ok_tensor(1 << 20))]
GOOD_META = [("first", "F32", [4]), ("second", "F32", [1 << 20])]


# --------------------------------------------------------------------------
# items that are not (str, Tensor) pairs
# --------------------------------------------------------------------------

NOT_PAIRS = {
    "int": 5,
    "str": "weight",
    "tensor_alone": torch.ones(2),
    "none": None,
    "one_element_tuple": ("lonely",),
    "three_element_tuple": ("a", torch.ones(1), "extra"),
    "empty_tuple": (),
}


@pytest.mark.parametrize("case", sorted(NOT_PAIRS))
def test_item_that_is_not_a_pair_is_a_type_error_naming_it(existing_dest, case):
    items = GOOD_PREFIX + [NOT_PAIRS[case]]
    message = fail_save(TypeError, items, existing_dest, GOOD_META + [("x", "F32", [1])])
    assert "item 2" in message
    assert "(name, tensor) pairs" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize("name", [7, b"bytes_name", None, ("tuple",)], ids=["int", "bytes", "none", "tuple"])
def test_item_with_a_non_str_name_is_a_type_error(existing_dest, name):
    items = GOOD_PREFIX + [(name, torch.ones(1))]
    message = fail_save(TypeError, items, existing_dest, GOOD_META + [("x", "F32", [1])])
    assert "str name" in message and "item 2" in message
    assert repr(name)[:20] in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize(
    "value", [[1.0, 2.0], 3.0, None, "tensor"], ids=["list", "float", "none", "str"]
)
def test_item_with_a_non_tensor_value_is_a_type_error_naming_the_tensor(existing_dest, value):
    items = GOOD_PREFIX + [("bias", value)]
    message = fail_save(TypeError, items, existing_dest, GOOD_META + [("bias", "F32", [2])])
    assert "'bias'" in message and "torch.Tensor" in message
    assert_nothing_lost(existing_dest)


def test_numpy_array_instead_of_tensor_is_a_type_error(existing_dest):
    import numpy as np

    items = [("arr", np.ones(3, dtype=np.float32))]
    message = fail_save(TypeError, items, existing_dest, [("arr", "F32", [3])])
    assert "'arr'" in message and "torch.Tensor" in message
    assert_nothing_lost(existing_dest)


def test_dict_instead_of_items_is_a_type_error_with_a_hint(existing_dest):
    with pytest.raises(TypeError, match=r"\.items\(\)") as raised:
        save_safetensors_streaming({"a": torch.ones(1)}, existing_dest, [("a", "F32", [1])])
    assert "dict" in str(raised.value)
    assert_nothing_lost(existing_dest)


def test_non_iterable_tensor_iter_is_a_type_error(existing_dest):
    with pytest.raises(TypeError):
        save_safetensors_streaming(42, existing_dest, [])
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# tensors that cannot be saved
# --------------------------------------------------------------------------


def test_tensor_on_meta_device_is_a_value_error_saying_move_to_cpu(existing_dest):
    items = GOOD_PREFIX + [("on_meta", torch.empty(3, device="meta"))]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("on_meta", "F32", [3])])
    assert "'on_meta'" in message
    assert "meta" in message.replace("'on_meta'", "")
    assert "CPU" in message or "cpu()" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_on_cuda_is_a_value_error_saying_move_to_cpu(existing_dest):
    items = [("gpu", torch.ones(3, device="cuda"))]
    message = fail_save(ValueError, items, existing_dest, [("gpu", "F32", [3])])
    assert "'gpu'" in message and "cuda" in message and "CPU" in message
    assert_nothing_lost(existing_dest)


def test_sparse_coo_tensor_is_a_value_error_saying_to_dense(existing_dest):
    items = GOOD_PREFIX + [("sparse", torch.eye(3).to_sparse())]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("sparse", "F32", [3, 3])])
    assert "'sparse'" in message and "to_dense()" in message
    assert_nothing_lost(existing_dest)


def test_sparse_tensor_error_names_the_layout_not_the_tensor_options(dest):
    message = fail_save(ValueError, [("s", torch.eye(3).to_sparse())], dest, [("s", "F32", [3, 3])])
    assert re.search(r"layout (torch\.)?sparse(_coo)?\b", message, re.IGNORECASE), message
    assert "TensorOptions" not in message


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_csr_tensor_is_a_value_error(existing_dest):
    items = [("csr", torch.eye(3).to_sparse_csr())]
    message = fail_save(ValueError, items, existing_dest, [("csr", "F32", [3, 3])])
    assert "'csr'" in message and "to_dense()" in message
    assert_nothing_lost(existing_dest)


def test_quantized_tensor_is_a_value_error_saying_dequantize(existing_dest):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    items = GOOD_PREFIX + [("q", quantized)]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("q", "I8", [4])])
    assert "'q'" in message and "quantized" in message and "dequantize()" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensor_is_a_value_error(existing_dest, layout):
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    items = GOOD_PREFIX + [("nested", nested)]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("nested", "F32", [5])])
    assert "'nested'" in message
    assert_nothing_lost(existing_dest)


# Tensors whose data is not in a CPU storage of their own: saving them must
# be a clear error, never a read through a null data pointer. Run in a child
# process, since the failure mode to rule out is a crash.
_STORAGELESS_TENSORS = {
    "wrapper_subclass": """
class Wrapper(torch.Tensor):
    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(str(func))
tensor = Wrapper(torch.ones(4))
""",
    "fake_tensor": """
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    tensor = torch.ones(4)
""",
    "functional_tensor": """
tensor = torch._to_functional_tensor(torch.ones(4))
""",
}

_SAVE_STORAGELESS = r"""
import json, sys
result = {"error": None}
try:
    save_safetensors_streaming(iter([("first", torch.ones(4)), ("odd", tensor)]), sys.argv[1],
                               [("first", "F32", [4]), ("odd", "F32", [4])])
except Exception as e:
    result = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_STORAGELESS_TENSORS))
def test_tensor_without_cpu_storage_is_a_value_error_not_a_crash(existing_dest, case):
    code = (
        "import torch\nfrom trinity_stream_saver import save_safetensors_streaming\n"
        + _STORAGELESS_TENSORS[case]
        + _SAVE_STORAGELESS
    )
    result = run_python(code, existing_dest)
    assert result.returncode == 0, f"child died with {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] == "ValueError", report
    assert "'odd'" in report["message"]
    assert_nothing_lost(existing_dest)


def test_tensor_of_unsupported_dtype_is_a_value_error_listing_supported(existing_dest):
    items = GOOD_PREFIX + [("c128", torch.ones(2, dtype=torch.complex128))]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("c128", "C64", [4])])
    assert "'c128'" in message
    assert ", ".join(SUPPORTED_NAMES) in message
    assert_nothing_lost(existing_dest)


def test_meta_of_unsupported_dtype_is_a_value_error_listing_supported(existing_dest):
    message = fail_save(ValueError, GOOD_PREFIX, existing_dest, GOOD_META + [("c128", torch.complex128, [2])])
    assert "'c128'" in message
    assert ", ".join(SUPPORTED_NAMES) in message
    assert_nothing_lost(existing_dest)


def test_zero_dim_packed_float4_tensor_is_a_value_error(existing_dest):
    scalar = torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    items = GOOD_PREFIX + [("f4", scalar)]
    message = fail_save(ValueError, items, existing_dest, GOOD_META + [("f4", "F4", [4])])
    assert "'f4'" in message and "dimension" in message
    assert_nothing_lost(existing_dest)


def test_zero_dim_packed_float4_meta_is_a_value_error(existing_dest):
    message = fail_save(ValueError, [], existing_dest, [("f4", "F4", [])])
    assert "'f4'" in message and "dimension" in message
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------


def test_duplicate_name_in_items_is_a_value_error(existing_dest):
    items = GOOD_PREFIX + [("first", ok_tensor(4))]
    meta = GOOD_META + [("third", "F32", [4])]
    message = fail_save(ValueError, items, existing_dest, meta)
    assert "duplicate" in message and "'first'" in message and "unique" in message
    assert_nothing_lost(existing_dest)


def test_duplicate_name_in_meta_is_a_value_error(existing_dest):
    meta = GOOD_META + [("first", "F32", [4])]
    message = fail_save(ValueError, GOOD_PREFIX, existing_dest, meta)
    assert "duplicate" in message and "'first'" in message and "state_dict_meta" in message
    assert_nothing_lost(existing_dest)


def test_reserved_metadata_name_in_items_is_a_value_error(existing_dest):
    items = GOOD_PREFIX + [("__metadata__", ok_tensor(4))]
    meta = GOOD_META + [("a_name_long_enough_to_fit", "F32", [4])]
    message = fail_save(ValueError, items, existing_dest, meta)
    assert "'__metadata__'" in message and "reserved" in message and "rename" in message
    assert_nothing_lost(existing_dest)


def test_reserved_metadata_name_in_meta_is_a_value_error(existing_dest):
    meta = GOOD_META + [("__metadata__", "F32", [4])]
    message = fail_save(ValueError, GOOD_PREFIX, existing_dest, meta)
    assert "'__metadata__'" in message and "reserved" in message and "state_dict_meta" in message
    assert_nothing_lost(existing_dest)


def test_meta_name_that_is_not_valid_unicode_is_a_value_error(existing_dest):
    name = "lone\ud800surrogate"
    message = fail_save(ValueError, [(name, ok_tensor(1))], existing_dest, [(name, "F32", [1])])
    assert "not valid Unicode" in message and "rename" in message
    assert_nothing_lost(existing_dest)


def test_item_name_that_is_not_valid_unicode_is_a_value_error(existing_dest):
    items = GOOD_PREFIX + [("lone\ud800surrogate", ok_tensor(4))]
    meta = GOOD_META + [("a_name_long_enough_to_fit_it", "F32", [4])]
    message = fail_save(ValueError, items, existing_dest, meta)
    assert "not valid Unicode" in message and "item 2" in message
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# tensors that overflow the header reserved from state_dict_meta
# --------------------------------------------------------------------------


def test_more_tensors_than_meta_rows_is_a_value_error_naming_the_first_overflow(existing_dest):
    items = [(f"t{i}", ok_tensor(2)) for i in range(6)]
    meta = [(f"t{i}", "F32", [2]) for i in range(2)]
    message = fail_save(ValueError, items, existing_dest, meta)
    overflowed = re.search(r"tensor '(t\d)'", message).group(1)
    assert int(overflowed[1:]) >= 2
    assert "does not describe" in message and "state_dict_meta" in message
    assert "collect_state_dict_meta" in message
    assert_nothing_lost(existing_dest)


def test_overflow_names_the_first_tensor_that_does_not_fit(existing_dest):
    # Exactly one row missing: the header has room for t0 and t1 only, and
    # a name long enough that the padding cannot absorb t2.
    items = [("t0", ok_tensor(2)), ("t1", ok_tensor(2)), ("t2_with_a_long_name", ok_tensor(2)), ("t3", ok_tensor(2))]
    meta = [("t0", "F32", [2]), ("t1", "F32", [2])]
    message = fail_save(ValueError, items, existing_dest, meta)
    assert "'t2_with_a_long_name'" in message
    assert "'t3'" not in message
    assert_nothing_lost(existing_dest)


def test_tensor_names_longer_than_meta_names_is_a_value_error(existing_dest):
    items = [("a_tensor_name_much_longer_than_in_meta", ok_tensor(2))]
    meta = [("a", "F32", [2])]
    message = fail_save(ValueError, items, existing_dest, meta)
    assert "'a_tensor_name_much_longer_than_in_meta'" in message
    assert "does not describe" in message
    assert_nothing_lost(existing_dest)


def test_empty_meta_with_tensors_is_a_value_error(existing_dest):
    message = fail_save(ValueError, [("w", ok_tensor(2))], existing_dest, [])
    assert "'w'" in message and "does not describe" in message
    assert_nothing_lost(existing_dest)


def test_header_larger_than_safetensors_limit_fails_before_any_file_is_created(tmp_path):
    dest = str(tmp_path / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    # A stale temp file: creating the temp file would truncate it.
    stale = b"stale temp file contents"
    with open(dest + ".tmp", "wb") as file:
        file.write(stale)
    started = []

    def generate():
        started.append(True)
        yield ("x", ok_tensor(1))

    meta = [("a" * 60_000_000, "F32", [1]), ("b" * 60_000_000, "F32", [1])]
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming(generate(), dest, meta)
    message = str(raised.value)
    assert str(_C.MAX_HEADER_BYTES) in message and "split" in message
    assert started == [], "the iterator was advanced before the header size was checked"
    assert read_bytes(dest + ".tmp") == stale, "the temp file was created"
    assert read_bytes(dest) == PREEXISTING


def _single_u8_entry_name(json_size: int) -> str:
    """A name whose one-tensor header JSON is exactly json_size bytes."""
    overhead = len('{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}')
    return "n" * (json_size - overhead)


def test_header_of_exactly_the_safetensors_limit_is_accepted(dest):
    name = _single_u8_entry_name(_C.MAX_HEADER_BYTES)
    save_safetensors_streaming(iter([(name, torch.ones(1, dtype=torch.uint8))]), dest, [(name, "U8", [1])])
    with open(dest, "rb") as file:
        assert int.from_bytes(file.read(8), "little") == _C.MAX_HEADER_BYTES
    with safe_open(dest, framework="pt") as file:
        assert list(file.keys()) == [name]


def test_header_one_byte_over_the_limit_is_a_value_error(existing_dest):
    name = _single_u8_entry_name(_C.MAX_HEADER_BYTES + 1)
    message = fail_save(ValueError, [], existing_dest, [(name, "U8", [1])])
    assert str(_C.MAX_HEADER_BYTES) in message
    assert_nothing_lost(existing_dest)


def test_tensor_shape_too_large_to_store_is_a_value_error(existing_dest):
    message = fail_save(ValueError, [], existing_dest, [("huge", "F32", [2**40, 2**40])])
    assert "'huge'" in message and "too large" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize(
    "dtype,shape",
    [("F64", [2**61]), ("U8", [2**64]), ("U8", [2**70]), ("I32", [2**31, 2**31, 2])],
    ids=["f64_2^64_bytes", "u8_2^64_elements", "dim_over_int64", "product_over_2^64"],
)
def test_meta_of_a_tensor_of_2_64_bytes_or_more_is_a_value_error(existing_dest, dtype, shape):
    message = fail_save(ValueError, [], existing_dest, [("huge", dtype, shape)])
    assert "'huge'" in message and "too large" in message
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# exceptions raised by the iterator
# --------------------------------------------------------------------------


class IteratorFailure(Exception):
    pass


class IteratorBaseFailure(BaseException):
    pass


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("exception_type", [IteratorFailure, RuntimeError, KeyError, IteratorBaseFailure])
def test_exception_from_the_iterator_propagates_unchanged(existing_dest, position, exception_type):
    error = exception_type(f"failure at the {position} position")
    count = {"first": 0, "middle": 2, "last": 4}[position]
    meta = [(f"t{i}", "F32", [1 << 16]) for i in range(4)]

    def generate():
        for i in range(count):
            yield (f"t{i}", ok_tensor(1 << 16))
        raise error

    with pytest.raises(exception_type) as raised:
        save_safetensors_streaming(generate(), existing_dest, meta)
    assert raised.value is error
    assert type(raised.value) is exception_type
    assert raised.value.args == (f"failure at the {position} position",)
    assert_nothing_lost(existing_dest)


def test_exception_from_a_custom_iterator_next_propagates_unchanged(existing_dest):
    error = OSError(errno.EIO, "disk of the data loader failed")

    class Loader:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.calls += 1
            if self.calls == 2:
                raise error
            return ("t0", ok_tensor(4))

    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(Loader(), existing_dest, [("t0", "F32", [4])])
    assert raised.value is error
    assert_nothing_lost(existing_dest)


# --------------------------------------------------------------------------
# operating-system failures
# --------------------------------------------------------------------------


def test_missing_directory_is_file_not_found_naming_the_path(tmp_path):
    dest = str(tmp_path / "no" / "such" / "dir" / "model.safetensors")
    with pytest.raises(FileNotFoundError) as raised:
        save_safetensors_streaming(iter([("a", ok_tensor())]), dest, [("a", "F32", [4])])
    assert raised.value.errno == errno.ENOENT
    assert dest in str(raised.value)
    # The folder to create is what the error names.
    assert raised.value.filename == str(tmp_path / "no" / "such" / "dir") + "/"
    assert "the folder does not exist" in str(raised.value)
    assert not (tmp_path / "no").exists()


def test_destination_that_is_a_directory_is_an_os_error_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "model.safetensors"
    dest.mkdir()
    (dest / "inside.txt").write_bytes(b"keep me")
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter([("a", ok_tensor())]), str(dest), [("a", "F32", [4])])
    assert isinstance(raised.value, IsADirectoryError) or raised.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert str(dest) in str(raised.value)
    assert not os.path.lexists(str(dest) + ".tmp")
    assert sorted(os.listdir(dest)) == ["inside.txt"]
    assert (dest / "inside.txt").read_bytes() == b"keep me"


def test_temp_path_that_is_a_directory_is_an_os_error(existing_dest):
    os.mkdir(existing_dest + ".tmp")
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter([("a", ok_tensor())]), existing_dest, [("a", "F32", [4])])
    assert raised.value.errno == errno.EISDIR
    assert existing_dest + ".tmp" in str(raised.value)
    assert read_bytes(existing_dest) == PREEXISTING


def test_filepath_with_a_nul_byte_is_a_value_error_like_open(tmp_path):
    with pytest.raises(ValueError):
        open(str(tmp_path / "x\0y"), "wb")
    dest = str(tmp_path / "model\0.safetensors")
    with pytest.raises(ValueError):
        save_safetensors_streaming(iter([("a", ok_tensor())]), dest, [("a", "F32", [4])])
    assert os.listdir(tmp_path) == [], "a file was written at a truncated path"


@pytest.mark.parametrize("filepath", [123, None, b"bytes/path.safetensors"], ids=["int", "none", "bytes"])
def test_filepath_that_is_not_a_str_path_is_a_type_error(filepath):
    with pytest.raises(TypeError):
        save_safetensors_streaming(iter([]), filepath, [])


_DROP_DAC_CAPABILITIES = r"""
import ctypes, os
# Root bypasses file permissions through CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH; drop them so that the read-only directory binds.
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) == 0:
        mask = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
        data[0].effective &= mask
        data[0].permitted &= mask
        data[0].inheritable &= mask
        libc.capset(ctypes.byref(header), data)
"""

_SAVE_AND_REPORT = r"""
import json, os, sys
import torch
from trinity_stream_saver import save_safetensors_streaming
dest = sys.argv[1]
size = int(sys.argv[2])
probe = os.path.join(os.path.dirname(dest), "probe")
if sys.argv[3] == "check_read_only":
    try:
        open(probe, "wb").close()
        os.unlink(probe)
        print(json.dumps({"skip": "the directory is writable despite chmod"}))
        sys.exit(0)
    except PermissionError:
        pass
tensor = torch.zeros(size, dtype=torch.uint8)
try:
    save_safetensors_streaming(iter([("t", tensor)]), dest, [("t", "U8", [size])])
    print(json.dumps({"error": None}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "errno": e.errno, "message": str(e),
                      "filename": e.filename}))
"""


def _report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_read_only_directory_is_a_permission_error_naming_the_path(tmp_path):
    directory = tmp_path / "read_only"
    directory.mkdir()
    dest = directory / "model.safetensors"
    dest.write_bytes(PREEXISTING)
    directory.chmod(0o555)
    try:
        result = run_python(_DROP_DAC_CAPABILITIES + _SAVE_AND_REPORT, str(dest), "16", "check_read_only")
        report = _report(result)
        if "skip" in report:
            pytest.skip(f"cannot make a directory read-only here: {report['skip']}")
        assert report["error"] == "PermissionError"
        assert report["errno"] == errno.EACCES
        assert str(dest) + ".tmp" in report["message"]
        assert sorted(os.listdir(directory)) == ["model.safetensors"]
        assert dest.read_bytes() == PREEXISTING
    finally:
        directory.chmod(0o755)


@pytest.mark.slow
def test_file_size_limit_is_an_os_error_with_efbig(existing_dest):
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
    ) + _SAVE_AND_REPORT
    report = _report(run_python(code, existing_dest, str(4 << 20), "-"))
    assert report["error"] == "OSError"
    assert report["errno"] == errno.EFBIG
    assert existing_dest + ".tmp" in report["message"]
    assert_nothing_lost(existing_dest)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs, or a skip where mounting one is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for ENOSPC needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_is_an_os_error_with_enospc(tiny_filesystem):
    dest = str(tiny_filesystem / "model.safetensors")
    with open(dest, "wb") as file:
        file.write(PREEXISTING)
    size = 4 << 20
    with pytest.raises(OSError) as raised:
        save_safetensors_streaming(iter([("t", torch.zeros(size, dtype=torch.uint8))]), dest, [("t", "U8", [size])])
    assert raised.value.errno == errno.ENOSPC
    assert dest + ".tmp" in str(raised.value)
    assert_nothing_lost(dest)


# --------------------------------------------------------------------------
# malformed state_dict_meta and metadata
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[-1], [3, -2], (0, -5)], ids=str)
def test_negative_dimension_in_meta_is_a_value_error(existing_dest, shape):
    message = fail_save(ValueError, [], existing_dest, [("neg", "F32", shape)])
    assert "'neg'" in message and "negative" in message
    assert_nothing_lost(existing_dest)


BAD_META_ROWS = {
    "shape_float_dim": ("w", "F32", [1.0]),
    "shape_bool_dim": ("w", "F32", [True]),
    "shape_str_dim": ("w", "F32", ["3"]),
    "shape_str": ("w", "F32", "12"),
    "shape_int": ("w", "F32", 3),
    "shape_none": ("w", "F32", None),
    "dtype_int": ("w", 3, [1]),
    "dtype_none": ("w", None, [1]),
    "dtype_numpy_type": ("w", float, [1]),
}


@pytest.mark.parametrize("case", sorted(BAD_META_ROWS))
def test_wrongly_typed_meta_field_is_a_type_error_naming_the_entry(existing_dest, case):
    message = fail_save(TypeError, [], existing_dest, [BAD_META_ROWS[case]])
    assert "'w'" in message and "state_dict_meta" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize(
    "row", [("w", "F32"), ("w", "F32", [1], "extra"), "w", 5, {"name": "w"}],
    ids=["two_fields", "four_fields", "str", "int", "dict"],
)
def test_meta_row_of_the_wrong_form_is_a_type_error(existing_dest, row):
    message = fail_save(TypeError, [], existing_dest, [row])
    assert "(name, dtype, shape)" in message
    assert_nothing_lost(existing_dest)


def test_meta_row_with_non_str_name_is_a_type_error(existing_dest):
    message = fail_save(TypeError, [], existing_dest, [(1, "F32", [1])])
    assert "name" in message and "str" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize("meta", [None, 5, "w", {"w": ("F32", [1])}], ids=["none", "int", "str", "dict"])
def test_state_dict_meta_that_is_not_a_list_of_rows_is_a_type_error(existing_dest, meta):
    message = fail_save(TypeError, [], existing_dest, meta)
    assert "state_dict_meta" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize(
    "metadata",
    [{"step": 1}, {"ok": "fine", "bad": None}, {1: "one"}, {"nested": {"a": "b"}}, {"b": b"bytes"}],
    ids=["int_value", "none_value", "int_key", "dict_value", "bytes_value"],
)
def test_metadata_with_non_str_keys_or_values_is_a_type_error(existing_dest, metadata):
    message = fail_save(TypeError, [("a", ok_tensor())], existing_dest, [("a", "F32", [4])], metadata=metadata)
    assert "str" in message and "metadata" in message
    assert_nothing_lost(existing_dest)


@pytest.mark.parametrize("metadata", [[("a", "b")], "a=b", 5], ids=["list", "str", "int"])
def test_metadata_that_is_not_a_dict_is_a_type_error(existing_dest, metadata):
    message = fail_save(TypeError, [("a", ok_tensor())], existing_dest, [("a", "F32", [4])], metadata=metadata)
    assert "metadata" in message and "dict" in message
    assert_nothing_lost(existing_dest)


def test_failed_save_without_existing_destination_creates_nothing(dest):
    fail_save(TypeError, GOOD_PREFIX + [5], dest, GOOD_META)
    assert_nothing_lost(dest, previous=None)
