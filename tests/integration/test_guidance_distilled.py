# tier: integration
"""Guidance-distilled bases (FLUX.1-dev class: `guidance_embeds: true`) on a tiny dev-shaped FLUX.

- bypass (the default) builds the transformer schnell-shaped, which equals the dev model with its guidance embedder
  taken out of the graph (ai-toolkit's `bypass_guidance_embedding`, written out here by hand);
- keep feeds the embedder a constant, exactly as passing `guidance=` does;
- both objectives' losses equal a hand computation: the transformer called directly, the MSE formed here;
- configs/tiny-cpu.yaml trains on the dev dir unchanged; its exports are schnell-shaped (diffusers: guidance_embeds
  false, stock FluxPipeline loads it; bfl: no guidance_in) and its pipeline.py equals `dedistill sample`;
- the teacher objective trains in process under FSDP2 (a world of one), and `dedistill prune` accepts the dev dir.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch

import tiny_runs

GUIDANCE_KEYS = "time_text_embed.guidance_embedder."


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    """`dedistill tiny-model --family flux-dev`: the tiny FLUX with a guidance embedder."""
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_dev") / "model", seed=0, family="flux-dev")


def _inputs(seed: int = 0, b: int = 2, length: int = 5):
    from train.flux import image_ids
    from train.text import PromptEmbeds

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 16, generator=g)  # packed (B, 8/2 * 8/2, 4 latent channels * 2x2)
    t = torch.rand(b, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # one padded prompt: the bool key mask is in play
    prompt = PromptEmbeds(torch.randn(b, length, 32, generator=g), mask, torch.randn(b, 32, generator=g))
    return x, t, prompt, image_ids(8, 8, device="cpu", dtype=torch.float32)


def _by_hand(transformer, x, t, prompt, ids, guidance=None):
    """FluxTransformer2DModel called directly with the joint bool key mask [text; image]."""
    key_mask = torch.cat([prompt.mask, torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)], dim=1)
    return transformer(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=prompt.pooled,
                       encoder_hidden_states=prompt.t5, txt_ids=torch.zeros(prompt.t5.shape[1], 3), img_ids=ids,
                       joint_attention_kwargs={"attention_mask": key_mask}, return_dict=False)[0]


def test_bypass_is_schnell_shaped_and_equals_the_dev_model_without_its_embedder(dev_dir):
    from train.model import load_transformer

    dev = load_transformer(dev_dir, dtype=torch.float32, guidance="keep")
    bypassed = load_transformer(dev_dir, dtype=torch.float32)  # model.guidance: bypass, the default
    assert dev.config.guidance_embeds and not bypassed.config.guidance_embeds
    assert any(k.startswith(GUIDANCE_KEYS) for k in dev.state_dict())
    assert not any(k.startswith(GUIDANCE_KEYS) for k in bypassed.state_dict())
    assert {k for k in dev.state_dict() if not k.startswith(GUIDANCE_KEYS)} == set(bypassed.state_dict())

    x, t, prompt, ids = _inputs()
    embed = dev.time_text_embed

    def without_guidance(timestep, guidance, pooled):  # ai-toolkit's bypass: time + pooled text, no guidance term
        proj = embed.time_proj(timestep)
        return embed.timestep_embedder(proj.to(pooled.dtype)) + embed.text_embedder(pooled)

    embed.forward = without_guidance
    with torch.no_grad():
        reference = _by_hand(dev, x, t, prompt, ids, guidance=torch.full((2,), 3.5))
        ours = _by_hand(bypassed, x, t, prompt, ids)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_stock_dev_transformer_needs_a_guidance_input(dev_dir):
    from diffusers import FluxTransformer2DModel

    dev = FluxTransformer2DModel.from_pretrained(str(dev_dir / "transformer"))
    x, t, prompt, ids = _inputs()
    with pytest.raises(TypeError), torch.no_grad():  # why bypass builds it schnell-shaped instead of passing None
        _by_hand(dev, x, t, prompt, ids)


def test_keep_feeds_the_constant_as_an_explicit_guidance_would(dev_dir):
    from train.flux import predict_velocity
    from train.model import load_transformer

    kept = load_transformer(dev_dir, dtype=torch.float32, guidance="keep", guidance_scale=3.5)
    bypassed = load_transformer(dev_dir, dtype=torch.float32)
    x, t, prompt, ids = _inputs(1)
    with torch.no_grad():
        implicit = predict_velocity(kept, x, t, prompt, ids)
        explicit = _by_hand(kept, x, t, prompt, ids, guidance=torch.full((2,), 3.5))
        other = _by_hand(kept, x, t, prompt, ids, guidance=torch.full((2,), 1.0))
        none = predict_velocity(bypassed, x, t, prompt, ids)
    assert torch.equal(implicit, explicit)
    assert (implicit - other).abs().max() > 1e-3 and (implicit - none).abs().max() > 1e-3  # the input matters


# ---------------------------------------------------------------------------------------------------------------
# The two objectives against a hand computation


def _step_inputs(dev_dir, cfg, seed: int):
    """(frozen parts, batch, the draws the step makes, in its order, from a generator seeded like the step's)."""
    from dataset_tools.tiny_data import draw_sample
    from train import objective
    from train.model import load_vae
    from train.step import Encoders, encode_images, prepare_prompts
    from train.text import TextEncoder

    frozen = Encoders(vae=load_vae(dev_dir, dtype=torch.float32, device=torch.device("cpu")),
                    text=TextEncoder(dev_dir, dtype=torch.float32, device=torch.device("cpu")),
                    dtype=torch.float32, device=torch.device("cpu"))
    rng = __import__("random").Random(seed)
    samples = [draw_sample(rng, 64) for _ in range(2)]
    pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for img, _, _ in samples])
    batch = {"pixels": pixels, "caption": [c for _, c, _ in samples]}
    g = torch.Generator().manual_seed(seed)
    latents = encode_images(frozen.vae, pixels, generator=g)
    h, w = latents.shape[2:]
    x0 = latents.float().view(2, 4, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, -1, 16)
    prompts, dropped = prepare_prompts(frozen, batch["caption"], cfg, generator=g)
    t = objective.sample_timesteps(cfg, 2, generator=g, image_seq_len=x0.shape[1])
    noise = torch.randn(x0.shape, generator=g)
    scales = objective.sample_guidance(cfg, 2, generator=g) if cfg.kind == "teacher" else None
    return frozen, batch, dict(x0=x0, prompts=prompts, t=t, noise=noise, w=scales, hw=(h, w))


def _mse(a, b):
    return (a - b).square().flatten(1).mean(1).mean()


def test_data_objective_equals_the_hand_computation(dev_dir):
    from train.config import ObjectiveConfig
    from train.flux import image_ids
    from train.model import load_transformer
    from train.step import forward_backward_step

    cfg = ObjectiveConfig(caption_dropout=0.0, max_text_tokens=64, timestep_sampler="uniform")
    student = load_transformer(dev_dir, dtype=torch.float32)
    frozen, batch, d = _step_inputs(dev_dir, cfg, seed=3)
    out = forward_backward_step(student, batch, frozen, cfg, generator=torch.Generator().manual_seed(3),
                                backward=False)
    t, x0, noise = d["t"], d["x0"], d["noise"]
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    with torch.no_grad():
        v = _by_hand(student, x_t, t, d["prompts"], image_ids(*d["hw"], device="cpu", dtype=torch.float32))
    torch.testing.assert_close(out["loss"], _mse(v, noise - x0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("data_weight", [0.0, 0.5])
def test_teacher_objective_equals_the_hand_computation(dev_dir, data_weight):
    from train.config import ObjectiveConfig
    from train.flux import image_ids
    from train.model import load_transformer
    from train.step import forward_backward_step

    cfg = ObjectiveConfig(kind="teacher", teacher_guidance=[1.0, 4.0], teacher_data_weight=data_weight,
                          caption_dropout=0.0, max_text_tokens=64, timestep_sampler="uniform")
    student = load_transformer(dev_dir, dtype=torch.float32)  # bypassed: real CFG only
    teacher = load_transformer(dev_dir, dtype=torch.float32, guidance="keep")
    # a student that is not the teacher minus its embedder, so the loss is not only the embedder's contribution
    with torch.no_grad():
        student.proj_out.weight.mul_(0.9)
    frozen, batch, d = _step_inputs(dev_dir, cfg, seed=4)
    out = forward_backward_step(student, batch, frozen, cfg, generator=torch.Generator().manual_seed(4),
                                backward=False, teacher=teacher)
    t, x0, noise, w, prompts = d["t"], d["x0"], d["noise"], d["w"], d["prompts"]
    assert 1.0 <= w.min() and w.max() <= 4.0 and w[0] != w[1]
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = image_ids(*d["hw"], device="cpu", dtype=torch.float32)
    empty = frozen.text.empty(max_tokens=64).select(torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        cond = _by_hand(student, x_t, t, prompts, ids)  # two separate student forwards, unbatched
        uncond = _by_hand(student, x_t, t, empty, ids)
        target = _by_hand(teacher, x_t, t, prompts, ids, guidance=w)
    wb = w[:, None, None]
    expected = _mse(uncond + wb * (cond - uncond), target) + data_weight * _mse(cond, noise - x0)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=0)
    assert out["loss"] > 0


def test_teacher_objective_needs_a_teacher_and_a_bypassed_student():
    from train.config import ObjectiveConfig, load_config

    with pytest.raises(ValueError, match="objective.teacher_guidance"):
        ObjectiveConfig(teacher_guidance=[4.0, 1.0])
    with pytest.raises(ValueError, match="model.guidance=bypass"):
        load_config(None, ["objective.kind=teacher", "model.guidance=keep"])
    with pytest.raises(ValueError, match="model.guidance"):
        load_config(None, ["model.guidance=off"])


# ---------------------------------------------------------------------------------------------------------------
# configs/tiny-cpu.yaml on the dev dir: train, export, sample, prune


@pytest.fixture(scope="module")
def dev_run(dev_dir, tiny_data_dir, tmp_path_factory):
    from train.config import load_config

    run_dir = tmp_path_factory.mktemp("dev_run") / "run"
    cfg = load_config(tiny_runs.CONFIG, tiny_runs.overrides(dev_dir, tiny_data_dir, run_dir, steps=4,
                                                            **{"optim.lr": 0.01, "ema.decay": 0.0}))
    state = tiny_runs.train_in_process(cfg)
    assert state.step == 4 and all(math.isfinite(r["loss"]) for r in state.history)
    return run_dir


def test_dev_dir_exports_schnell_shaped_diffusers(dev_run, tmp_path):
    from diffusers import FluxPipeline

    from launch.export import export_checkpoint

    out = export_checkpoint(dev_run, tmp_path / "export", fmt="diffusers", dtype="fp32")
    assert json.loads((out / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    pipe = FluxPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    assert not any(k.startswith(GUIDANCE_KEYS) for k in pipe.transformer.state_dict())
    image = pipe("a red circle", negative_prompt="blue", true_cfg_scale=2.0, num_inference_steps=2, height=64,
                 width=64, max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_dev_dir_exports_bfl_without_guidance_in(dev_run, tmp_path):
    from safetensors import safe_open

    from launch.export import export_checkpoint
    from launch.export_single_file import BFL_FILE

    out = export_checkpoint(dev_run, tmp_path / "bfl", fmt="bfl", dtype="fp32")
    with safe_open(str(out / BFL_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert "time_in.in_layer.weight" in keys and not any(k.startswith("guidance_in") for k in keys)


_PIPELINE_SCRIPT = r"""
import json, sys
for name in ("train", "evals", "launch", "dataset_tools"):
    sys.modules[name] = None
import numpy as np, torch
from diffusers import DiffusionPipeline

out, args = sys.argv[1], json.loads(sys.argv[2])
s = args["settings"]
pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True, torch_dtype=torch.float32)
for i, prompt in enumerate(args["prompts"]):
    img = pipe(prompt, negative_prompt=args["neg"], true_cfg_scale=s["cfg"], num_inference_steps=s["steps"],
               height=s["res"], width=s["res"], cfg_skip_steps=s["skip"], max_sequence_length=s["tokens"],
               generator=torch.Generator().manual_seed(s["seed"]), output_type="pil").images[0]
    np.save(f"{args['dir']}/custom_{i}.npy", np.asarray(img.convert("RGB")))
"""


@pytest.mark.slow
def test_dev_export_pipeline_equals_dedistill_sample(dev_run, tmp_path):
    from launch.export import export_checkpoint

    out = export_checkpoint(dev_run, tmp_path / "export", fmt="diffusers", dtype="fp32")
    settings = dict(steps=3, cfg=3.0, skip=0, res=64, seed=5, tokens=64)
    (tmp_path / "images").mkdir()
    got = tiny_runs.pipeline_and_sample_images(out, _PIPELINE_SCRIPT, settings, ["a red circle"], "blurry noisy",
                                               tmp_path / "images")
    assert got["ours_0"].std() > 0 and np.array_equal(got["custom_0"], got["ours_0"])


def test_teacher_objective_trains_under_fsdp2(dev_dir, tiny_data_dir, tmp_path):
    from train.config import load_config

    cfg = load_config(tiny_runs.CONFIG, tiny_runs.overrides(dev_dir, tiny_data_dir, tmp_path / "run", steps=2,
                                                            **{"objective.kind": "teacher"}))
    state = tiny_runs.train_in_process(cfg)
    assert state.step == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in state.history)


def test_full_fine_tune_keeps_the_frozen_prefixes_frozen(dev_dir, tiny_data_dir, tmp_path):
    """flux1-dev-undistill.yaml's `model.adapter.frozen`: the timestep and pooled-text embedders never train."""
    from train.config import load_config

    run_dir = tmp_path / "run"
    cfg = load_config(tiny_runs.CONFIG, tiny_runs.overrides(
        dev_dir, tiny_data_dir, run_dir, steps=2,
        **{"model.adapter.kind": "full", "model.adapter.frozen": "[time_text_embed.]"}))
    tiny_runs.train_in_process(cfg)
    trained = {k for k in tiny_runs.trainable_state(tiny_runs.ckpt(run_dir, 2)) if k.startswith("model.")}
    assert "model.x_embedder.weight" in trained and "model.proj_out.weight" in trained
    assert not any(k.startswith("model.time_text_embed.") for k in trained)
    with pytest.raises(ValueError, match="model.adapter.frozen"):
        load_config(None, ["model.adapter.frozen=[time_text_embed.]"])  # lokr: an adapter trains only itself


def test_teacher_objective_refuses_a_schnell_base(tiny_model_dir, tiny_data_dir, tmp_path):
    from train.config import load_config

    cfg = load_config(tiny_runs.CONFIG, tiny_runs.overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run",
                                                            steps=1, **{"objective.kind": "teacher"}))
    with pytest.raises(ValueError, match="guidance-distilled"):
        tiny_runs.train_in_process(cfg)


def test_prune_accepts_a_dev_dir(dev_dir, tiny_data_dir, tmp_path):
    from diffusers import ChromaPipeline

    from launch.cli import main

    out = tmp_path / "chroma"
    main(["prune", "--model", str(dev_dir), "--captions", str(tiny_data_dir), "--out", str(out), "--steps", "20",
          "--batch-size", "8", "--eval-prompts", "2", "--eval-timesteps", "2", "--eval-resolution", "64"])
    report = json.loads((out / "prune_report.json").read_text())
    assert math.isfinite(report["velocity"]["rel_error"])
    assert type(ChromaPipeline.from_pretrained(str(out)).transformer).__name__ == "ChromaTransformer2DModel"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
