"""What `--format diffusers` writes beside the weights, so the export samples outside dedistill as it was trained:

- `pipeline.py`: the family's masked real-CFG pipeline (launch/templates/masked_flux_pipeline.py, or the Chroma /
  FLUX.2 one named by its row in train/family.py, with the run's mask and text length filled in), for `DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)`;
- `scheduler/scheduler_config.json`: the schedule the run says its model samples with (`sample.schedule`; FLUX.1-dev's
  dynamic shift by default), so FluxPipeline, the custom pipeline and `dedistill sample` all read the same one;
- `README.md`: a model card with the base model, the recipe, the checkpoint and how to sample with CFG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from train.config import JobConfig
from train.family import family_of_dir
from train.objective import SamplingSchedule
from train.sampling import run_sampling_settings

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = TEMPLATES / "masked_flux_pipeline.py"


def template_for(cfg: JobConfig) -> Path:
    """The run's family's pipeline template (train/family.py): masked_flux_pipeline.py or masked_chroma_pipeline.py."""
    return TEMPLATES / family_of_dir(cfg.model.path).pipeline_template


def pipeline_source(cfg: JobConfig) -> str:
    """The template with the run's training-time constants written in (each line must exist exactly once). A
    FLUX.2 template also gets its family's stock pipeline (its base class) and stacked text layers."""
    template = template_for(cfg)
    family = family_of_dir(cfg.model.path)
    src = template.read_text()
    constants = [("ATTENTION_MASK", cfg.objective.attention_mask),
                 ("MAX_TEXT_TOKENS", cfg.objective.max_text_tokens),
                 ("VISIBLE_PADDING_TOKENS", cfg.objective.visible_padding_tokens)]
    if family.text_layers:
        constants += [("STOCK_PIPELINE", family.pipeline_class), ("TEXT_LAYERS", family.text_layers)]
    for name, value in constants:
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", src, flags=re.M)
        assert n == 1, f"{template}: expected one '{name} = ...' line"
    return src


def write_scheduler(out: Path, schedule: SamplingSchedule) -> None:
    """The export's scheduler config: the base model's, with the schedule's keys replaced."""
    f = out / "scheduler" / "scheduler_config.json"
    base = json.loads(f.read_text()) if f.is_file() else {"_class_name": "FlowMatchEulerDiscreteScheduler"}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({**base, **schedule.scheduler_config()}, indent=2, sort_keys=True) + "\n")


def _recipe_rows(cfg: JobConfig) -> list[tuple[str, str]]:
    a, o = cfg.model.adapter, cfg.objective
    if a.kind == "full":
        adapter = "full fine-tune (every transformer weight)"
    elif a.kind == "lora":
        adapter = f"LoRA, rank {a.rank}, alpha {a.alpha:g}, merged into the weights"
    else:
        adapter = (f"LoKr, factor {a.lokr_factor}, rank {a.rank}, alpha {a.alpha:g}"
                   + (", full-matrix w2" if a.lokr_full_matrix else "") + ", merged into the weights")
    sampler = {"uniform": "uniform", "logit_normal": f"logit-normal({o.logit_mean:g}, {o.logit_std:g})",
               "beta": f"Beta({o.beta_alpha:g}, {o.beta_beta:g})",
               "chroma": "Chroma's density -7.7(t-0.5)^2+2"}[o.timestep_sampler]
    if o.temperature != 1.0:
        sampler += f", temperature {o.temperature:g}"
    shift = {"none": "none", "constant": f"constant {o.shift_value:g}", "resolution": "resolution-dependent"}[o.shift]
    batch = cfg.train.batch_size * cfg.train.grad_accum
    return [
        ("adapter", adapter),
        ("timestep sampler (training)", f"{sampler}; shift {shift}"),
        ("caption dropout", f"{o.caption_dropout:g} (the empty prompt: what CFG's unconditional branch learns)"),
        ("T5 padding mask", "on (bool key mask in joint attention)" if o.attention_mask else "off"),
        ("max_text_tokens", str(o.max_text_tokens)),
        ("visible padding tokens", str(o.visible_padding_tokens)),
        ("noise pairing", o.noise_pairing),
        ("training steps",
         f"{cfg.train.max_steps} (batch {batch} per rank, lr {cfg.optim.lr:g}, {cfg.optim.schedule})"),
        ("EMA decay", f"{cfg.ema.decay:g}" if cfg.ema.decay else "off"),
    ]


def model_card(cfg: JobConfig, *, checkpoint: Path, step: int, ema: bool, dtype: str,
               schedule: SamplingSchedule) -> str:
    # the run's own sampling settings, at the first real-CFG scale of its sample grid
    s = run_sampling_settings(cfg, schedule=schedule,
                              cfg_scale=next((c for c in cfg.sample.cfg_scales if c > 1.0), 3.5))
    cfg_scale = s.cfg_scale

    family = family_of_dir(cfg.model.path)
    stock = family.pipeline_class
    mask_note = (
        f"It was trained with the T5 padding mask. Stock `{stock}` {family.stock_mask}, so it samples a different "
        "image than the model was trained for; use the pipeline below."
        if cfg.objective.attention_mask else
        f"It was trained without the T5 padding mask; stock `{stock}` {family.stock_mask}."
    )
    schedule_note = (
        "FLUX.2's own: mu from the image token count and the step count (`compute_empirical_mu`), as Flux2Pipeline "
        "and the `pipeline.py` below compute it." if schedule.empirical_mu else
        "A de-distilled model is a multi-step flow model like FLUX.1-dev, and is sampled with dev's "
        "resolution-dependent shift (BFL's reference sampler uses it for every FLUX.1 model except schnell; "
        "schnell's own config, no shift, is tuned for 1-4 steps).")
    rows = "\n".join(f"| {k} | {v} |" for k, v in _recipe_rows(cfg))
    prompt = cfg.sample.prompts[0] if cfg.sample.prompts else "a photo of a cat"
    neg = s.negative_prompt
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [{family.name}, de-distilled, dedistill]
---
# De-distilled {family.name.capitalize()}: `{Path(cfg.run_dir).name}` at step {step}

A {family.transformer_class} de-distilled with dedistill from `{cfg.model.path}`, exported as a full
diffusers pipeline (`dedistill export --format diffusers`). It samples with **real classifier-free guidance**
(a negative prompt and a guidance scale > 1, two forwards per step), not with a distilled guidance vector.
{mask_note}

| | |
|---|---|
| base model | `{cfg.model.path}` |
| checkpoint | `{checkpoint}` (step {step}{", EMA weights" if ema else ""}), exported as {dtype} |
{rows}
| sampling schedule | {schedule.describe()} (`scheduler/scheduler_config.json`) |

**Sampling schedule.** {schedule_note} This export's scheduler config says which schedule to use, so every
loader below reads the same one.

## Sample with CFG in diffusers

`pipeline.py` (in this folder, torch + diffusers only) applies the mask, trims the text and runs real CFG:

```python
import torch
from diffusers import DiffusionPipeline

export = "path/to/this/folder"
pipe = DiffusionPipeline.from_pretrained(export, custom_pipeline=export, trust_remote_code=True,
                                         torch_dtype=torch.bfloat16).to("cuda")
image = pipe("{prompt}", negative_prompt="{neg}", true_cfg_scale={cfg_scale:g}, num_inference_steps={s.steps},
             height={s.resolution}, width={s.resolution}, cfg_skip_steps={s.cfg_skip_steps},
             cfg_rescale={s.cfg_rescale:g}, noise_temperature={s.noise_temperature:g},
             generator=torch.Generator().manual_seed({s.seed})).images[0]
image.save("sample.png")
```

(diffusers asks for `trust_remote_code=True` to run a local `pipeline.py`; read it first, it is short.)

## Sample with dedistill

```
dedistill sample --model path/to/this/folder --prompt "{prompt}" --negative-prompt "{neg}" \\
    --cfg {cfg_scale:g} --steps {s.steps} --resolution {s.resolution} --seed {s.seed} \\
    --cfg-skip-steps {s.cfg_skip_steps} --cfg-rescale {s.cfg_rescale:g} --noise-temperature {s.noise_temperature:g} \\
    --out sample.png
```

Same seed, settings and dtype: the same image as the pipeline above, pixel for pixel (dedistill's tests check this
on CPU in fp32; on a GPU both run the same operations, which was not verified there).
"""


def write_diffusers_extras(out: Path, cfg: JobConfig, *, checkpoint: Path, step: int, ema: bool, dtype: str,
                           schedule: SamplingSchedule) -> None:
    write_scheduler(out, schedule)
    (out / "pipeline.py").write_text(pipeline_source(cfg))
    (out / "README.md").write_text(model_card(cfg, checkpoint=checkpoint, step=step, ema=ema, dtype=dtype,
                                              schedule=schedule))
