"""Hostile inputs: each either saves a correct file or fails
with a clear error naming what is wrong; none crashes the process (cases
that could are run in a child process)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_nothing_lost, read_bytes, run_python
from trinity_stream_saver import collect_state_dict_meta, save_safetensors_streaming

_HOSTILE_META = r"""
import json, sys, torch
from trinity_stream_saver import save_safetensors_streaming
case = sys.argv[2]
if case == "lying_len":
    class Lying(tuple):
        __len__ = lambda self: 3
    entry = Lying(("a",))
    shape = None
else:
    shape = [2]
    class Clears:
        def __index__(self):
            shape.clear()
            return 2
    shape.extend([Clears(), Clears()])
    entry = ("a", "F32", shape)
try:
    save_safetensors_streaming([("a", torch.ones(2, 2))], sys.argv[1], [entry])
    print(json.dumps({"error": None}))
except (TypeError, ValueError) as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lying_len", "shape_cleared_by_index"])
def test_hostile_sequences_in_state_dict_meta_do_not_crash(existing_dest, case):
    result = run_python(_HOSTILE_META, existing_dest, case)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if case == "lying_len":
        assert report["error"] == "TypeError" and "(name, dtype, shape)" in report["message"], report
    else:
        # The shape was read from a snapshot of the list: [2, 2], as yielded.
        assert report["error"] is None, report


_UNDER_FAKE_TENSOR_MODE = r"""
import sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from trinity_stream_saver import save_safetensors_streaming
path, overlap = sys.argv[1], sys.argv[2] == "True"
base = torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)
items = [("t", base.t()), ("small", base[:4, :4].t())]
meta = [("t", "F32", [1024, 1024]), ("small", "F32", [4, 4])]
with FakeTensorMode(allow_non_fake_inputs=True):
    save_safetensors_streaming(iter(items), path, meta, overlap=overlap)
from safetensors.torch import load_file
loaded = load_file(path)
print("OK" if torch.equal(loaded["t"], base.t()) and torch.equal(loaded["small"], base[:4, :4].t()) else "WRONG")
"""


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_an_active_python_dispatch_mode_does_not_reach_the_savers_own_copies(dest, overlap):
    result = run_python(_UNDER_FAKE_TENSOR_MODE, dest, str(overlap))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK"


def test_metadata_with_a_lone_surrogate_is_a_value_error_naming_the_key(existing_dest):
    with pytest.raises(ValueError, match="metadata key 'bad.udc80'"):
        save_safetensors_streaming([("a", torch.ones(1))], existing_dest, [("a", "F32", [1])],
                                   metadata={"bad\udc80": "x"})
    assert_nothing_lost(existing_dest)


def test_a_0d_numpy_array_as_a_shape_is_a_clear_type_error(existing_dest):
    np = pytest.importorskip("numpy", reason="the case is a numpy array; numpy is in the test extra")
    with pytest.raises(TypeError, match="'a' has a shape of type numpy.ndarray that cannot be read"):
        save_safetensors_streaming([("a", torch.ones(1))], existing_dest, [("a", "F32", np.array(1))])


def test_error_messages_quote_a_long_name_cut_short(existing_dest):
    name = "n" * 1_000_000
    with pytest.raises(ValueError) as raised:
        save_safetensors_streaming([(name, torch.ones(1, dtype=torch.complex128))], existing_dest,
                                   [(name, "F32", [1])])
    assert len(str(raised.value)) < 2000
    assert "(1000000 bytes)" in str(raised.value)


def test_oversized_metadata_is_blamed_on_metadata(existing_dest):
    with pytest.raises(ValueError, match="^metadata would take"):
        save_safetensors_streaming([("a", torch.ones(1))], existing_dest, [("a", "F32", [1])],
                                   metadata={"k": "x" * 100_000_001})


def test_a_plain_tensor_whose_storage_was_freed_is_named_as_such(existing_dest):
    tensor = torch.ones(100)
    tensor.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="'a' has lost its memory: its storage was freed"):
        save_safetensors_streaming([("a", tensor)], existing_dest, [("a", "F32", [100])])
    assert_nothing_lost(existing_dest)


def test_tensors_in_another_order_than_meta_say_the_order_must_match(existing_dest):
    items = [("b", torch.ones(10**6)), ("a", torch.ones(1))]
    with pytest.raises(ValueError, match="in the order it yields them"):
        save_safetensors_streaming(iter(items), existing_dest, [("a", "F32", [1]), ("b", "F32", [10**6])])


def test_collect_state_dict_meta_of_bare_tensors_says_it_wants_pairs():
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs, but item 0 is Tensor"):
        collect_state_dict_meta([torch.ones(2)])
