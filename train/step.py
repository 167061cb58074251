"""The model-specific training step: encode, noise, mask, predict, flow-matching MSE, backward.

Kept as one function (torchtitan's `forward_backward_step`) so every objective detail is here and not threaded
through the loop as flags. Randomness comes only from the generator passed in, which the loop derives from
(seed, rank, step, micro-step) on the training device: a resumed run draws exactly the same noise as an
uninterrupted one.

No host syncs: the large draws (the latent posterior sample, the flow-matching noise) are made on the device by that
generator; the 2·B per-sample scalars that decide shapes or host-side work (caption dropout: which captions are
encoded and how long the batch's prompts are; the timestep's uniform, which the Beta sampler maps through scipy) come
from `host_generator`, a CPU generator with the same seed, and reach the device by a non-blocking copy. On CPU the
two are one generator, so the draws (and the losses) are exactly those of the single-generator step before it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from train import objective
from train.config import ObjectiveConfig
from train.flux import image_ids, normalise_latents, pack_latents, predict_velocity
from train.text import PromptEmbeds, TextEncoder


@dataclass
class Encoders:
    """The frozen encoders a step may need: the VAE and the text encoders (outside the transformer's FSDP), and the
    dtype and device the step computes in. Both None when the data is precomputed: the trainer then never loads them
    (train/build.py `encoders_for_sampling` loads them for sampling)."""

    vae: torch.nn.Module | None
    text: TextEncoder | None
    dtype: torch.dtype
    device: torch.device


def host_generator(generator: torch.Generator) -> torch.Generator:
    """The generator for the per-sample scalars the host needs: `generator` itself on CPU (one stream: every draw
    of a CPU run comes from the one seeded generator, in program order), else a CPU generator seeded like it (a CUDA
    generator's draws would have to be read back: a sync)."""
    if generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def _randn(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 drawn where `generator` lives (the device, in training), then placed on `device`."""
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(device)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8) normalised latents (FLUX's shift and scale; FLUX.2's BatchNorm)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype, non_blocking=True)).latent_dist
    noise = _randn(dist.mean.shape, generator, dist.mean.device)
    latents = dist.mean + dist.std * noise.to(dist.mean.dtype)
    return normalise_latents(vae, latents)  # the VAE's own normalisation (train.flux.LATENT_NORMS)


def batch_latents(encoders: Encoders, batch: dict, *, generator: torch.Generator) -> torch.Tensor:
    """(B, C, h, w) normalised latents: the VAE encodes `pixels`, or a precomputed batch (`dedistill data
    precompute`) holds the posterior's normalised mean/std and the sample is drawn here, as encode_images does."""
    if "latent_mean" not in batch:
        return encode_images(encoders.vae, batch["pixels"], generator=generator)
    # (B, C, h, w), already shifted and scaled; non_blocking: a host-to-device copy need not wait for the device
    mean = batch["latent_mean"].to(encoders.device, torch.float32, non_blocking=True)
    # Drawn even when no std is stored (--latents mean), so the generator advances exactly as on the raw path.
    noise = _randn(mean.shape, generator, mean.device)
    std = batch.get("latent_std")
    return mean if std is None else mean + std.to(mean.device, torch.float32, non_blocking=True) * noise


def _stored_prompts(stored: dict, cfg: ObjectiveConfig) -> tuple[PromptEmbeds, PromptEmbeds]:
    """The batch's precomputed T5/CLIP encodings and the dataset's stored empty prompt."""
    if not cfg.attention_mask:
        raise ValueError(
            "objective.attention_mask: precomputed T5 states are stored unpadded, which is exact only with the "
            "padding mask; set objective.attention_mask=true or train on raw shards"
        )
    if cfg.visible_padding_tokens:
        raise ValueError(
            "objective.visible_padding_tokens: precomputed T5 states are stored without padding states; set it to 0 "
            "or train on raw shards"
        )
    if stored.get("max_text_tokens") != cfg.max_text_tokens:
        raise ValueError(
            f"objective.max_text_tokens: {cfg.max_text_tokens}, but the dataset was precomputed with "
            f"--max-text-tokens {stored.get('max_text_tokens')}"
        )
    mask, empty_mask = stored["t5_mask"], stored["empty_mask"]  # on the host: the loader's collate built them
    enc = PromptEmbeds(stored["t5"], mask, stored["pooled"], PromptEmbeds.host_lengths(mask))  # (B, L_batch, D)
    empty = PromptEmbeds(stored["empty_t5"], empty_mask, stored["empty_pooled"], PromptEmbeds.host_lengths(empty_mask))
    return enc, empty


def prepare_prompts(
    encoders: Encoders,
    captions: list[str],
    cfg: ObjectiveConfig,
    *,
    generator: torch.Generator,
    stored: dict | None = None,
) -> tuple[PromptEmbeds, torch.Tensor]:
    """Encode captions (or take the `stored` precomputed ones); caption dropout swaps in the empty prompt (with its
    own mask); trim to the longest prompt (its visible padding tokens included). `generator` is a host generator:
    the dropout mask stays on the host, so the prompts' lengths (and the trim) are known without reading the device."""
    drop = objective.caption_dropout_mask(len(captions), cfg.caption_dropout, generator=generator)
    if stored is not None:
        enc, empty = _stored_prompts(stored, cfg)
        prompts = enc.where(drop, empty)
        if not cfg.trim_text:
            prompts = prompts.pad_to(cfg.max_text_tokens)  # as the raw path's padded encoding
    else:
        kept = [c for c, d in zip(captions, drop.tolist()) if not d] or [""]
        masked = cfg.attention_mask
        k = cfg.visible_padding_tokens
        enc = encoders.text.encode(kept, max_tokens=cfg.max_text_tokens, masked=masked, visible_padding=k)
        empty = encoders.text.empty(max_tokens=cfg.max_text_tokens, masked=masked, visible_padding=k)
        # Scatter the encoded captions back into batch order, empty prompt where dropped.
        order = torch.cumsum(~drop, 0) - 1
        prompts = enc.select(order.clamp(min=0)).where(drop, empty)
    if cfg.attention_mask and cfg.trim_text:
        prompts = prompts.trimmed()
    return prompts, drop


def empty_prompts(encoders: Encoders, cfg: ObjectiveConfig, n: int, *, stored: dict | None = None) -> PromptEmbeds:
    """The unconditional branch for n rows: the empty prompt caption dropout swaps in (encoded, or the dataset's
    stored one), so the student's CFG uses the same uncond it is trained and sampled with."""
    if stored is not None:
        empty = _stored_prompts(stored, cfg)[1]
    else:
        empty = encoders.text.empty(max_tokens=cfg.max_text_tokens, masked=cfg.attention_mask,
                                  visible_padding=cfg.visible_padding_tokens)
    return empty.select(torch.zeros(n, dtype=torch.long))


def forward_backward_step(
    transformer: torch.nn.Module,
    batch: dict,
    encoders: Encoders,
    cfg: ObjectiveConfig,
    *,
    generator: torch.Generator,
    loss_scale: float = 1.0,
    backward: bool = True,
    teacher: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor | int]:
    """One micro-batch: returns {"loss": scalar (detached), "t": (B,), "dropped": (B,), "image_tokens": int,
    "text_tokens": int} — the token counts per sample the transformer processed (text after trimming), for MFU.

    `objective.kind: teacher` needs `teacher` (train/teacher.py): the frozen guidance-distilled base at w, against
    the student's cond and uncond branches, which run as one forward of 2·B rows (same x_t, t and noise; the uncond
    half on the empty prompt), so FSDP gathers each block once for both and the backward goes through both.

    Backward always runs (when `backward`), even on a non-finite loss: under FSDP every rank must join the
    gradient reduce-scatter; the backend then sees a non-finite grad norm on all ranks and skips the update together
    (on the device: nothing here or there reads the loss on the host).
    """
    device, dtype = encoders.device, encoders.dtype
    host = host_generator(generator)  # `generator` itself on CPU: noise and scalars share one stream, in this order
    latents = batch_latents(encoders, batch, generator=generator)  # (B, C, h, w)
    b, _, h, w = latents.shape
    x0 = pack_latents(latents.float())  # (B, h/2*w/2, C*4)
    stored = batch if "t5" in batch else None  # precomputed text encodings (dedistill data precompute)
    prompts, dropped = prepare_prompts(encoders, list(batch["caption"]), cfg, generator=host, stored=stored)

    t = objective.sample_timesteps(cfg, b, generator=host, image_seq_len=x0.shape[1])  # (B,) on the host
    t = t.to(device, non_blocking=True)
    noise = _randn(x0.shape, generator, device)
    noise = objective.pair_noise(x0, noise, cfg.noise_pairing)  # minibatch OT; "none" = unchanged
    x_t = objective.interpolate(x0, noise, t)
    target = objective.velocity_target(x0, noise)
    ids = image_ids(h, w, device=device, dtype=dtype)

    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext()
    call = partial(predict_velocity, img_ids=ids, masked=cfg.attention_mask, attention=cfg.attention)
    if cfg.kind == "teacher":
        if teacher is None:
            raise ValueError("objective.kind: teacher needs the frozen teacher model (train.teacher.build_teacher)")
        w = objective.sample_guidance(cfg, b, generator=host).to(device, non_blocking=True)  # (B,)
        both = PromptEmbeds.cat([prompts, empty_prompts(encoders, cfg, b, stored=stored)])  # cond rows, then uncond
        if cfg.attention_mask and cfg.trim_text:
            both = both.trimmed()
        with autocast:
            v = call(transformer, torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), both.to(device, dtype))
            with torch.no_grad():
                v_teacher = call(teacher, x_t.to(dtype), t, prompts.to(device, dtype), guidance=w)
        v_cond, v_uncond = v.float().chunk(2)
        loss, _ = objective.teacher_loss(v_cond, v_uncond, v_teacher, w, t, weighting=cfg.loss_weighting,
                                         data_target=target, data_weight=cfg.teacher_data_weight)
    else:
        with autocast:
            pred = call(transformer, x_t.to(dtype), t, prompts.to(device, dtype))
        loss, _ = objective.flow_matching_loss(pred.float(), target, t, weighting=cfg.loss_weighting)
    if backward:
        (loss * loss_scale).backward()
    return {
        "loss": loss.detach(),
        "t": t.detach(),
        "dropped": dropped,
        "image_tokens": x0.shape[1],
        "text_tokens": prompts.t5.shape[1],
    }
