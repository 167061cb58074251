"""Real classifier-free guidance sampling: v = v_uncond + s·(v_cond − v_uncond), Euler over a FLUX sigma schedule.

Cond and uncond run as one batch through `train.flux.predict_velocity` with the same bool T5 mask the trainer uses.
The schedule is the model's (`SamplingSettings.schedule`, resolved by `train.inference.sampling_schedule`): FLUX.1-dev's
dynamic shift for a de-distilled model, schnell's own (no shift) for schnell. The schnell baseline is
`cfg_scale=1, steps=4` on schnell's schedule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.flux import image_ids, normalise_latents, pack_latents, predict_velocity, unpack_latents
from train.inference import sampling_schedule
from train.model import vae_scale_factor
from train.objective import sampling_sigmas
from train.run_dir import RunDir
from train.sampling import SamplingSettings, run_sampling_settings
from train.text import PromptEmbeds, TextEncoder


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-image noise from its own seed, so an image does not depend on the batch it was drawn in."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def batch_noise(n: int, shape: tuple[int, ...], first_seed: int, temperature: float = 1.0) -> torch.Tensor:
    """(n, *shape) noise, image j from seed first_seed + j (`initial_noise`), times the sampling noise temperature."""
    return torch.cat([initial_noise((1, *shape), first_seed + j) for j in range(n)]) * temperature


def _guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    v = v_uncond + scale * (v_cond - v_uncond)
    if rescale > 0:
        dims = tuple(range(1, v.ndim))
        factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
        v = rescale * (v * factor) + (1 - rescale) * v
    return v


@torch.no_grad()
def denoise(
    transformer,
    noise: torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    s: SamplingSettings,
    *,
    latent_hw: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed noise (B, N, C*4) -> packed clean latents, Euler over the shifted schedule."""
    device = noise.device
    h, w = latent_hw
    ids = image_ids(h, w, device=device, dtype=dtype)
    sigmas = sampling_sigmas(s.steps, image_seq_len=noise.shape[1], schedule=s.schedule).to(device)
    guided = uncond is not None and s.cfg_scale != 1.0
    both = PromptEmbeds.cat([cond, uncond]) if guided else cond
    if s.masked:
        both = both.trimmed()  # exact under the mask; makes the image independent of max_text_tokens
    both = both.to(device, dtype)
    cond_only = both.select(torch.arange(len(cond))) if guided else both
    x = noise
    for i in range(s.steps):
        t = sigmas[i].expand(x.shape[0])
        use_cfg = guided and i >= s.cfg_skip_steps
        if use_cfg:
            v = predict_velocity(transformer, torch.cat([x, x]).to(dtype), torch.cat([t, t]), both, ids, masked=s.masked)
            v_cond, v_uncond = v.float().chunk(2)
            v = _guide(v_cond, v_uncond, s.cfg_scale, s.cfg_rescale)
        else:
            v = predict_velocity(transformer, x.to(dtype), t, cond_only, ids, masked=s.masked).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@torch.no_grad()
def decode(vae, packed: torch.Tensor, latent_hw: tuple[int, int]) -> list[Image.Image]:
    h, w = latent_hw
    latents = normalise_latents(vae, unpack_latents(packed, h, w), inverse=True)
    images = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def generate(
    transformer, vae, text: TextEncoder, prompts: list[str], s: SamplingSettings, *, dtype: torch.dtype
) -> list[Image.Image]:
    """One image per prompt; image i uses seed s.seed + i."""
    device = vae.device  # the transformer's device; the text encoders may sit on the CPU (text_encoder_placement)
    f = vae_scale_factor(vae)
    if s.resolution % (f * 2):
        raise ValueError(f"resolution: must be a multiple of {f * 2}, got {s.resolution}")
    h = w = s.resolution // f
    channels = vae.config.latent_channels
    images: list[Image.Image] = []
    for start in range(0, len(prompts), s.batch_size):
        chunk = prompts[start : start + s.batch_size]
        noise = batch_noise(len(chunk), (channels, h, w), s.seed + start, s.noise_temperature)
        enc = {"max_tokens": s.max_text_tokens, "masked": s.masked, "visible_padding": s.visible_padding_tokens}
        cond = text.encode(chunk, **enc)
        uncond = None
        if s.cfg_scale != 1.0:
            uncond = text.encode([s.negative_prompt] * len(chunk), **enc)
        packed = denoise(
            transformer, pack_latents(noise).to(device), cond, uncond, s, latent_hw=(h, w), dtype=dtype
        )
        images += decode(vae, packed, (h, w))
    return images


def make_grid(rows: list[list[Image.Image]], *, pad: int = 2) -> Image.Image:
    """rows[i][j] -> one image, rows top to bottom."""
    h, w = rows[0][0].height, rows[0][0].width
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (n_cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def cfg_grid(transformer, vae, text, prompts: list[str], scales: list[float], base: SamplingSettings, *, dtype):
    """Rows = prompts, columns = CFG scales (same seeds across columns, so only guidance differs)."""
    cols = []
    for scale in scales:
        s = base.with_cfg(scale)
        cols.append(generate(transformer, vae, text, prompts, s, dtype=dtype))
    return make_grid([[cols[j][i] for j in range(len(scales))] for i in range(len(prompts))])


def sample_grid_for_run(transformer, frozen, cfg, *, step: int, logger, is_main: bool) -> Path | None:
    """The end-of-training grid: every rank runs the sharded transformer, rank 0 writes the PNG."""
    sc = cfg.sample
    base = run_sampling_settings(cfg, schedule=sampling_schedule(cfg.model.path, cfg))
    was_training = transformer.training
    transformer.eval()
    grid = cfg_grid(transformer, frozen.vae, frozen.text, sc.prompts, sc.cfg_scales, base, dtype=frozen.dtype)
    transformer.train(was_training)
    if not is_main:
        return None
    out = RunDir(cfg.run_dir).grid(step)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    logger.image("samples/cfg_grid", grid, step)
    print(f"[dedistill] CFG grid (rows: prompts, columns: cfg {sc.cfg_scales}): {out}", flush=True)
    return out


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))
