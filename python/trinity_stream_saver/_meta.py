"""state_dict_meta: the rows a save is planned from, and the original
module's names for them (TensorMeta, DTYPE_TO_SAFETENSORS,
_compute_exact_header_size)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Optional, Union

import torch

from ._arguments import _check_meta, _normalise_metadata, _reject_mapping, _resolve_dtype
from ._extension import _C


class TensorMeta(NamedTuple):
    """Metadata for a single tensor, sufficient to compute its header entry."""

    name: str
    dtype: str
    shape: list[int]

StateDictMeta = list[TensorMeta]

#: A row of state_dict_meta: a TensorMeta, or (name, dtype, shape) with the
#: dtype as a safetensors name, a torch.dtype or its name.
MetaRow = Union[TensorMeta, tuple[str, Union[str, torch.dtype], Sequence[int]]]

#: A path given to a save: str or os.PathLike of str.
PathLikeStr = Union[str, "os.PathLike[str]"]

#: torch dtype -> safetensors dtype name, for every dtype this library saves
#: (the original module's name for the same table).
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {
    dtype: name
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype) and (name := _C.safetensors_dtype(dtype)) is not None
}

def _compute_exact_header_size(
    state_dict_meta: Iterable[MetaRow],
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """N: the JSON header length (in bytes, a multiple of 8) that a save of
    ``state_dict_meta`` reserves, as the original module computes it."""
    _check_meta(state_dict_meta)
    return _C.reserved_header_size(state_dict_meta, _resolve_dtype, _normalise_metadata(metadata))

def collect_state_dict_meta(
    tensor_iter: Iterable[tuple[str, torch.Tensor]],
) -> StateDictMeta:
    """Iterate once and return the metadata of every tensor that can be saved.

    Tensors of dtypes safetensors cannot store are skipped. No tensor is
    held after its entry is made.
    """
    _reject_mapping(tensor_iter)
    # The items are read and checked in C++, as a save reads them.
    rows = _C.collect_state_dict_meta(tensor_iter)
    return [TensorMeta(name, dtype, shape) for name, dtype, shape in rows]
