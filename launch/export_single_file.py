"""Single-file exports for ComfyUI / Forge users: the transformer in BFL's key layout, and LoRA in kohya's.

Key maps live in launch/bfl_keys.py; here they meet a trained transformer and a safetensors file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from launch.bfl_keys import to_bfl, to_kohya_lora
from train.adapters import ADAPTER_NAME, adapted_module_names

BFL_FILE = "flux1-dedistill.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def save_bfl(transformer: torch.nn.Module, out: Path, dtype: torch.dtype, *, step: int, schedule) -> Path:
    """The (merged) transformer as one BFL-keyed safetensors file. Its metadata records the step and the sampling
    schedule (BFL files carry no scheduler config)."""
    state = to_bfl({k: v.detach().to(dtype) for k, v in transformer.state_dict().items()})
    path = out / BFL_FILE
    save_file(state, str(path), metadata={"format": "pt", "dedistill_step": str(step),
                                          "dedistill_schedule": schedule.describe()})
    return path


def save_kohya_lora(transformer: torch.nn.Module, out: Path, dtype: torch.dtype) -> Path:
    """The run's LoRA (PEFT layers in `transformer`) in the kohya layout, scaled as trained (alpha / rank)."""
    from peft.utils import get_peft_model_state_dict  # deferred: peft takes seconds; only a kohya LoRA needs it

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)  # "<module>.lora_A.weight", ...
    state = {k: v.detach().to(dtype) for k, v in state.items()}
    layers = {name: transformer.get_submodule(name) for name in adapted_module_names(transformer)}
    scales = {name: float(layer.scaling[ADAPTER_NAME]) for name, layer in layers.items()}  # alpha / r, as trained
    out_features = {n: m.out_features for n, m in transformer.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".lora_" not in n and not n.endswith("base_layer")}
    out_features.update({name: layer.get_base_layer().out_features for name, layer in layers.items()})
    path = out / KOHYA_FILE
    save_file(to_kohya_lora(state, scales, out_features), str(path), metadata={"format": "pt"})
    return path
