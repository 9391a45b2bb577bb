"""The files a transformers model's folder holds besides its weights, as
save_pretrained writes them: config.json and generation_config.json."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Optional

import torch


def save_config(model: object, directory: str, dtype: Optional[torch.dtype]) -> None:
    """config.json (and generation_config.json) of a transformers model,
    with the class as its architecture and the dtype saved; nothing for
    anything else."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(config, "save_pretrained"):
        return
    config = copy.deepcopy(config)
    # FSDP2's fully_shard makes the class "FSDPLlamaForCausalLM".
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    saved = dtype or next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    if saved is not None:
        config.dtype = str(saved).removeprefix("torch.")
    config.save_pretrained(directory)
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if callable(can_generate) and can_generate() and generation_config is not None:
        generation_config.save_pretrained(directory)


def config_files(model: object, dtype: Optional[torch.dtype]) -> dict[str, bytes]:
    """The files save_config writes, by name, for a destination that is
    not a folder (object storage). transformers writes them (its checks,
    custom code files) into a temporary folder: a few kilobytes, never
    the weights."""
    with tempfile.TemporaryDirectory(prefix="trinity_stream_saver-config-") as folder:
        save_config(model, folder, dtype)
        files = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as file:
                    files[name] = file.read()
        return files
