"""The rule for a tensor that differs from its state_dict_meta row: a tensor
whose dtype or shape differs from its row, but whose header entry still fits
the header reserved from state_dict_meta, is written as it is and the file
describes it (as the original saver does; Trinity-RFT declares every row
bfloat16 whatever the tensors are). One whose entry outgrows the reserved
header fails with a ValueError naming it, and the destination is untouched.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import PREEXISTING, read_bytes
from trinity_stream_saver import save_safetensors_streaming


@pytest.mark.parametrize("overlap", [False, True])
def test_a_tensor_unlike_its_row_is_written_as_it_is_while_the_header_fits(dest, overlap):
    # Every row says bfloat16, as Trinity-RFT's worker declares them; the
    # tensors are float32 and one has another shape of the same length.
    tensors = {"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(3, 2)}
    meta = [("a", "BF16", [4]), ("b", "BF16", [2, 3])]
    save_safetensors_streaming(iter(tensors.items()), dest, meta, overlap=overlap)
    loaded = load_file(dest)
    assert {name: t.dtype for name, t in loaded.items()} == {"a": torch.float32,
                                                             "b": torch.float32}
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_tensor_whose_entry_outgrows_the_reserved_header_is_refused(existing_dest, overlap):
    meta = [("a", "BF16", [4])]
    items = iter([("a", torch.zeros(123456789, dtype=torch.uint8).as_strided((123456789,), (0,)))])
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming(items, existing_dest, meta, overlap=overlap)
    message = str(raised.value)
    assert "'a' (U8, shape [123456789])" in message, message
    assert "does not fit in the header reserved" in message, message
    assert "differ from its row in dtype or shape only while the header still fits" in message
    assert read_bytes(existing_dest) == PREEXISTING
    assert not os.path.lexists(existing_dest + ".tmp")
