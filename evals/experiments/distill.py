"""Toy "schnell": reflow distillation of a CFG teacher into a few-step, guidance-free student.

Rectified-flow reflow on teacher-CFG couplings (Liu et al. 2022, "Flow Straight and Fast"; the CFG-baked variant is
what InstaFlow does for SD): the teacher maps noise ε to a sample x0 with real CFG over many steps; the student
(initialised from the teacher) is trained with flow matching on the *straight line* between that fixed pair,
x_t = (1-t)·x0 + t·ε, target v = ε - x0, conditional prompt only. Straight couplings make few Euler steps exact, and
the CFG direction is baked into the conditional branch; the unconditional branch is never trained, so real CFG on
the student extrapolates from a stale uncond toward an already-guided cond — the situation FLUX.1-schnell is in.

Why reflow rather than adversarial (schnell's LADD) or consistency distillation: it needs no discriminator and no
extra network, its loss is the same flow-matching MSE through the same `predict_velocity`, and at this scale it
converges in minutes.
"""

from __future__ import annotations

import copy

import torch

from evals.sampler import SamplingSettings, denoise, initial_noise
from train.flux import image_ids, pack_latents, predict_velocity
from train.objective import DEV_SCHEDULE, sampling_sigmas
from train.text import TextEncoder


@torch.no_grad()
def teacher_pairs(teacher, text: TextEncoder, prompts: list[str], *, latent_hw: tuple[int, int], channels: int,
                  cfg_scale: float, steps: int, seed: int, max_text_tokens: int, batch_size: int = 128):
    """(noise, teacher CFG sample), both packed (N, tokens, C*4): the couplings the student is straightened on."""
    h, w = latent_hw
    s = SamplingSettings(steps=steps, cfg_scale=cfg_scale, seed=seed, max_text_tokens=max_text_tokens,
                        resolution=16)  # resolution unused by denoise
    noises, samples = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = pack_latents(torch.cat([initial_noise((1, channels, h, w), seed + start + j)
                                        for j in range(len(chunk))])).to(text.device)
        cond = text.encode(chunk, max_tokens=max_text_tokens)
        uncond = text.encode([""] * len(chunk), max_tokens=max_text_tokens)
        x0 = denoise(teacher, noise, cond, uncond, s, latent_hw=latent_hw, dtype=torch.float32)
        noises.append(noise)
        samples.append(x0)
    return torch.cat(noises).float(), torch.cat(samples).float()


def reflow(teacher, text: TextEncoder, prompts: list[str], noise: torch.Tensor, x0: torch.Tensor, *,
           latent_hw: tuple[int, int], student_steps: int, train_steps: int, batch_size: int, lr: float, seed: int,
           max_text_tokens: int, log=print):
    """Student = copy of teacher, trained on the straight lines noise -> x0. Returns (student, loss history).

    Half of each batch takes t on the student's own few-step grid (where it will be queried), half t ~ U(0, 1).
    """
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    ids = image_ids(h, w, device=x0.device, dtype=torch.float32)
    # (student_steps,): the t values it will see (the proof samples every model on dev's schedule)
    grid = sampling_sigmas(student_steps, image_seq_len=x0.shape[1], schedule=DEV_SCHEDULE)[:-1]
    with torch.no_grad():
        embeds = text.encode(prompts, max_tokens=max_text_tokens)
    history = []
    for step in range(train_steps):
        idx = torch.randint(len(x0), (batch_size,), generator=g)
        on_grid = grid[torch.randint(len(grid), (batch_size,), generator=g)]
        t = torch.where(torch.rand(batch_size, generator=g) < 0.5, on_grid, torch.rand(batch_size, generator=g))
        t = t.to(x0.device)
        idx = idx.to(x0.device)
        eps, x1 = noise[idx], x0[idx]
        x_t = (1 - t[:, None, None]) * x1 + t[:, None, None] * eps  # (B, N, C*4)
        prompt = embeds.select(idx).trimmed()
        pred = predict_velocity(student, x_t, t, prompt, ids, masked=True).float()  # fp32 here (the toy's dtype)
        loss = torch.nn.functional.mse_loss(pred, eps - x1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if (step + 1) % max(1, train_steps // 5) == 0:
            log(f"[proof] reflow step {step + 1}/{train_steps} loss {sum(history[-20:]) / len(history[-20:]):.4f}")
    return student.eval().requires_grad_(False), history

