"""Checkpoints: the format on disk and its safe reader (format.py), the integrity manifest and checks (verify.py),
and the store and manager that save, resume, prune and rewind (manager.py)."""

from train.checkpoint.format import (
    MARKER, RefusedFile, SafeLoadPlanner, SafeReader, is_complete, latest_checkpoint, list_checkpoints, rank_file,
    read_metadata, rng_state, safe_load, safe_torch_load, set_rng_state,
)
from train.checkpoint.manager import CheckpointManager, CheckpointSaveError, CheckpointStore
from train.checkpoint.verify import verify_run

__all__ = [
    "MARKER", "CheckpointManager", "CheckpointSaveError", "CheckpointStore", "RefusedFile", "SafeLoadPlanner",
    "SafeReader", "is_complete", "latest_checkpoint", "list_checkpoints", "rank_file", "read_metadata", "rng_state", "safe_load",
    "safe_torch_load", "set_rng_state", "verify_run",
]
