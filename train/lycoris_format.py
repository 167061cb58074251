"""LoKr in the LyCORIS/kohya file layout, out (`dedistill export --format lycoris`) and in (`model.adapter.init_from`).

Layout (what LyCORIS' `save_weights` writes and `create_lycoris_from_weights` reads): for each adapted Linear,
`lycoris_<module path, dots as underscores>.lokr_w1` / `.lokr_w2` (or `_a` / `_b` for a low-rank factor) and
`.alpha`, e.g. `lycoris_single_transformer_blocks_0_attn_to_k.lokr_w1`. The module paths are diffusers' FLUX names;
ComfyUI's `comfy/lora.py` maps exactly `lycoris_<diffusers path with underscores>` for Flux models (beside
`transformer.<path>` and `lora_transformer_<path>`), so the same file is what ComfyUI loads.

Scale, as every reader of this layout computes it (LyCORIS `LokrModule`, ComfyUI `calculate_weight`): 1 when both
factors are full matrices (`alpha` is then ignored), otherwise alpha / dim with dim the low-rank factor's rank.
Writing: each layer's scale is folded into w1 (or w1_a) and `alpha` is written so that readers compute scale 1 (alpha
= dim for a low-rank factor; LyCORIS's own value, its rank, for full x full), so every reader rebuilds our exact update
— including LyCORIS's `merge_to`, which in lycoris-lora 4.1.3 applies a layer's scale twice (harmless at scale 1).
Reading: the factors are copied and w1 rescaled by (file scale / our scale), so the loaded adapter's update equals
the file's as LyCORIS's forward and ComfyUI apply it (scale once).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from train.adapters import ADAPTER_NAME, _tuner_layers

PREFIX = "lycoris_"
_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lycoris_name(module_name: str) -> str:
    return PREFIX + module_name.replace(".", "_")


def _lokr_layers(transformer: nn.Module, key: str) -> dict[str, nn.Module]:
    layers = {n: m for n, m in _tuner_layers(transformer)}
    if not layers or not all(hasattr(m, "lokr_w1") for m in layers.values()):
        raise ValueError(f"{key}: the LyCORIS layout holds LoKr adapters; this model's adapter is not LoKr")
    assert all(ADAPTER_NAME in m.scaling for m in layers.values())
    return layers


def _factors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {f: getattr(layer, f)[ADAPTER_NAME] for f in _FACTORS if ADAPTER_NAME in getattr(layer, f)}


def _reader_scale(factors: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The scale LyCORIS and ComfyUI apply to kron(w1, w2) for these factors and this `.alpha`."""
    if "lokr_w1" in factors and "lokr_w2" in factors:
        return 1.0
    dim = factors["lokr_w1_a"].shape[1] if "lokr_w1_a" in factors else factors["lokr_w2_a"].shape[1]
    return 1.0 if alpha is None else alpha / dim


@torch.no_grad()
def lokr_state_dict(transformer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter as LyCORIS-layout tensors whose update (as LyCORIS/ComfyUI compute it) equals ours."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(_lokr_layers(transformer, "--format").items()):
        factors = {k: v.detach().float().clone() for k, v in _factors(layer).items()}
        factors["lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"] *= float(layer.scaling[ADAPTER_NAME])
        if "lokr_w1" in factors and "lokr_w2" in factors:
            alpha = float(layer.r[ADAPTER_NAME])  # LyCORIS stores its rank here; readers ignore it (scale 1)
        else:
            alpha = float(factors["lokr_w1_a"].shape[1] if "lokr_w1_a" in factors else factors["lokr_w2_a"].shape[1])
        base = lycoris_name(name)
        for k, v in factors.items():
            out[f"{base}.{k}"] = v.to(dtype).contiguous()
        out[f"{base}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


@torch.no_grad()
def load_lycoris_lokr(transformer: nn.Module, path: str | Path, *, key: str = "model.adapter.init_from") -> int:
    """Copy a LyCORIS LoKr file into the injected peft LoKr layers so their updates equal the file's; returns how
    many layers were loaded. Raises ValueError naming `key` for a missing file, a layer this model does not adapt,
    a non-LoKr layer, or factor shapes that differ from this config's."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"{key}: '{path}' is not a .safetensors file")
    layers = _lokr_layers(transformer, key)
    by_key = {lycoris_name(n): n for n in layers}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        base, _, part = k.partition(".")
        grouped.setdefault(base, {})[part] = v
    unknown = sorted(b for b in grouped if b not in by_key)
    if unknown:
        raise ValueError(f"{key}: '{path}' has layer '{unknown[0]}' that this config does not adapt "
                         f"({len(unknown)} such; set model.adapter.target_modules / blocks / single_blocks to cover it)")
    for base, parts in sorted(grouped.items()):
        name = by_key[base]
        extra = sorted(set(parts) - set(_FACTORS) - {"alpha"})
        if extra:
            raise ValueError(f"{key}: '{base}' has '{extra[0]}', which is not a LoKr factor of a Linear "
                             f"(only LyCORIS LoKr files are read)")
        layer = layers[name]
        ours = _factors(layer)
        theirs = {k: parts[k] for k in _FACTORS if k in parts}
        shapes = {k: tuple(v.shape) for k, v in theirs.items()}
        if shapes != {k: tuple(v.shape) for k, v in ours.items()}:
            raise ValueError(
                f"{key}: '{base}' has factors {shapes}, this config builds "
                f"{ {k: tuple(v.shape) for k, v in ours.items()} } (match model.adapter.lokr_factor, "
                f"lokr_factor_pattern, rank and lokr_full_matrix to the file)"
            )
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        ratio = _reader_scale(theirs, alpha) / float(layer.scaling[ADAPTER_NAME])
        for k, v in theirs.items():
            v = v.float() * ratio if k in ("lokr_w1", "lokr_w1_a") else v.float()
            ours[k].copy_(v.to(ours[k].dtype))
    return len(grouped)
