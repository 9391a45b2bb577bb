"""The files a transformers model's folder holds besides its weights, as
save_pretrained writes them: config.json and generation_config.json."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from typing import Optional

import torch


class ConfigFiles:
    """A transformers model's config (and generation config) as they were
    when taken, with the class as its architecture and the dtype saved:
    an asynchronous save writes them after the weights, while training may
    change the model."""

    def __init__(self, config, generation_config):
        self._config = config
        self._generation_config = generation_config

    def save(self, directory: str) -> None:
        self._config.save_pretrained(directory)
        if self._generation_config is not None:
            self._generation_config.save_pretrained(directory)

    def contents(self) -> dict[str, bytes]:
        """The files, by name, for a destination that is not a folder
        (object storage). transformers writes them (its checks, custom code
        files) into a temporary folder: a few kilobytes, never the weights."""
        with tempfile.TemporaryDirectory(prefix="trinity_stream_saver-config-") as folder:
            self.save(folder)
            files = {}
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    with open(path, "rb") as file:
                        files[name] = file.read()
            return files


_warned_no_config = False


def _warn_no_config(model: object) -> None:
    """Once per process: a folder of weights alone is not what from_pretrained
    loads, and its failure would come much later, on another machine."""
    global _warned_no_config
    if _warned_no_config:
        return
    _warned_no_config = True
    what = type(model).__name__
    warnings.warn(
        f"save_model_streaming: the {what} saved has no transformers config, so only the "
        "weights are written and no config.json; from_pretrained cannot load the folder "
        "alone. Save the transformers model itself (it has .config), or write its config "
        "beside the weights (config.save_pretrained(folder)).",
        UserWarning, stacklevel=_callers_level())


def _callers_level() -> int:
    """The stacklevel of the first frame outside this package: the user's
    call, whichever path (sync, asynchronous, distributed) led here."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
            "trinity_stream_saver"):
        frame, level = frame.f_back, level + 1
    return level


def config_files(model: object, dtype: Optional[torch.dtype]) -> Optional[ConfigFiles]:
    """The config files of a transformers model as it is now; None (with a
    warning, once) for anything else."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(config, "save_pretrained"):
        _warn_no_config(model)
        return None
    config = copy.deepcopy(config)
    # FSDP2's fully_shard makes the class "FSDPLlamaForCausalLM".
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    saved = dtype or next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    if saved is not None:
        config.dtype = str(saved).removeprefix("torch.")
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if not (callable(can_generate) and can_generate()):
        generation_config = None
    return ConfigFiles(config, copy.deepcopy(generation_config))
