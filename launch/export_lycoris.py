"""`dedistill export --format lycoris`: a LoKr run's adapter as one LyCORIS-layout safetensors file.

The layout and scale handling are in train/lycoris_format.py (shared with `model.adapter.init_from`, which reads the
same files back). LyCORIS' `create_lycoris_from_weights` loads the file onto a plain diffusers FLUX transformer;
ComfyUI's LoRA loader maps the same `lycoris_<diffusers path>` keys for Flux models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from train.lycoris_format import lokr_state_dict

FILENAME = "lycoris_lokr.safetensors"


def save_lycoris(transformer: torch.nn.Module, out: Path, dtype: torch.dtype, *, metadata: dict[str, str]) -> Path:
    path = out / FILENAME
    save_file(lokr_state_dict(transformer, dtype), str(path), metadata={"algo": "lokr", **metadata})
    return path
