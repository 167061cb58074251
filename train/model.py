"""Load FLUX or Chroma components from a local diffusers-format directory: the same code for a tiny test pipeline and
the 12B FLUX.1-schnell. Which transformer class and which subdirs is the dir's family (train/family.py). The transformer is built on the meta device and its weights assigned from safetensors, so no random
initialisation of 12B parameters ever runs. Encoders and the VAE are frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from train.family import family_of_class, family_of_dir, family_of_model
from train.model_schema import check_transformer_config

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and the tests compare in fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_model_dir(path: str | Path, *, key: str = "model.path") -> Path:
    path = Path(path)
    if not str(path) or not path.is_dir():
        raise ValueError(f"{key}: '{path}' is not a directory (expected a local diffusers-format FLUX or Chroma "
                         f"pipeline)")
    family = family_of_dir(path, key=key)
    for sub in family.components:
        if not (path / sub).is_dir():
            raise ValueError(f"{key}: '{path}' has no {sub}/ (expected a diffusers-format {family.pipeline_class} dir)")
    return path


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors weights (pickled .bin weights are refused)")
    return files


def load_safetensors_dir(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k).to(dtype)
    return state


def build_transformer_meta(config: dict, *, guidance: str = "bypass", guidance_scale: float = 1.0):
    """The transformer of `config`'s family (its `_class_name`; FLUX when absent) with every parameter on the meta
    device (no memory, no init). A guidance-distilled config is built as `model.guidance` says (`guided_config`);
    `keep` feeds its embedder `guidance_scale` whenever a caller passes no guidance."""
    check_transformer_config(config, where="transformer config")
    family = family_of_class(config.get("_class_name", "FluxTransformer2DModel"))
    config, _ = guided_config(config, guidance)
    with torch.device("meta"):
        model = family.transformer_cls().from_config(config)
    family.prepare(model)  # attention processors (Chroma: no fully masked query row reaches SDPA)
    if family.embeds_guidance(config) and family.constant_guidance is not None:
        family.constant_guidance(model, guidance_scale)
    return model


def guided_config(config: dict, guidance: str) -> tuple[dict, str]:
    """(the transformer config to build, the weight-name prefix to leave unread: "" for none).

    `bypass` on a guidance-distilled checkpoint (FLUX.1-dev class): the config with `guidance_embeds: false` and the
    family's guidance-embedder prefix, i.e. a schnell-shaped transformer. It computes exactly what the dev model
    computes with the embedder out of the graph (ai-toolkit's `bypass_guidance_embedding`, lodestone's
    `guidance_embed = False`), needs no guidance input, and saves as a model FluxPipeline and ComfyUI read as
    schnell-type. `keep`, or a model without the embedder: the config as it is."""
    family = family_of_class(config.get("_class_name", "FluxTransformer2DModel"))
    if guidance == "bypass" and family.embeds_guidance(config):
        return {**config, "guidance_embeds": False}, family.guidance_embedder
    return config, ""


def _transformer_config(path: str | Path, guidance: str) -> tuple[Path, dict, str]:
    folder = check_model_dir(path) / "transformer"
    return folder, *guided_config(dict(family_of_dir(path).transformer_cls().load_config(str(folder))), guidance)


def transformer_source(path: str | Path, *, guidance: str = "bypass") -> tuple[dict, list[Path], str]:
    """(the transformer config to build, its safetensors files, the weight-name prefix to leave unread) of a model
    dir: what a sharded load reads. `guidance`: `model.guidance` (see `guided_config`)."""
    folder, config, dropped = _transformer_config(path, guidance)
    return config, _weight_files(folder), dropped


def load_transformer(path: str | Path, *, dtype: torch.dtype, guidance: str = "bypass", guidance_scale: float = 1.0):
    """Transformer built on meta, then its weights assigned from the pipeline's safetensors (on CPU): the whole model
    in this process (inference, export, DeepSpeed). Training under FSDP2 loads sharded instead
    (train/parallel/load.py `meta_transformer`). `guidance`/`guidance_scale`: `model.guidance` (a guidance-distilled
    base is bypassed by default)."""
    folder, config, dropped = _transformer_config(path, guidance)
    model = build_transformer_meta(config, guidance=guidance, guidance_scale=guidance_scale)
    state = load_safetensors_dir(folder, dtype)
    if dropped:
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the transformer config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    set_computed_buffers(model)  # Chroma's mod_proj; FLUX has no buffers
    assert not any(t.is_meta for t in model.state_dict().values()), "transformer left on meta"
    return model


def computed_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that no weight file holds, computed on the CPU: none in FLUX; in Chroma `time_text_embed.mod_proj`,
    the modulation-index embedding its __init__ computes. From a second build whose parameters are on meta but whose
    buffers are real (accelerate's `init_empty_weights`, as diffusers' own loader builds)."""
    if not any(True for _ in model.buffers()):
        return {}
    from accelerate import init_empty_weights  # deferred on purpose: only Chroma has such buffers

    with init_empty_weights(include_buffers=False):
        fresh = family_of_model(model).transformer_cls().from_config(dict(model.config))
    return dict(fresh.named_buffers())


def set_computed_buffers(model: torch.nn.Module, *, device: torch.device | str = "cpu") -> None:
    """Assign `computed_buffers` in place (after a meta build, or after `to_empty`), keeping each buffer's dtype."""
    for name, value in computed_buffers(model).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = value.to(device, module._buffers[leaf].dtype)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` for a diffusers model, keeping its `_keep_in_fp32_modules` in fp32 as from_pretrained does.

    Not ModelMixin.to: diffusers 0.39 warns "There are modules ... that should be kept in float32: []" on every dtype
    cast (its `fp32_modules is not None` test is always true), FLUX's empty list included."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    torch.nn.Module.to(model, dtype)
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return model


def load_vae(path: str | Path, *, dtype: torch.dtype, device: torch.device):
    import diffusers  # deferred: seconds to import, and `dedistill --help` imports this module

    vae_cls = getattr(diffusers, family_of_dir(path).vae_class)
    vae = vae_cls.from_pretrained(str(check_model_dir(path) / "vae"), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_scheduler_config(path: str | Path) -> dict:
    """The model dir's `scheduler/scheduler_config.json` (FluxPipeline's sampling schedule), or {} if it has none."""
    f = Path(path) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
