"""FLUX in Black Forest Labs' original key layout, the one ComfyUI / Forge load as a single file.

The exact inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py):
BFL fuses q/k/v (`double_blocks.N.img_attn.qkv`) and, in single blocks, q/k/v/mlp-in (`single_blocks.N.linear1`),
names RMSNorm weights `scale`, and orders the final modulation [shift, scale] where diffusers has [scale, shift].

LoRA in the kohya / sd-scripts layout (`lora_unet_<BFL module, dots as underscores>.lora_down.weight`, `.lora_up`,
`.alpha`) is the inverse of diffusers' `_convert_kohya_flux_lora_to_diffusers` (loaders/lora_conversion_utils.py).
A fused BFL module gets one LoRA whose down is the members' A stacked (R = n·r rows) and whose up is block-diagonal
(member j's B in its output rows and its r columns): up·down is exactly the members' B·A stacked, the update of the
fused weight, and diffusers' converter recognises the block-diagonal ("sparse") layout and splits it back exactly.
ComfyUI maps `lora_unet_` + a BFL key (comfy/lora.py `model_lora_keys_unet`; read there, not run here).

One table, per block kind, says which diffusers modules make up each BFL module; weights and LoRA both use it.
"""

from __future__ import annotations

import torch

# (BFL module, diffusers modules concatenated along the output dim, in this order)
GLOBAL_LINEARS = (
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),  # FLUX.1-dev only
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("txt_in", ("context_embedder",)),
    ("img_in", ("x_embedder",)),
    ("final_layer.linear", ("proj_out",)),
)
DOUBLE_LINEARS = (
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
SINGLE_LINEARS = (
    ("modulation.lin", ("norm.linear",)),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
)
SINGLE_NORMS = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # [scale, shift] -> [shift, scale]

_BLOCKS = (("double_blocks", "transformer_blocks", DOUBLE_LINEARS, DOUBLE_NORMS),
           ("single_blocks", "single_transformer_blocks", SINGLE_LINEARS, SINGLE_NORMS))


def _block_count(state, prefix: str) -> int:
    idx = {int(k.split(".")[1]) for k in state if k.startswith(prefix + ".")}
    return max(idx) + 1 if idx else 0


def linear_groups(state_or_names) -> list[tuple[str, tuple[str, ...]]]:
    """Every (BFL module, diffusers modules) Linear group of a transformer, given its diffusers keys/names."""
    keys = list(state_or_names)
    groups = [(b, d) for b, d in GLOBAL_LINEARS if any(k == d[0] or k.startswith(d[0] + ".") for k in keys)]
    for bfl, ours, linears, _ in _BLOCKS:
        for i in range(_block_count(keys, ours)):
            groups += [(f"{bfl}.{i}.{b}", tuple(f"{ours}.{i}.{m}" for m in d)) for b, d in linears]
    return groups


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in BFL's layout. Raises ValueError if a key is left over
    (a model this table does not describe) rather than silently dropping weights."""
    left = dict(state)
    out: dict[str, torch.Tensor] = {}
    for bfl, members in linear_groups(state):
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = torch.cat([left.pop(f"{m}.{p}") for m in members], dim=0)
    for bfl, ours, _, norms in _BLOCKS:
        for i in range(_block_count(state, ours)):
            for b, d in norms:
                out[f"{bfl}.{i}.{b}"] = left.pop(f"{ours}.{i}.{d}")
    bfl, ours = FINAL_MODULATION
    for p in ("weight", "bias"):
        out[f"{bfl}.{p}"] = _swap_halves(left.pop(f"{ours}.{p}"))
    if left:
        raise ValueError(f"--format bfl: no BFL key for {sorted(left)[:3]} (not a FLUX.1 transformer?)")
    return {k: v.contiguous() for k, v in out.items()}


def kohya_name(bfl_module: str) -> str:
    return "lora_unet_" + bfl_module.replace(".", "_")


def to_kohya_lora(lora: dict[str, torch.Tensor], scales: dict[str, float], out_features: dict[str, int]
                  ) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors (`<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r)) with each module's
    scale (alpha / r) -> the kohya layout. `out_features`: every adaptable module's output size (a fused module's
    members without a LoRA get zero blocks, which add nothing)."""
    adapted = {k.rsplit(".lora_", 1)[0] for k in lora}
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for bfl, members in linear_groups(out_features):
        present = [m for m in members if m in adapted]
        if not present:
            continue
        ranks = {lora[f"{m}.lora_A.weight"].shape[0] for m in present}
        group_scales = {scales[m] for m in present}
        if len(ranks) > 1 or len(group_scales) > 1:
            raise ValueError(f"--lora-layout kohya: {bfl} fuses {list(members)}, which have different LoRA ranks or "
                             "alphas; kohya's fused layout has one alpha per module")
        (r,), (scale,) = ranks, group_scales
        a_ref = lora[f"{present[0]}.lora_A.weight"]
        down, ups = [], []
        for m in members:
            if m in adapted:
                down.append(lora[f"{m}.lora_A.weight"])
                ups.append(lora[f"{m}.lora_B.weight"])
            else:
                down.append(torch.zeros_like(a_ref))
                ups.append(a_ref.new_zeros(out_features[m], r))
        rank = r * len(members)
        up = a_ref.new_zeros(sum(u.shape[0] for u in ups), rank)  # block-diagonal: member j -> rows_j x cols_j
        row = 0
        for j, u in enumerate(ups):
            up[row : row + u.shape[0], j * r : (j + 1) * r] = u
            row += u.shape[0]
        name = kohya_name(bfl)
        out[f"{name}.lora_down.weight"] = torch.cat(down, dim=0).contiguous()
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)  # alpha / rank == scale
        done.update(present)
    missing = adapted - done
    if missing:
        raise ValueError(f"--lora-layout kohya: no BFL module for {sorted(missing)[:3]}")
    return out
