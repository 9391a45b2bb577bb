"""The original module's other public names, importable from ours, so that
code and tests written against trinity.utils.stream_saver run by changing
the import alone; and the guard against a torch other than the one the
extension was built with."""

import subprocess
import sys

import pytest
import torch
from reference_saver import _DTYPES, reserved_header_size

from trinity_stream_saver import DTYPE_TO_SAFETENSORS, _compute_exact_header_size


def test_dtype_to_safetensors_names_every_dtype_the_original_saves():
    assert DTYPE_TO_SAFETENSORS == {dtype: name for dtype, (name, _) in _DTYPES.items()}


@pytest.mark.parametrize(
    "meta,metadata",
    [
        ([("a", "BF16", [4, 4]), ("b", torch.float32, (3,))], None),
        ([("w", "bfloat16", [2**20, 7]), ("ünïcode", "F4", [2, 2])], {"format": "pt"}),
        ([], None),
        ([], {}),
    ],
    ids=["plain", "spellings_unicode_metadata", "empty", "empty_metadata"],
)
def test_compute_exact_header_size_is_the_originals(meta, metadata):
    assert _compute_exact_header_size(meta, metadata) == reserved_header_size(meta, metadata)


def test_compute_exact_header_size_rejects_bad_meta_like_the_saver():
    with pytest.raises(ValueError, match="'x'"):
        _compute_exact_header_size([("x", "C128", [1])])


@pytest.mark.slow
def test_an_extension_built_for_another_torch_refuses_to_load_with_a_rebuild_hint():
    code = (
        "import torch\n"
        "torch.__version__ = '1.99.0'\n"
        "import trinity_stream_saver\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "built against torch" in result.stderr and "1.99.0" in result.stderr
    assert "--no-build-isolation" in result.stderr
