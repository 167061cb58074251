"""The toy "dev" (evals/experiments/distill.py): the teacher plus a guidance embedder, distilled to output the
teacher's real-CFG velocity at the scale it is fed, as FLUX.1-dev was from BFL's undistilled model."""

from __future__ import annotations

import torch

from evals.experiments.distill import guidance_distill, with_guidance_embedder
from train.flux import image_ids, pack_latents, predict_velocity
from train.inference import load_for_inference
from train.objective import interpolate

PROMPTS = ["a red circle", "a small blue square at the top left", "a green star on a white background", "a cross"]


def _setup(tiny_model_dir):
    m = load_for_inference(tiny_model_dir, device=torch.device("cpu"), dtype="fp32")
    ch = m.transformer.config.in_channels // 4
    x0 = pack_latents(torch.randn(len(PROMPTS), ch, 4, 4, generator=torch.Generator().manual_seed(1)))
    return m, x0, image_ids(4, 4, device="cpu", dtype=torch.float32)


@torch.no_grad()
def test_the_added_embedder_starts_silent(tiny_model_dir):
    """Before training the student computes what the teacher does, at every scale: only its embedder is new."""
    m, x0, ids = _setup(tiny_model_dir)
    student = with_guidance_embedder(m.transformer)
    assert student.config.guidance_embeds and not m.transformer.config.guidance_embeds
    prompt, t = m.text.encode(PROMPTS, max_tokens=16), torch.full((len(PROMPTS),), 0.6)
    want = predict_velocity(m.transformer, x0, t, prompt, ids)
    for w in (1.0, 4.0):
        got = predict_velocity(student, x0, t, prompt, ids, guidance=torch.full((len(PROMPTS),), w))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_loss_is_the_mse_to_the_teachers_real_cfg(tiny_model_dir):
    """The first step's loss, recomputed by hand from the same draws: the student (still the teacher) against
    v_T(∅) + w·(v_T(c) − v_T(∅)), the teacher run unbatched per prompt. After a few steps the student's output
    depends on the scale it is fed."""
    m, x0, ids = _setup(tiny_model_dir)
    batch, lo, hi = 3, 1.0, 5.0
    student, history = guidance_distill(m.transformer, m.text, PROMPTS, x0, latent_hw=(4, 4), guidance=(lo, hi),
                                        train_steps=6, batch_size=batch, lr=1e-2, seed=7, max_text_tokens=16,
                                        log=lambda _: None)
    g = torch.Generator().manual_seed(7)  # the draws of step 0, in guidance_distill's order
    idx = torch.randint(len(x0), (batch,), generator=g)
    t = torch.rand(batch, generator=g)
    w = lo + (hi - lo) * torch.rand(batch, generator=g)
    x_t = interpolate(x0[idx], torch.randn(x0[idx].shape, generator=g), t)
    errs = []
    with torch.no_grad():
        for b in range(batch):
            one = lambda p: predict_velocity(m.transformer, x_t[b:b + 1], t[b:b + 1],  # noqa: E731
                                             m.text.encode([p], max_tokens=16), ids)
            cond, uncond = one(PROMPTS[idx[b]]), one("")
            errs.append((cond - (uncond + w[b] * (cond - uncond))).square().mean())
    assert abs(history[0] - float(torch.stack(errs).mean())) < 1e-5 * max(1.0, history[0])
    assert history[0] > 0

    with torch.no_grad():
        prompt, tt = m.text.encode(PROMPTS, max_tokens=16), torch.full((len(PROMPTS),), 0.5)
        v1, v4 = (predict_velocity(student, x0, tt, prompt, ids, guidance=torch.full((len(PROMPTS),), s))
                  for s in (1.0, 4.0))
    assert (v1 - v4).abs().max() > 1e-4
