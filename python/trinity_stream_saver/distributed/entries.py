"""What a distributed save holds: the entries of a model or state dict, in
state dict order, each tensor once, and the (name, dtype, shape) rows the
shard plan is made from. The alias and cast rules are the package's own
(_state_dict), shared with the command line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from .._extension import _C
from .._state_dict import saved_dtype, split_aliases


def tied_target_patterns(model: object) -> list[str]:
    """transformers' names of weights tied to another (``_tied_weights_keys``
    of the model and its submodules: a dict target -> source, or a list of
    patterns in older versions): of a group of aliases, these are dropped
    first, as save_pretrained drops them."""
    if not isinstance(model, torch.nn.Module):
        return []
    patterns = []
    for prefix, module in model.named_modules():
        for key in getattr(module, "_tied_weights_keys", None) or ():
            patterns.append(f"{prefix}.{key}" if prefix else key)
    return patterns


def entries(model: object) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a checkpoint of `model` holds, in state dict
    order, each tensor once (see split_aliases), and without a transformers
    model's ``_keys_to_ignore_on_save``."""
    if isinstance(model, torch.nn.Module):
        # keep_vars: the parameters themselves, so that tied ones are one
        # object (detached copies would be separate objects).
        state = model.state_dict(keep_vars=True)
        ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    elif isinstance(model, Mapping):
        state = model
        ignored = set()
    else:
        raise TypeError(
            f"model must be a torch.nn.Module or a mapping of name to tensor (a state dict), "
            f"not {type(model).__name__}."
        )
    items = []
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {_C.short_repr(name)} is not a str.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state dict entry {name!r} is {type(tensor).__name__}, not a torch.Tensor; "
                "save tensors only."
            )
        if name not in ignored:
            items.append((name, tensor))
    _, aliases = split_aliases(items, tied_target_patterns(model))
    return [(name, tensor) for name, tensor in items if name not in aliases]


def meta(entries: Sequence[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype]) -> list[tuple]:
    """(name, safetensors dtype, global shape) of each entry as saved with a
    cast to `dtype`: a DTensor's shape and dtype are the full tensor's, so
    nothing is gathered."""
    rows = []
    for name, tensor in entries:
        saved = saved_dtype(tensor.dtype, dtype)
        safetensors_name = _C.safetensors_dtype(saved)
        if safetensors_name is None:
            raise ValueError(
                f"tensor {name!r} has dtype {saved}, which safetensors cannot store; pass "
                "dtype= to cast floating point tensors, or leave the tensor out of the state "
                f"dict. Storable: {', '.join(_C.supported_dtypes())}."
            )
        rows.append((name, safetensors_name, list(tensor.shape)))
    return rows


def nbytes(entries: Sequence[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype]) -> dict:
    """Bytes saved of each entry, by name."""
    return {name: saved_dtype(tensor.dtype, dtype).itemsize * tensor.shape.numel()
            for name, tensor in entries}
