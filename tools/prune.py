"""FLUX -> Chroma: drop FLUX's per-block AdaLN modulation Linears and its time/pooled-text
embedders, and distil what they computed into Chroma's approximator (`distilled_guidance_layer`).

FLUX modulates every block with `Linear_k(silu(temb))`, temb = timestep_embedder(t) + text_embedder(CLIP pooled):
344 vectors of width 3072 at FLUX.1 size (3 per single block, 6 + 6 per double block, 2 for the final norm), 3.3B
parameters that run once per sample. Chroma (lodestone-rock/flow; diffusers' `ChromaTransformer2DModel`) emits the
same 344 vectors from one MLP fed, per vector index i, with [16 timestep | 16 guidance | 32 index] sinusoidal
features (`time_text_embed`: t*1000, guidance fed as 0, i*1000), and has no pooled-CLIP input at all.

The approximator is fitted to the modulation *averaged over a caption set's pooled embeddings*, not to one sampled
per step: it sees only t, and the mean is the function of t with the least squared error over those captions (a
sampled target has the same minimiser, reached through noisier gradients). Because each modulation is affine in
silu(temb), the mean needs no pass over the captions per Linear: E_p[W silu(T(t) + P(p)) + b] =
W E_p[silu(T(t) + P(p))] + b, so one (B, D) mean activation per batch of timesteps feeds every Linear once.

The model file stays architecture only: this module maps weights and fits; tools/prune_pipeline.py reads and writes files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_chroma import (
    ChromaApproximator,
    ChromaCombinedTimestepTextProjEmbeddings,
)
from torch import nn

from train.model import build_transformer_meta

APPROXIMATOR_CHANNELS = 64
"""Chroma's approximator input: 16 timestep + 16 guidance + 32 modulation-index features (`approximator_in_dim`)."""
APPROXIMATOR_LAYERS = 5
APPROXIMATOR_HIDDEN_RATIO = 5 / 3
"""Chroma's hidden width 5120 over FLUX.1's 3072: kept as a ratio so a tiny FLUX gets a proportionally tiny MLP."""

# What FLUX has and Chroma does not: the per-sample conditioning path. Anything else must map one to one.
DROPPED = re.compile(
    r"^(time_text_embed\."
    r"|transformer_blocks\.\d+\.norm1(_context)?\.linear\."
    r"|single_transformer_blocks\.\d+\.norm\.linear\."
    r"|norm_out\.linear\.)"
)
NEW = re.compile(r"^distilled_guidance_layer\.")


def chroma_config(flux_config: dict, *, approximator_hidden: int | None = None) -> dict:
    """ChromaTransformer2DModel's config for a FluxTransformer2DModel config: the same blocks and widths. A
    guidance-distilled FLUX (FLUX.1-dev class) prunes like schnell: its guidance embedder is conditioning path too
    (`time_text_embed.`, DROPPED), and `dedistill prune` loads it bypassed (train/model.py), i.e. schnell-shaped."""
    inner = flux_config["num_attention_heads"] * flux_config["attention_head_dim"]
    hidden = approximator_hidden or round(inner * APPROXIMATOR_HIDDEN_RATIO)
    if hidden < 1:
        raise ValueError(f"--approximator-hidden: must be positive, got {hidden}")
    return dict(
        patch_size=flux_config["patch_size"],
        in_channels=flux_config["in_channels"],
        out_channels=flux_config.get("out_channels"),
        num_layers=flux_config["num_layers"],
        num_single_layers=flux_config["num_single_layers"],
        attention_head_dim=flux_config["attention_head_dim"],
        num_attention_heads=flux_config["num_attention_heads"],
        joint_attention_dim=flux_config["joint_attention_dim"],
        axes_dims_rope=list(flux_config["axes_dims_rope"]),
        approximator_num_channels=APPROXIMATOR_CHANNELS,
        approximator_hidden_dim=hidden,
        approximator_layers=APPROXIMATOR_LAYERS,
    )


def modulation_count(config: dict) -> int:
    """Vectors the approximator emits: 3 per single block, 6 + 6 per double block, 2 for the final norm (344)."""
    return 3 * config["num_single_layers"] + 12 * config["num_layers"] + 2


def build_chroma_meta(config: dict):
    with torch.device("meta"):
        return ChromaTransformer2DModel.from_config(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def transfer_state(flux_state: dict[str, torch.Tensor], chroma: nn.Module) -> tuple[dict, list[str]]:
    """(Chroma state dict taken from FLUX's tensors, the FLUX names dropped). Every Chroma weight except the
    approximator must come from a FLUX weight of the same name and shape, and every FLUX weight left over must be
    conditioning path (DROPPED): a weight that would otherwise vanish unnoticed stops the prune."""
    out, missing = {}, []
    for name, param in chroma.state_dict().items():
        if NEW.match(name):
            continue
        src = flux_state.get(name)
        if src is None or tuple(src.shape) != tuple(param.shape):
            missing.append(name)
            continue
        out[name] = src
    if missing:
        raise ValueError(f"--model: the FLUX weights do not fill the Chroma transformer (e.g. {missing[:3]})")
    dropped = sorted(k for k in flux_state if k not in out)
    unknown = [k for k in dropped if not DROPPED.match(k)]
    if unknown:
        raise ValueError(f"--model: FLUX weights with no place in Chroma: {unknown[:3]}")
    return out, dropped


def prune_transformer(flux: nn.Module, *, approximator_hidden: int | None = None, seed: int = 0):
    """Chroma transformer (on the CPU) whose blocks, embedders and projections are FLUX's tensors, and whose
    approximator is freshly initialised from `seed`. Returns (chroma, dropped FLUX names)."""
    config = chroma_config(dict(flux.config), approximator_hidden=approximator_hidden)
    chroma = build_chroma_meta(config)
    state, dropped = transfer_state(flux.state_dict(), chroma)
    chroma.load_state_dict(state, strict=False, assign=True)
    inner = chroma.inner_dim
    # Built for real, not on meta: the approximator needs an init, and time_text_embed's index features are a
    # non-persistent buffer computed in __init__ (on meta it would hold nothing).
    chroma.time_text_embed = ChromaCombinedTimestepTextProjEmbeddings(
        num_channels=APPROXIMATOR_CHANNELS // 4, out_dim=modulation_count(config)
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        chroma.distilled_guidance_layer = ChromaApproximator(
            in_dim=APPROXIMATOR_CHANNELS, out_dim=inner, hidden_dim=config["approximator_hidden_dim"],
            n_layers=APPROXIMATOR_LAYERS,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    left = [n for n, t in [*chroma.named_parameters(), *chroma.named_buffers()] if t.is_meta]
    assert not left, f"left on meta: {left[:3]}"
    dtype = next(iter(state.values())).dtype
    chroma.time_text_embed.to(dtype)
    chroma.distilled_guidance_layer.to(dtype)
    return chroma, dropped


# ------------------------------------------------------------------------------------------- FLUX's modulation


def modulation_table(flux: nn.Module, act: torch.Tensor) -> torch.Tensor:
    """(B, D) silu(temb) -> (B, M, D) FLUX's modulation vectors in Chroma's index order (lodestone-rock/flow's
    `distribute_modulations`, diffusers' ChromaTransformer2DModel.forward): single blocks' (shift, scale, gate),
    then every double block's image six, then every double block's text six, then the final (shift, scale)."""
    b, d = act.shape
    parts = [blk.norm.linear(act).view(b, 3, d) for blk in flux.single_transformer_blocks]
    parts += [blk.norm1.linear(act).view(b, 6, d) for blk in flux.transformer_blocks]
    parts += [blk.norm1_context.linear(act).view(b, 6, d) for blk in flux.transformer_blocks]
    scale, shift = flux.norm_out.linear(act).view(b, 2, d).unbind(1)  # diffusers' AdaLayerNormContinuous: scale first
    parts.append(torch.stack([shift, scale], dim=1))  # Chroma's final layer reads (shift, scale)
    return torch.cat(parts, dim=1)


def time_embedding(flux: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, D) FLUX's timestep embedding (it scales t by 1000, as its forward does)."""
    emb = flux.time_text_embed
    proj = emb.time_proj(t * 1000)
    return emb.timestep_embedder(proj.to(t.dtype))


def text_embedding(flux: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(N, D_clip) CLIP pooled -> (N, D) FLUX's pooled-text embedding."""
    return flux.time_text_embed.text_embedder(pooled)


class ModulationTarget(nn.Module):
    """FLUX's conditioning path alone (its embedders and modulation Linears, the 3.3B parameters Chroma drops), with
    a caption set's pooled-text embeddings: `mean(t)` is the regression target, `for_captions(t, rows)` a caption's
    own modulation."""

    def __init__(self, flux: nn.Module, pooled: torch.Tensor, *, chunk: int = 256):
        super().__init__()
        self.time_text_embed = flux.time_text_embed
        self.single_transformer_blocks = nn.ModuleList(_Single(b) for b in flux.single_transformer_blocks)
        self.transformer_blocks = nn.ModuleList(_Double(b) for b in flux.transformer_blocks)
        self.norm_out = flux.norm_out
        with torch.no_grad():
            self.register_buffer("text", text_embedding(flux, pooled.to(next(flux.parameters()).dtype)))  # (N, D)
        self.chunk = chunk

    @torch.no_grad()
    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D_clip) CLIP pooled -> (N, D), as `for_captions` takes them."""
        return text_embedding(self, pooled.to(self.text.dtype))

    @torch.no_grad()
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, M, D): the modulation averaged over the caption set."""
        time = time_embedding(self, t.to(self.text.dtype))  # (B, D)
        act = torch.zeros_like(time)
        for start in range(0, self.text.shape[0], self.chunk):  # (B, chunk, D) at a time: bounded memory
            act += nn.functional.silu(time[:, None] + self.text[None, start : start + self.chunk]).sum(1)
        return modulation_table(self, act / self.text.shape[0])

    @torch.no_grad()
    def for_captions(self, t: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps and (B, D) pooled-text embeddings, paired -> (B, M, D)."""
        time = time_embedding(self, t.to(self.text.dtype))
        return modulation_table(self, nn.functional.silu(time + pooled_text))


class _Single(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.norm = block.norm


class _Double(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.norm1, self.norm1_context = block.norm1, block.norm1_context


# ------------------------------------------------------------------------------------------------------ fitting


@dataclass(kw_only=True)
class FitSettings:
    steps: int = 2000
    batch_size: int = 16
    """Timesteps per step; each carries all M modulation indices."""
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}: must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"--lr: must be positive, got {self.lr}")


def approximator_output(chroma: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, M, D) Chroma's modulation vectors, fed exactly as its forward feeds them."""
    return chroma.distilled_guidance_layer(chroma.time_text_embed(t * 1000))


def fit_approximator(chroma: nn.Module, target: ModulationTarget, s: FitSettings, *, log=None) -> list[float]:
    """AdamW on the MSE between the approximator and the caption-averaged modulation, t ~ U[0, 1] drawn from a
    seeded generator; warmup then cosine to 0. Trains `chroma.distilled_guidance_layer` in place (fp32 expected)."""
    layer = chroma.distilled_guidance_layer.train().requires_grad_(True)
    device = next(layer.parameters()).device
    opt = torch.optim.AdamW(layer.parameters(), lr=s.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(s.seed)
    losses = []
    for step in range(s.steps):
        t = torch.rand(s.batch_size, generator=gen).to(device)
        goal = target.mean(t).float()
        loss = nn.functional.mse_loss(approximator_output(chroma, t).float(), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, s.steps // 10) == 0:
            log(f"[prune] approximator step {step + 1}/{s.steps}  mse {loss.item():.3e}")
    layer.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def approximator_error(chroma: nn.Module, target: ModulationTarget, t: torch.Tensor,
                       held_out_text: torch.Tensor) -> dict:
    """On timesteps the fit never drew: the approximator against the caption mean (its regression error), and the
    held-out captions' own modulation against that mean (the spread no function of t alone can remove)."""
    goal = target.mean(t).float()
    pred = approximator_output(chroma, t).float()
    rms = goal.pow(2).mean().sqrt().item()
    rmse = (pred - goal).pow(2).mean().sqrt().item()
    spread = []
    for row in held_out_text:
        own = target.for_captions(t, row.expand(t.shape[0], -1)).float()
        spread.append((own - goal).pow(2).mean().item())
    spread_rmse = math.sqrt(sum(spread) / len(spread))
    return dict(rmse=rmse, target_rms=rms, rel_error=rmse / rms, caption_spread_rmse=spread_rmse,
                caption_spread_rel=spread_rmse / rms, timesteps=len(t))


# ----------------------------------------------------------------------------------------------- velocity check


def chroma_velocity(chroma: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t5: torch.Tensor,
                    img_ids: torch.Tensor) -> torch.Tensor:
    """v(x_t, t | T5 states) of the Chroma transformer, for a prompt batch with no padding left (no mask needed)."""
    txt_ids = torch.zeros(t5.shape[1], 3, device=x_t.device, dtype=img_ids.dtype)
    return chroma(hidden_states=x_t, encoder_hidden_states=t5.to(x_t.dtype), timestep=t.to(x_t.dtype),
                  img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


class ForcedModulation:
    """Context manager: Chroma's approximator output replaced by a given (B, M, D) table (a forward hook), to run
    Chroma with FLUX's exact modulation (the weight-transfer check) or with the exact caption mean."""

    def __init__(self, chroma: nn.Module, table: torch.Tensor):
        self.layer, self.table, self.handle = chroma.distilled_guidance_layer, table, None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(lambda m, i, o: self.table.to(o.dtype))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def parameter_counts(flux_config: dict, *, approximator_hidden: int | None = None) -> dict:
    """Parameters of FLUX and of its pruned Chroma, both built on the meta device (nothing allocated)."""
    flux = build_transformer_meta(flux_config)
    chroma = build_chroma_meta(chroma_config(flux_config, approximator_hidden=approximator_hidden))
    approximator = parameter_count(chroma.distilled_guidance_layer)
    dropped = sum(p.numel() for n, p in flux.named_parameters() if DROPPED.match(n))
    return dict(flux=parameter_count(flux), chroma=parameter_count(chroma), approximator=approximator,
                dropped=dropped)
