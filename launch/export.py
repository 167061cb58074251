"""`dedistill export`: a checkpoint as consolidated safetensors that diffusers loads.

- `--format diffusers` (any adapter kind): the base transformer with the adapter merged into its weights (LoRA and
  LoKr alike; a full fine-tune is just its weights), saved with `save_pretrained`, and every other pipeline component
  (VAE, both text encoders and tokenizers, scheduler, model_index.json) copied from the run's base model dir.
  `FluxPipeline.from_pretrained(DIR)` (`ChromaPipeline`, `Flux2Pipeline`, `Flux2KleinPipeline`: the run's family)
  loads it, and so does
  `dedistill sample --model DIR`. Beside it (launch/
  export_card.py): `pipeline.py`, the masked real-CFG pipeline that `DiffusionPipeline.from_pretrained(DIR,
  custom_pipeline=DIR, trust_remote_code=True)` loads; the run's sampling schedule in `scheduler/`; a README.md card.
- `--format lora` (LoRA adapters only): `pytorch_lora_weights.safetensors` in the PEFT key layout diffusers expects
  (`transformer.<module>.lora_A.weight`, ...), written by diffusers' own `FluxPipeline.save_lora_weights` with the
  adapter's rank/alpha/targets as metadata, so `FluxPipeline.load_lora_weights(DIR)` applies it at the trained scale.
  LoKr has no diffusers loader for FLUX: export it merged (`--format diffusers`), or as a LyCORIS file.
  `--lora-layout kohya` writes `lora_kohya.safetensors` in the kohya/ComfyUI layout instead (launch/bfl_keys.py).
- `--format lycoris` (LoKr adapters only): `lycoris_lokr.safetensors` in the LyCORIS/kohya key layout that LyCORIS'
  `create_lycoris_from_weights` and ComfyUI load (launch/export_lycoris.py).
- `--format bfl` (any adapter kind): the merged transformer as one safetensors file in Black Forest Labs' original key
  layout (`flux1-dedistill.safetensors`), the single file ComfyUI / Forge load; diffusers reads it with
  `FluxTransformer2DModel.from_single_file` (launch/export_single_file.py). FLUX runs only.

Which formats a model family has, and which `pipeline.py` it ships, is its row in train/family.py.

One process, CPU, no process group: DCP reassembles the sharded checkpoint (FSDP2 or DeepSpeed, same layout). The merge
runs in fp32 and the result is cast to `--dtype` (bf16, what FLUX ships, by default).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from launch.export_lycoris import save_lycoris
from launch.export_single_file import save_bfl, save_kohya_lora
from train.adapters import ADAPTER_NAME, apply_adapter, merge_adapter
from train.config import load_run_config
from train.family import family_of_model
from train.model import cast_model, load_transformer
from train.run_dir import checkpoint_step

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("diffusers", "lora", "lycoris", "bfl")


def _load_trained_transformer(ckpt: Path, run_dir: Path, *, ema: bool):
    """(transformer with the trained adapter/weights in fp32 on CPU, the run's config)."""
    # deferred: train.inference costs ~0.5 s at import, and `dedistill --help` imports this module (export_cli)
    from train.inference import check_ema, load_trainable_state

    cfg = load_run_config(run_dir)
    check_ema(cfg, run_dir, ema)  # before the (slow) base model load
    transformer = load_transformer(cfg.model.path, dtype=torch.float32, guidance=cfg.model.guidance,
                                   guidance_scale=cfg.model.guidance_scale)
    apply_adapter(transformer, cfg.model.adapter)
    load_trainable_state(transformer, ckpt, ema=ema)
    return transformer.eval().requires_grad_(False), cfg


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: '{out}' exists and is not empty")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str = "diffusers", dtype: str = "bf16",
                      ema: bool = False, lora_layout: str = "peft") -> Path:
    # deferred: these two cost ~0.5 s at import, and `dedistill --help` imports this module (export_cli)
    from launch.export_card import write_diffusers_extras
    from train.inference import resolve_checkpoint, sampling_schedule

    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if lora_layout not in ("peft", "kohya"):
        raise ValueError(f"--lora-layout: {lora_layout!r} is not one of peft, kohya")
    if lora_layout != "peft" and fmt != "lora":
        raise ValueError(f"--lora-layout: applies to --format lora, not {fmt}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
    ckpt, run_dir = resolve_checkpoint(checkpoint, key="--checkpoint")
    if ckpt is None:
        raise ValueError(f"--checkpoint: '{checkpoint}' is already a diffusers model dir; there is nothing to export")
    out = Path(out)
    _check_out(out)
    transformer, cfg = _load_trained_transformer(ckpt, run_dir, ema=ema)
    family = family_of_model(transformer)
    if fmt not in family.export_formats:
        raise ValueError(f"--format: {fmt} is not available for a {family.name} model "
                         f"(its formats: {', '.join(family.export_formats)})")
    schedule = sampling_schedule(cfg.model.path, cfg)  # what the run says its model samples with
    kind = cfg.model.adapter.kind
    if fmt == "lora" and kind != "lora":
        raise ValueError(
            f"--format: lora exports a LoRA adapter, but this run trained '{kind}'"
            + ("; diffusers has no LoKr loader for FLUX: use --format lycoris, or --format diffusers (merged)" if kind == "lokr"
               else "; use --format diffusers")
        )
    if fmt == "lycoris" and kind != "lokr":
        raise ValueError(f"--format: lycoris exports a LoKr adapter, but this run trained '{kind}'")
    out.mkdir(parents=True, exist_ok=True)
    step = checkpoint_step(ckpt)
    if fmt == "lycoris":  # launch/export_lycoris.py
        save_lycoris(transformer, out, _DTYPES[dtype], metadata={"base_model": cfg.model.path, "step": str(step)})
    elif fmt == "lora" and lora_layout == "kohya":
        save_kohya_lora(transformer, out, _DTYPES[dtype])
    elif fmt == "lora":
        _save_lora(transformer, out, _DTYPES[dtype])
    elif fmt == "bfl":
        merge_adapter(transformer)  # in fp32, then cast once
        save_bfl(transformer, out, _DTYPES[dtype], step=step, schedule=schedule)
    else:
        merge_adapter(transformer)  # in fp32, then cast once
        cast_model(transformer, _DTYPES[dtype]).save_pretrained(str(out / "transformer"), safe_serialization=True)
        _copy_components(Path(cfg.model.path), out)
        write_diffusers_extras(out, cfg, checkpoint=ckpt, step=step, ema=ema, dtype=dtype, schedule=schedule)
    (out / "dedistill_export.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "step": step, "adapter": kind, "format": fmt, "dtype": dtype, "ema": ema,
        "base_model": cfg.model.path, "schedule": {"describe": schedule.describe(), **schedule.scheduler_config()},
        # how the text was masked in training: `dedistill sample --model OUT` reads it (train.inference.text_settings)
        "objective": {"attention_mask": cfg.objective.attention_mask,
                      "visible_padding_tokens": cfg.objective.visible_padding_tokens},
        **({"lora_layout": lora_layout} if fmt == "lora" else {}),
    }, indent=2))
    return out


def _copy_components(base: Path, out: Path) -> None:
    """Every pipeline component of the base model except the transformer, and its model_index.json."""
    index = json.loads((base / "model_index.json").read_text())
    for name, value in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(value, list):
            continue
        if (base / name).is_dir():
            shutil.copytree(base / name, out / name)
    shutil.copy2(base / "model_index.json", out / "model_index.json")


def _save_lora(transformer: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    from peft.utils import get_peft_model_state_dict  # deferred: peft takes seconds; only a LoRA export needs it

    config = transformer.peft_config[ADAPTER_NAME]
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)  # "<module>.lora_A.weight", ...
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "use_dora": False, "lora_bias": False}
    # The family's pipeline (FluxPipeline, ChromaPipeline: both FluxLoraLoaderMixin) writes and later loads it.
    family_of_model(transformer).pipeline_cls().save_lora_weights(
        str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)


def register(sub) -> None:
    s = sub.add_parser(
        "export", help="a checkpoint as a diffusers pipeline dir (adapter merged) or a diffusers-loadable LoRA",
        description="Consolidated safetensors of a checkpoint. --format diffusers: a full pipeline dir, the adapter "
        "merged into the transformer (LoRA, LoKr or full fine-tune), with pipeline.py (the masked real-CFG pipeline: "
        "DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)), the run's sampling "
        "schedule and a README.md model card. --format lora: a LoRA adapter for FluxPipeline.load_lora_weights "
        "(LoRA runs only), PEFT or kohya layout. --format lycoris: a LoKr run's adapter in the LyCORIS layout "
        "(LyCORIS, ComfyUI). --format bfl: the merged transformer as one file in Black Forest Labs' keys "
        "(ComfyUI / Forge).",
    )
    s.add_argument("--checkpoint", required=True, help="checkpoint dir (step_N) or run dir (its newest checkpoint)")
    s.add_argument("--out", required=True, help="output directory (new or empty)")
    s.add_argument("--format", dest="fmt", choices=list(FORMATS), default="diffusers",
                   help="lycoris: a LoKr run's adapter in the LyCORIS/ComfyUI key layout (launch/export_lycoris.py); "
                   "bfl: the merged transformer as one safetensors file in Black Forest Labs' key layout "
                   "(ComfyUI / Forge)")
    s.add_argument("--lora-layout", choices=["peft", "kohya"], default="peft",
                   help="--format lora: peft (diffusers' layout) or kohya (lora_unet_<BFL module>, ComfyUI / Forge)")
    s.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weights dtype of the export")
    s.add_argument("--ema", action="store_true", help="export the EMA weights")
    s.set_defaults(func=cmd_export)


def cmd_export(a) -> None:
    out = export_checkpoint(a.checkpoint, a.out, fmt=a.fmt, dtype=a.dtype, ema=a.ema, lora_layout=a.lora_layout)
    print(out)
