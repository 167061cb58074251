"""`dedistill describe CONFIG [a.b=v ...]`: what a config will train, at the real model's size, without weights.

The transformer is built on the meta device from a config.json (no memory, no weights), the adapter injected the way
the trainer injects it, and the parameters counted. `model.path` names the config: a local diffusers FLUX dir uses
its own `transformer/config.json`; a placeholder (`/path/to/...`, or empty as in tiny-cpu.yaml, which the demo fills
in) uses FLUX.1-schnell's, shipped in configs/models/flux1-schnell/transformer/config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.cli import _preset
from train.adapters import adapter_groups, apply_adapter, count_parameters
from train.config import load_config, to_dict
from train.model import build_transformer_meta

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "models" / "flux1-schnell" / "transformer" / "config.json"


def is_placeholder(model_path: str) -> bool:
    return not model_path or model_path.startswith("/path/to/")


def transformer_config(model_path: str) -> tuple[dict, str]:
    """(the transformer's config.json as a dict, a line saying where it came from)."""
    if is_placeholder(model_path):
        why = "a placeholder" if model_path else "empty"
        return json.loads(SHIPPED.read_text()), (
            f"FLUX.1-schnell, {SHIPPED.relative_to(REPO)} (model.path {model_path!r} is {why})")
    path = Path(model_path) / "transformer" / "config.json"
    if not path.is_file():
        raise ValueError(f"model.path: '{model_path}' has no transformer/config.json (a diffusers FLUX dir, or a "
                         f"/path/to/... placeholder to describe FLUX.1-schnell)")
    return json.loads(path.read_text()), str(path)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def describe(cfg) -> str:
    config, source = transformer_config(cfg.model.path)
    transformer = build_transformer_meta(config, guidance=cfg.model.guidance, guidance_scale=cfg.model.guidance_scale)
    base = sum(p.numel() for p in transformer.parameters())
    with torch.device("meta"):  # adapter factors on meta too: LibreFLUX's LoKr alone is 2 B parameters
        transformer.requires_grad_(False)
        apply_adapter(transformer, cfg.model.adapter)
    trainable, _ = count_parameters(transformer)
    c = transformer.config
    a = cfg.model.adapter
    lines = [
        f"model: {source}",
        f"  {c.num_layers} double-stream + {c.num_single_layers} single-stream blocks, "
        f"{c.num_attention_heads} heads x {c.attention_head_dim}, joint_attention_dim {c.joint_attention_dim}, "
        f"guidance_embeds {str(c.guidance_embeds).lower()}",
        f"parameters: {base:,} in the transformer; {trainable:,} trainable ({100 * trainable / base:.2f} %)",
    ]
    if a.kind == "lokr":
        lines.append(f"adapter: lokr, scale_convention {a.scale_convention} "
                     f"(rank {a.rank}, alpha {a.alpha:g}, factor {a.lokr_factor}, full_matrix "
                     f"{str(a.lokr_full_matrix).lower()})")
    elif a.kind == "lora":
        lines.append(f"adapter: lora (rank {a.rank}, alpha {a.alpha:g})")
    lines += [f"  {g.line()}" for g in adapter_groups(transformer, a)]
    o = cfg.objective
    if o.kind == "teacher":
        lines.append(f"objective: teacher, the frozen model.path with its guidance embedder fed w ~ U{o.teacher_guidance} "
                     f"is the target of the student's uncond + w·(cond − uncond) (data term weight "
                     f"{o.teacher_data_weight:g}); per sample: 2 student rows + 1 teacher forward")
    t = cfg.train
    lines.append(f"batch: {t.batch_size} per rank x grad_accum {t.grad_accum} = {t.batch_size * t.grad_accum} "
                 f"per rank and step (x world size); {t.max_steps:,} steps")
    lines.append("settings:")
    lines += [f"  {k}: {json.dumps(v)}" for k, v in _flatten(to_dict(cfg))]
    return "\n".join(lines)


def register(sub) -> None:
    s = sub.add_parser(
        "describe", help="a config's effective settings, adapter scale and trainable parameters at real FLUX size",
        description="Print the effective settings of a config (after overrides), the adapter's effective scale per "
        "layer group and the trainable-parameter count, with the transformer built on the meta device (no weights).",
    )
    s.add_argument("config", help="YAML config path or preset name (configs/)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides")
    s.set_defaults(func=cmd_describe)


def cmd_describe(a) -> None:
    path = _preset(a.config)
    print(f"config: {path}" + (f" + {' '.join(a.overrides)}" if a.overrides else ""))
    print(describe(load_config(path, a.overrides)))
