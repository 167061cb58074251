"""The frozen teacher of `objective.kind: teacher`: the guidance-distilled base model itself, guidance embedder kept.

It is the same `model.path` the student starts from, loaded the way the student's backend loads (FSDP2: built on
meta, `fully_shard` per block with the student's mesh and mixed precision, then each rank reads only its own rows
of the safetensors; DeepSpeed: whole on every rank), never trained: no adapter, no activation checkpointing (it runs
under no_grad), no optimizer state. The step calls it through `train.flux.predict_velocity`, so it sees the same
packed latents, the same bool key mask and the same trimmed text as the student's conditional branch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.config import JobConfig
from train.family import family_of_dir
from train.model import load_transformer
from train.parallel.load import materialize, meta_transformer
from train.parallelize import DistInfo, parallelize_transformer


def check_teacher_model(path: str) -> None:
    """The teacher objective needs a guidance-distilled base (its embedder is what is distilled back into real CFG)."""
    family = family_of_dir(path)
    config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    if not family.embeds_guidance(config):
        raise ValueError(f"objective.kind: teacher needs a guidance-distilled model.path (transformer config "
                         f"guidance_embeds: true, e.g. FLUX.1-dev); '{path}' has none (use objective.kind=data)")


def build_teacher(cfg: JobConfig, info: DistInfo, dtype: torch.dtype) -> torch.nn.Module | None:
    """The frozen teacher on `info.device` (sharded like the student under FSDP2), or None for `objective.kind: data`."""
    if cfg.objective.kind != "teacher":
        return None
    check_teacher_model(cfg.model.path)
    if cfg.parallel.backend == "fsdp2":
        teacher, index = meta_transformer(cfg.model.path, dtype=dtype, guidance="keep")
        teacher.requires_grad_(False)
        teacher = parallelize_transformer(teacher, cfg.parallel, info=info, compute_dtype=dtype,
                                          activation_checkpointing=False)
        materialize(teacher, torch.device("cpu") if cfg.parallel.cpu_offload else info.device, index, initial={})
    else:
        teacher = load_transformer(cfg.model.path, dtype=dtype, guidance="keep").requires_grad_(False).to(info.device)
    return teacher.eval()
