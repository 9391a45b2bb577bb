"""Stream a safetensors checkpoint to disk one tensor at a time.

A drop-in replacement for ``trinity.utils.stream_saver``: the same
signatures, byte-identical files, written from a C++ core straight from
tensor memory; plus sharded Hugging Face checkpoints. This package only
normalises arguments and orchestrates; the checks and the writing happen
in ``trinity_stream_saver._C``.
"""

from ._extension import _C as _C  # noqa: F401  (tests and tools reach the core through it)
from ._meta import (
    DTYPE_TO_SAFETENSORS,
    StateDictMeta,
    TensorMeta,
    _compute_exact_header_size,  # noqa: F401  (the original module's name)
    collect_state_dict_meta,
)
from .distributed import DistributedSaveError, save_model_streaming
from ._sharded import ShardPlan, plan_shards, save_sharded_streaming
from ._single_file import finalize, finalize_async, save_safetensors_streaming
from ._async_save import AsyncSave, save_model_streaming_async

__all__ = [
    "AsyncSave",
    "DTYPE_TO_SAFETENSORS",
    "DistributedSaveError",
    "TensorMeta",
    "StateDictMeta",
    "ShardPlan",
    "collect_state_dict_meta",
    "finalize",
    "finalize_async",
    "plan_shards",
    "save_safetensors_streaming",
    "save_model_streaming",
    "save_model_streaming_async",
    "save_sharded_streaming",
]
