"""The toy distilled models: "schnell" (reflow of a CFG teacher into a few-step, guidance-free student) and "dev"
(guided distillation of the same teacher into a student that takes the CFG scale as an input).

Toy "schnell":

Rectified-flow reflow on teacher-CFG couplings (Liu et al. 2022, "Flow Straight and Fast"; the CFG-baked variant is
what InstaFlow does for SD): the teacher maps noise ε to a sample x0 with real CFG over many steps; the student
(initialised from the teacher) is trained with flow matching on the *straight line* between that fixed pair,
x_t = (1-t)·x0 + t·ε, target v = ε - x0, conditional prompt only. Straight couplings make few Euler steps exact, and
the CFG direction is baked into the conditional branch; the unconditional branch is never trained, so real CFG on
the student extrapolates from a stale uncond toward an already-guided cond — the situation FLUX.1-schnell is in.

Why reflow rather than adversarial (schnell's LADD) or consistency distillation: it needs no discriminator and no
extra network, its loss is the same flow-matching MSE through the same `predict_velocity`, and at this scale it
converges in minutes.

Toy "dev": Meng et al.'s guided distillation (arXiv 2210.03142, stage 1), what FLUX.1-dev is to BFL's undistilled
model. The student is the teacher plus a guidance embedder (`guidance_embeds: true`, FluxPipeline's `guidance_scale`
input), trained so that v_S(x_t, t, c, w) = v_T(x_t, t, ∅) + w·(v_T(x_t, t, c) − v_T(x_t, t, ∅)) on noised *data*
latents, w ~ U(lo, hi), conditional prompts only. It still samples over many steps (it is not timestep-distilled);
CFG reaches it through its input, and its unconditional branch is never trained.
"""

from __future__ import annotations

import copy

import torch
from diffusers import FluxTransformer2DModel

from evals.sampler import SamplingSettings, batch_noise, denoise
from train.flux import image_ids, pack_latents, predict_velocity
from train.objective import DEV_SCHEDULE, cfg_combine, interpolate, sampling_sigmas
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
        noise = pack_latents(batch_noise(len(chunk), (channels, h, w), seed + start)).to(text.device)
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
        _optimise(student, opt, torch.nn.functional.mse_loss(pred, eps - x1), history, step=step,
                  train_steps=train_steps, what="reflow", log=log)
    return student.eval().requires_grad_(False), history


def _optimise(model, opt, loss: torch.Tensor, history: list[float], *, step: int, train_steps: int, what: str,
              log) -> None:
    """One AdamW step with the gradient norm clipped at 1; logs the mean of the last 20 losses five times a run."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    history.append(loss.item())
    if (step + 1) % max(1, train_steps // 5) == 0:
        log(f"[proof] {what} step {step + 1}/{train_steps} loss {sum(history[-20:]) / len(history[-20:]):.4f}")


def with_guidance_embedder(teacher) -> FluxTransformer2DModel:
    """The teacher with a guidance embedder added (`guidance_embeds: true`, FLUX.1-dev's shape). The embedder's
    output layer starts at zero, so before training the student computes exactly what the teacher does."""
    student = FluxTransformer2DModel.from_config({**teacher.config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or not all(k.startswith("time_text_embed.guidance_embedder.") for k in missing):
        raise RuntimeError(f"guidance embedder: unexpected state-dict difference {missing + unexpected}")
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.bias)
    return student


def guidance_distill(teacher, text: TextEncoder, prompts: list[str], x0: torch.Tensor, *, latent_hw: tuple[int, int],
                     guidance: tuple[float, float], train_steps: int, batch_size: int, lr: float, seed: int,
                     max_text_tokens: int, log=print):
    """Toy "dev": the teacher + a guidance embedder, trained to output the teacher's real-CFG velocity at the scale
    it is fed. `x0` (N, tokens, C*4): packed, normalised data latents of `prompts`. t ~ U(0, 1) and fresh noise
    each step. Returns (student, loss history)."""
    student = with_guidance_embedder(teacher).to(x0.device).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    ids = image_ids(h, w, device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        embeds = text.encode(prompts, max_tokens=max_text_tokens)
        empty = text.encode([""] * batch_size, max_tokens=max_text_tokens).trimmed()
    lo, hi = guidance
    history = []
    for step in range(train_steps):
        idx = torch.randint(len(x0), (batch_size,), generator=g)
        t = torch.rand(batch_size, generator=g).to(x0.device)
        scale = (lo + (hi - lo) * torch.rand(batch_size, generator=g)).to(x0.device)
        x1 = x0[idx.to(x0.device)]
        x_t = interpolate(x1, torch.randn(x1.shape, generator=g).to(x0.device), t)
        prompt = embeds.select(idx).trimmed()
        with torch.no_grad():  # the teacher's real CFG at each sample's scale: what dev's embedder is taught
            target = cfg_combine(predict_velocity(teacher, x_t, t, prompt, ids).float(),
                                 predict_velocity(teacher, x_t, t, empty, ids).float(), scale)
        pred = predict_velocity(student, x_t, t, prompt, ids, guidance=scale).float()
        _optimise(student, opt, torch.nn.functional.mse_loss(pred, target), history, step=step,
                  train_steps=train_steps, what="guidance distillation", log=log)
    return student.eval().requires_grad_(False), history
