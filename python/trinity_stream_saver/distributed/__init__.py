"""save_model_streaming: a Hugging Face checkpoint from a model that may be
sharded over torch.distributed ranks; see save.py for its phases, and the
modules named for each concept: phases (the protocol between ranks),
entries (what is saved), assignment (who writes what), transport (how a
tensor reaches its writer), staging (CPU buffers), feed (what a writer
pulls), storage (how files land) and hf_config (config.json)."""

from .assignment import assign_files
from .phases import DistributedSaveError
from .save import save_model_streaming

__all__ = ["DistributedSaveError", "assign_files", "save_model_streaming"]
