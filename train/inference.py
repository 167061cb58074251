"""Load a model for sampling/eval/export from any of: a diffusers FLUX or Chroma dir, a run dir, or one checkpoint dir.

A checkpoint holds only the trainable state; the base weights come from the run's `model.path`, the adapter from its
`model.adapter` config. One process, no FSDP: DCP reassembles the sharded tensors into plain ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from train.adapters import apply_adapter, trainable_named_parameters
from train.checkpoint import is_complete, latest_checkpoint, safe_load
from train.config import JobConfig, SCHEDULES, load_run_config
from train.family import family_of_dir
from train.model import load_scheduler_config, load_transformer, load_vae, resolve_dtype
from train.objective import DEV_SCHEDULE, SamplingSchedule
from train.run_dir import RunDir, checkpoint_step, is_checkpoint_dir
from train.text import TextEncoder


@dataclass
class Loaded:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text: TextEncoder
    dtype: torch.dtype
    device: torch.device
    config: JobConfig | None
    """The run's config when loaded from a checkpoint (None for a plain diffusers dir)."""
    checkpoint: Path | None
    step: int | None
    schedule: SamplingSchedule
    """The sigma schedule to sample with (see `sampling_schedule`)."""


def resolve_checkpoint(path: str | Path, *, key: str = "--model") -> tuple[Path | None, Path | None]:
    """(checkpoint dir or None, run dir or None) for a diffusers dir, run dir or checkpoint dir."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return None, None
    run = RunDir(path)
    if run.checkpoints.is_dir():
        ckpt = latest_checkpoint(run.checkpoints)
        if ckpt is None:
            raise ValueError(f"{key}: run dir '{path}' has no complete checkpoint")
        return ckpt, path
    if is_checkpoint_dir(path):
        if not is_complete(path):
            raise ValueError(f"{key}: checkpoint '{path}' is incomplete (no COMPLETE marker)")
        return path, RunDir.of_checkpoint(path).root
    raise ValueError(f"{key}: '{path}' is neither a diffusers FLUX/Chroma dir, a run dir, nor a checkpoint dir")


def check_ema(cfg: JobConfig, run_dir: Path, ema: bool, *, key: str = "--ema") -> None:
    """A run with ema.decay 0 saved no 'ema' state: say so, instead of DCP's "cannot load" error."""
    if ema and cfg.ema.decay <= 0:
        raise ValueError(f"{key}: run '{run_dir}' trained no EMA (ema.decay {cfg.ema.decay:g}); use its raw weights "
                         f"(drop {key}) or train with ema.decay > 0")


def model_schedule(model_path: str | Path) -> SamplingSchedule:
    """The schedule a diffusers FLUX dir's own scheduler config gives in FluxPipeline (none: FluxPipeline's default
    FlowMatchEulerDiscreteScheduler(), i.e. no shift)."""
    f = Path(model_path) / "scheduler" / "scheduler_config.json"
    return SamplingSchedule.from_scheduler_config(load_scheduler_config(model_path), source=str(f))


def sampling_schedule(model_path: str | Path, run_config: JobConfig | None = None, *, override: str | None = None,
                      shift: float | None = None) -> SamplingSchedule:
    """Which schedule to sample with, as diffusers would, unless told otherwise.

    - `override` (a `dedistill sample --schedule` / eval `sampling.schedule`): dynamic | model | constant (`shift`).
    - else a run's checkpoint: its `sample.schedule` (default dynamic: a de-distilled model samples like FLUX.1-dev).
    - else a plain diffusers dir (FLUX.1-schnell, or an export): its own scheduler config, as FluxPipeline reads it.
    """
    kind = override or (run_config.sample.schedule if run_config is not None else "model")
    if kind not in SCHEDULES:
        raise ValueError(f"--schedule: {kind!r} is not one of {', '.join(SCHEDULES)}")
    # A family whose pipeline computes mu itself (FLUX.2) keeps that rule under either dynamic schedule.
    empirical = family_of_dir(model_path).empirical_mu
    if kind == "dynamic":
        return dataclasses.replace(DEV_SCHEDULE, empirical_mu=empirical)
    if kind == "model":
        s = model_schedule(model_path)
        return dataclasses.replace(s, empirical_mu=empirical and s.dynamic)
    if shift is None:
        shift = run_config.sample.shift if run_config is not None else None
    if shift is None:
        raise ValueError("--shift: a constant schedule needs a shift value")
    return SamplingSchedule(dynamic=False, shift=shift)


def text_settings(path: str | Path, run_config: JobConfig | None) -> tuple[bool, int]:
    """(attention mask on, visible padding tokens) the model was trained with: a run's objective, else an export's
    `dedistill_export.json` (`dedistill export` records them), else a plain diffusers dir's (masked, k = 0)."""
    if run_config is not None:
        return run_config.objective.attention_mask, run_config.objective.visible_padding_tokens
    f = Path(path) / "dedistill_export.json"
    if f.is_file():
        try:
            o = json.loads(f.read_text()).get("objective", {})
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        return bool(o.get("attention_mask", True)), int(o.get("visible_padding_tokens", 0))
    return True, 0


def load_trainable_state(transformer: torch.nn.Module, checkpoint: Path, *, ema: bool = False) -> None:
    named = trainable_named_parameters(transformer)
    state = {n: p.detach().clone().float() for n, p in named}
    key = "ema" if ema else "model"
    try:
        # no_dist: this process reads every shard itself, even when a process group exists (an inline eval on
        # rank 0 of a training job, or each rank of an eval job); with collectives it would wait for the others.
        safe_load({key: state}, checkpoint, no_dist=True)  # no pickled objects from the checkpoint
    except (Exception, CheckpointException) as e:  # DCP raises a generic error for a missing key
        raise ValueError(f"checkpoint '{checkpoint}': cannot load '{key}' state ({str(e).splitlines()[0]})") from None
    with torch.no_grad():
        for n, p in named:
            p.copy_(state[n].to(p.dtype))


def load_for_inference(
    path: str | Path, *, device: torch.device | None = None, dtype: str = "auto", ema: bool = False,
    schedule: str | None = None, shift: float | None = None,
) -> Loaded:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt, run_dir = resolve_checkpoint(path)
    cfg = None
    model_path = Path(path)
    if ckpt is not None:
        cfg = load_run_config(run_dir)
        check_ema(cfg, run_dir, ema)
        model_path = Path(cfg.model.path)
    sched = sampling_schedule(model_path, cfg, override=schedule, shift=shift)  # before any weights: fails fast
    torch_dtype = resolve_dtype(dtype, device)
    guidance = {} if cfg is None else dict(guidance=cfg.model.guidance, guidance_scale=cfg.model.guidance_scale)
    transformer = load_transformer(model_path, dtype=torch_dtype, **guidance)
    if cfg is not None:
        apply_adapter(transformer, cfg.model.adapter)
        load_trainable_state(transformer, ckpt, ema=ema)
    transformer.to(device).eval().requires_grad_(False)
    step = checkpoint_step(ckpt) if ckpt is not None else None
    return Loaded(
        transformer=transformer,
        vae=load_vae(model_path, dtype=torch_dtype, device=device),
        text=TextEncoder(model_path, dtype=torch_dtype, device=device),
        dtype=torch_dtype,
        device=device,
        config=cfg,
        checkpoint=ckpt,
        step=step,
        schedule=sched,
    )
