"""The rules a saved state dict follows, shared by the command line's
``convert`` and ``save_model_streaming``: which names alias one tensor (and
which of them is kept), and which tensors a cast to another dtype changes.

It knows nothing of files or ranks. DTensors are recognised without
importing torch.distributed.tensor (see is_dtensor).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import Optional

import torch

# --------------------------------------------------------------------------
# Aliases: tied and shared tensors are saved once.
# --------------------------------------------------------------------------


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a DTensor. One exists only once
    torch.distributed.tensor has been imported, so this does not import it
    (it takes a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The memory a tensor's values lie in on this rank: a DTensor's local
    piece, or the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def _view(tensor: torch.Tensor) -> tuple:
    """Equal for two entries that are the same tensor: the same object, or
    the same memory viewed alike. Different views of one storage (slices of
    a fused matrix) are different tensors."""
    local = _local(tensor)
    if local.numel() == 0 or local.device.type == "meta":
        # An empty tensor (or one without memory) says nothing about
        # identity beyond being the same object.
        return ("object", id(tensor))
    return ("memory", local.device, local.data_ptr(), local.dtype, tuple(tensor.shape),
            tuple(local.stride()))


def split_aliases(
    items: Iterable[tuple[str, torch.Tensor]], tied: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """The names to save, in order, and the names left out: alias -> kept.

    Of names that alias one tensor (tied embeddings, as torch.save and
    state_dict(keep_vars=True) keep them) one is saved, as huggingface_hub's
    save_torch_state_dict and transformers' save_pretrained drop all but one:
    the first that matches none of the `tied` patterns (transformers'
    ``_tied_weights_keys``, the names declared tied to another), else the
    first.
    """
    items = list(items)
    groups: dict[tuple, list[str]] = {}
    for name, tensor in items:
        groups.setdefault(_view(tensor), []).append(name)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            kept = next((name for name in names if not any(re.search(p, name) for p in tied)),
                        names[0])
            aliases.update((name, kept) for name in names if name != kept)
    return [name for name, _ in items if name not in aliases], aliases


# --------------------------------------------------------------------------
# Casts: --dtype and dtype= change full-precision floating tensors only.
# --------------------------------------------------------------------------


def is_castable(dtype: torch.dtype) -> bool:
    """Floating dtypes of 16 bits or more (float16, bfloat16, float32,
    float64): the only ones a cast reads from or writes to. Integer buffers
    and booleans keep their values, and float8, float4 and other quantized
    or packed weights keep their bytes (their scales are separate tensors,
    so a cast would change what they mean), as ``model.to(dtype)`` leaves
    integer buffers."""
    return dtype.is_floating_point and dtype.itemsize >= 2


def check_cast_target(dtype: object, argument: str = "dtype") -> None:
    """A clear error unless `dtype` is a dtype tensors may be cast to."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{argument} must be a torch.dtype such as torch.bfloat16, not {dtype!r}."
        )
    if not is_castable(dtype):
        raise ValueError(
            f"{argument}={dtype} is not a floating dtype of 16 bits or more; casting weights "
            "to it would turn them into integers, booleans or values out of range. Use "
            "torch.bfloat16, torch.float16, torch.float32 or torch.float64."
        )


def saved_dtype(source: torch.dtype, target: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor of `source` is saved as with a cast to `target`
    (None: no cast)."""
    return target if target is not None and is_castable(source) else source
