# tier: integration
"""Tiny FLUX.2 [dev] and [klein] train in process with configs/tiny-cpu.yaml (FSDP2, world size 1, the torchrun code
path), stop and resume bitwise, and sample as the stock Flux2KleinPipeline does (schedule, VAE, text features)."""

import dataclasses
import os
import signal

import diffusers
import numpy as np
import pytest
import torch

import tiny_runs
from evals.sampler import SamplingSettings, generate
from train.config import load_config
from train.inference import sampling_schedule
from train.model import load_transformer, load_vae
from train.objective import DEV_SCHEDULE, sampling_sigmas
from train.text import TextEncoder

# FLUX.2 blocks name their Linears differently from FLUX.1 (ff.linear_in, to_qkv_mlp_proj, ...).
TARGETS = "[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,ff.linear_in,ff.linear_out," \
          "ff_context.linear_in,ff_context.linear_out,to_qkv_mlp_proj]"


@pytest.fixture(scope="module", params=["flux2", "flux2-klein"])
def model_dir(request, tmp_path_factory):
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


def _cfg(model, data, run, kind, **over):
    items = {
        "model.path": model, "data.local": data, "run_dir": run, "model.adapter.kind": kind, "train.max_steps": 4,
        "train.batch_size": 2, "train.progress_bar": False, "sample.at_end": False, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 10, "train.log_every": 1, "optim.warmup_steps": 1, "ema.decay": 0.5,
        "objective.max_text_tokens": 96,  # the chat wrapping ([dev]: FLUX.2's system message) comes first
        "model.adapter.target_modules": TARGETS, **over,
    }
    return load_config(tiny_runs.CONFIG, [f"{k}={v}" for k, v in items.items()])


def test_flux2_run_stopped_and_resumed_is_bitwise(model_dir, tiny_data_dir, tmp_path):
    """[dev] LoKr, [klein] full. A full [dev] fine-tune needs its guidance embedder out of the model, not only out of
    the graph (it gets no gradient, so no optimizer state to resume): `model.guidance: bypass` does that."""
    kind = "full" if "klein" in str(model_dir) else "lokr"
    straight = tiny_runs.train_in_process(_cfg(model_dir, tiny_data_dir, tmp_path / "straight", kind))
    assert len(straight.history) == 4 and all(np.isfinite(h["loss"]) for h in straight.history)

    def stop_after_two(step, path):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's StopFlag: finish the step, save, return

    cfg = _cfg(model_dir, tiny_data_dir, tmp_path / "resumed", kind)
    first = tiny_runs.train_in_process(cfg, on_checkpoint=stop_after_two)
    assert first.stopped_by_signal and first.step < 4
    second = tiny_runs.train_in_process(cfg)
    assert second.step == 4
    losses = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert losses == [h["loss"] for h in straight.history]
    state = tiny_runs.assert_same_state(tiny_runs.ckpt(tmp_path / "straight", 4), tiny_runs.ckpt(tmp_path / "resumed", 4))
    trained = {k for k in state if k.startswith("model.")}
    if kind == "full":  # the shared modulation (outside the blocks) trains with everything else
        assert any("single_stream_modulation" in k for k in trained)
    else:
        assert trained and all("lokr_" in k for k in trained)


def test_schedule_is_the_pipelines_empirical_mu(model_dir):
    """The model's own schedule: FlowMatchEuler with mu = compute_empirical_mu(tokens, steps), as the pipelines."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    sched = sampling_schedule(model_dir, None)
    assert sched.dynamic and sched.empirical_mu
    assert sampling_schedule(model_dir, None, override="dynamic") == dataclasses.replace(DEV_SCHEDULE,
                                                                                          empirical_mu=True)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(model_dir / "scheduler"))
    for steps, seq in [(4, 16), (28, 4096), (50, 6000)]:
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq, steps))
        torch.testing.assert_close(sampling_sigmas(steps, seq, schedule=sched), ref.sigmas.float(), atol=1e-6, rtol=0)


def test_unguided_sampling_equals_the_klein_pipeline(model_dir):
    """cfg 1, no mask: our sampler (text features, empirical-mu schedule, BatchNorm de-normalisation, decode) gives
    the stock Flux2KleinPipeline's image for the same initial noise."""
    if "klein" not in str(model_dir):
        pytest.skip("Flux2Pipeline always feeds the guidance embedder; [klein] has none")
    m = load_transformer(model_dir, dtype=torch.float32)
    vae = load_vae(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    text = TextEncoder(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    s = SamplingSettings(steps=3, cfg_scale=1.0, resolution=64, seed=5, max_text_tokens=48, masked=False,
                        schedule=sampling_schedule(model_dir, None))
    ours = np.asarray(generate(m, vae, text, ["a red circle"], s, dtype=torch.float32)[0]).astype(np.float32)
    from evals.sampler import initial_noise

    noise = initial_noise((1, 32, 8, 8), 5)
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(str(model_dir))
    ref = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=3, guidance_scale=1.0,
               max_sequence_length=48, latents=pipe._patchify_latents(noise), output_type="np").images[0]
    assert np.abs(ours - ref * 255).max() <= 1.0


def test_lora_export_loads_in_the_stock_pipeline(model_dir, tiny_data_dir, tmp_path):
    """`--format lora` of a FLUX.2 LoRA run loads with the pipeline's `load_lora_weights`, and the stock transformer
    then predicts what the trained one (base + adapter) predicts (`--format diffusers`: test_flux2_export.py)."""
    from launch.export import _load_trained_transformer, export_checkpoint
    from train.flux import pack_latents, predict_velocity
    from train.inference import resolve_checkpoint

    run = tmp_path / "run"
    tiny_runs.train_in_process(_cfg(model_dir, tiny_data_dir, run, "lora", **{"optim.lr": 0.02,
                                                                              "train.max_steps": 2}))
    out = export_checkpoint(run, tmp_path / "lora", fmt="lora", dtype="fp32")
    name = "Flux2KleinPipeline" if "klein" in str(model_dir) else "Flux2Pipeline"
    pipe = getattr(diffusers, name).from_pretrained(str(model_dir))
    base = pipe.transformer
    text = TextEncoder(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    enc = text.encode(["a red circle"], max_tokens=96)
    g = torch.Generator().manual_seed(0)
    x, t = pack_latents(torch.randn(1, 32, 8, 8, generator=g)), torch.tensor([0.6])
    from train.flux import image_ids

    ids = image_ids(8, 8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        before = predict_velocity(base, x, t, enc, ids)
        pipe.load_lora_weights(str(out))
        loaded = predict_velocity(pipe.transformer, x, t, enc, ids)
        ckpt, run_dir = resolve_checkpoint(run)
        trained, _ = _load_trained_transformer(ckpt, run_dir, ema=False)
        ref = predict_velocity(trained, x, t, enc, ids)
    assert (ref - before).abs().max() > 1e-4  # the LoRA changed the model
    torch.testing.assert_close(loaded, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_flux2_trains_under_torchrun_and_resumes_bitwise(model_dir, tiny_data_dir, tmp_path):
    """2 gloo ranks under torchrun (the blocks and the shared modulation sharded): 4 straight steps equal a run
    resumed to 4 from the straight run's step-2 checkpoint, in a fresh run dir, bitwise."""
    kind = "full" if "klein" in str(model_dir) else "lokr"

    def over(run, steps):
        items = {"model.path": model_dir, "data.local": tiny_data_dir, "run_dir": run, "train.max_steps": steps,
                 "model.adapter.kind": kind, "model.adapter.target_modules": TARGETS, "train.progress_bar": "false",
                 "sample.at_end": "false", "checkpoint.every_steps": 2, "objective.max_text_tokens": 96,
                 "optim.schedule": "constant", "optim.warmup_steps": 0}
        return [f"{k}={v}" for k, v in items.items()]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny_runs.run(tiny_runs.torchrun_cmd(tiny_runs.CONFIG, *over(straight, 4)))
    tiny_runs.started_from(straight, resumed, 2)
    r = tiny_runs.run(tiny_runs.torchrun_cmd(tiny_runs.CONFIG, *over(resumed, 4)))
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout, r.stdout[-2000:]
    state = tiny_runs.assert_same_state(tiny_runs.ckpt(straight, 4), tiny_runs.ckpt(resumed, 4))
    assert any(k.startswith("model.") for k in state)
