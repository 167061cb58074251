"""Chroma's recipe knobs in the real step and loop: minibatch OT noise pairing and visible padding tokens."""

import os
import signal

import numpy as np
import pytest
import torch

from evals.sampler import SamplingSettings, generate
from train.config import ObjectiveConfig, load_config
from train.inference import load_for_inference
from train.step import Encoders, forward_backward_step

PROMPTS = ["a small blue square at the top left on a yellow background", "a red circle"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir, device=torch.device("cpu"))


def _step(loaded, cfg: ObjectiveConfig, *, seed=11, backward=False):
    frozen = Encoders(vae=loaded.vae, text=loaded.text, dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    batch = {"pixels": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1, "caption": PROMPTS * 2}
    loaded.transformer.zero_grad(set_to_none=True)
    out = forward_backward_step(loaded.transformer, batch, frozen, cfg, generator=torch.Generator().manual_seed(seed),
                                backward=backward)
    grads = {n: p.grad.clone() for n, p in loaded.transformer.named_parameters() if p.grad is not None}
    return out, grads


# --- minibatch OT ------------------------------------------------------------------------------------------------


def test_ot_step_is_a_function_of_the_generator(loaded):
    """Same generator, same loss and gradients bitwise (what resumption relies on); OT changes the pairing."""
    loaded.transformer.requires_grad_(True)
    try:
        a, ga = _step(loaded, ObjectiveConfig(noise_pairing="ot_cosine", caption_dropout=0.0), backward=True)
        b, gb = _step(loaded, ObjectiveConfig(noise_pairing="ot_cosine", caption_dropout=0.0), backward=True)
    finally:
        loaded.transformer.requires_grad_(False)
        loaded.transformer.zero_grad(set_to_none=True)
    assert ga and torch.equal(a["loss"], b["loss"]) and all(torch.equal(ga[k], gb[k]) for k in ga)
    none, _ = _step(loaded, ObjectiveConfig(noise_pairing="none", caption_dropout=0.0))
    l2, _ = _step(loaded, ObjectiveConfig(noise_pairing="ot_l2", caption_dropout=0.0))
    assert torch.equal(none["t"], a["t"])  # the timesteps stay with their samples
    assert not torch.equal(none["loss"], a["loss"]) and not torch.equal(none["loss"], l2["loss"])


def _loop_cfg(model, data, run, **over):
    items = {
        "model.path": model, "data.local": data, "run_dir": run, "train.max_steps": 4, "train.batch_size": 4,
        "train.progress_bar": False, "sample.at_end": False, "checkpoint.every_steps": 100, "train.log_every": 1,
        "objective.noise_pairing": "ot_cosine", "objective.timestep_sampler": "chroma",
        "objective.visible_padding_tokens": 1, **over,
    }
    return load_config("configs/tiny-cpu.yaml", [f"{k}={v}" for k, v in items.items()])


def test_ot_run_stopped_and_resumed_is_bitwise(tiny_model_dir, tiny_data_dir, tmp_path):
    """A 1-process run (the torchrun code path) with Chroma's three knobs, stopped by SIGTERM after step 2 and
    resumed, ends with the uninterrupted run's losses, weights, moments and EMA, bitwise."""
    import tiny_runs

    straight = tiny_runs.train_in_process(_loop_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "straight"))

    def stop_after_two(step, path):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's StopFlag: finish the step, save, return

    cfg = _loop_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "resumed", **{"checkpoint.every_steps": 2})
    first = tiny_runs.train_in_process(cfg, on_checkpoint=stop_after_two)
    assert first.stopped_by_signal and first.step < 4
    second = tiny_runs.train_in_process(cfg)
    assert second.step == 4
    losses = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert losses == [h["loss"] for h in straight.history]
    from tiny_runs import assert_same_state, ckpt

    assert_same_state(ckpt(tmp_path / "straight", 4), ckpt(tmp_path / "resumed", 4))  # weights, moments, EMA

    # `dedistill sample` on the run takes k = 1 from its config: the same image as the sampler told k = 1.
    from PIL import Image

    from launch.cli import main

    out = tmp_path / "cli.png"
    main(["sample", "--model", str(tmp_path / "straight"), "--prompt", PROMPTS[0], "--cfg", "3", "--steps", "2",
          "--resolution", "64", "--max-text-tokens", "64", "--seed", "7", "--out", str(out)])
    run = load_for_inference(tmp_path / "straight", device=torch.device("cpu"))
    assert run.config.objective.visible_padding_tokens == 1

    def direct(k):
        s = SamplingSettings(steps=2, cfg_scale=3.0, resolution=64, seed=7, max_text_tokens=64, visible_padding_tokens=k)
        return np.asarray(generate(run.transformer, run.vae, run.text, [PROMPTS[0]], s, dtype=run.dtype)[0])

    cli = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(cli, direct(1)) and not np.array_equal(cli, direct(0))


# --- visible padding tokens --------------------------------------------------------------------------------------


def test_visible_padding_mask_and_trim():
    from train.text import PromptEmbeds, with_visible_padding

    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert with_visible_padding(mask, 0) is mask
    one = with_visible_padding(mask, 1)
    assert one.sum(1).tolist() == [4, 2, 6] and torch.equal(one[:, :1], mask[:, :1])
    assert with_visible_padding(mask, 2).sum(1).tolist() == [5, 3, 6]  # the last row runs out of padding
    p = PromptEmbeds(torch.randn(3, 6, 4), with_visible_padding(mask, 1), torch.randn(3, 8))
    assert p.trimmed().t5.shape[1] == 6  # max(len) + k = 6, clipped to the 6 tokens there are
    p = PromptEmbeds(torch.randn(3, 6, 4), with_visible_padding(mask[:2], 1), torch.randn(3, 8)[:2])
    assert p.trimmed().t5.shape[1] == 4  # max(len) + k = 3 + 1
    with pytest.raises(ValueError, match="objective.visible_padding_tokens"):
        ObjectiveConfig(visible_padding_tokens=1, attention_mask=False)
    with pytest.raises(ValueError, match="objective.visible_padding_tokens"):
        ObjectiveConfig(visible_padding_tokens=-1)


def test_visible_pad_keeps_its_t5_state_independent_of_padding(loaded):
    a = loaded.text.encode(PROMPTS, max_tokens=64, visible_padding=1)
    b = loaded.text.encode(PROMPTS, max_tokens=128, visible_padding=1)
    real = loaded.text.encode(PROMPTS, max_tokens=64)
    lengths = real.mask.sum(1)
    assert torch.equal(a.mask.sum(1), lengths + 1) and torch.equal(b.mask.sum(1), lengths + 1)
    n = int(lengths.max()) + 1
    torch.testing.assert_close(a.t5[:, :n], b.t5[:, :n], atol=1e-6, rtol=0)
    assert not b.t5[:, n:].any() and not a.t5[a.mask.logical_not()].any()
    for i, length in enumerate(lengths.tolist()):  # the visible pad is T5's own state for it, not zeros
        assert a.t5[i, length].abs().sum() > 0
        torch.testing.assert_close(a.t5[i, :length], real.t5[i, :length], atol=0, rtol=0)


def _sample(loaded, tokens, k, cfg=3.0):
    s = SamplingSettings(steps=3, cfg_scale=cfg, resolution=64, seed=7, max_text_tokens=tokens, visible_padding_tokens=k)
    (img,) = generate(loaded.transformer, loaded.vae, loaded.text, [PROMPTS[0]], s, dtype=loaded.dtype)
    return np.asarray(img)


def test_one_visible_pad_sample_does_not_depend_on_padding(loaded):
    a, b = _sample(loaded, 64, 1), _sample(loaded, 128, 1)
    assert a.std() > 0 and np.array_equal(a, b)
    assert not np.array_equal(a, _sample(loaded, 64, 0))  # the visible pad is seen by the model


def test_one_visible_pad_loss_does_not_depend_on_padding_or_trimming(loaded):
    def loss(tokens, k, trim=True):
        return _step(loaded, ObjectiveConfig(max_text_tokens=tokens, trim_text=trim, visible_padding_tokens=k,
                                             caption_dropout=0.5))[0]

    base = loss(64, 1)
    assert base["dropped"].any() and not base["dropped"].all()  # the empty prompt's visible pad is covered too
    lengths = loaded.text.encode(PROMPTS + [""], max_tokens=64).mask.sum(1)
    assert base["text_tokens"] == int(lengths.max()) + 1  # trimmed to max(len) + k
    torch.testing.assert_close(loss(128, 1)["loss"], base["loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(loss(128, 1, trim=False)["loss"], base["loss"], atol=1e-6, rtol=0)
    assert (loss(64, 0)["loss"] - base["loss"]).abs() > 1e-6


def test_precomputed_text_refuses_visible_padding(loaded):
    from train.step import prepare_prompts

    frozen = Encoders(vae=loaded.vae, text=loaded.text, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="objective.visible_padding_tokens"):
        prepare_prompts(frozen, PROMPTS, ObjectiveConfig(visible_padding_tokens=1, max_text_tokens=64),
                        generator=torch.Generator().manual_seed(0), stored={"max_text_tokens": 64})


# --- configs/chroma.yaml -----------------------------------------------------------------------------------------

# Chroma's own values (lodestone-rock/flow: src/trainer/train_chroma.py, TextImageDataset's defaults, the README's
# example config; the lodestones/Chroma card) for the settings the preset takes over unchanged.
CHROMA_SOURCE = {
    "objective.timestep_sampler": "chroma",  # create_distribution: -7.7 (t - 0.5)^2 + 2
    "objective.shift": "none",  # time_shift commented out
    "objective.temperature": 1.0,
    "objective.noise_pairing": "ot_cosine",  # cosine_optimal_transport
    "objective.visible_padding_tokens": 1,  # modify_mask_to_attend_padding
    "objective.attention_mask": True,
    "objective.caption_dropout": 0.01,  # uncond_percentage default
    "objective.max_text_tokens": 512,  # t5_max_length
    "data.resolution": 512,  # Chroma1-Base; README base_resolution [512]
    "train.batch_size": 8,  # README batch_size
    "train.grad_clip": 0.0,  # no clipping
    "optim.lr": 1e-5,  # README lr
    "optim.weight_decay": 1e-4,  # README weight_decay
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.schedule": "constant",  # LinearLR warmup, then nothing
    "optim.warmup_steps": 1,  # README warmup_steps
    "ema.decay": 0.0,  # no EMA
    "model.adapter.kind": "full",
    "sample.steps": 20,  # README inference steps
    "sample.cfg_scales": [1.0, 4.0],  # README inference cfg 1 and extra config cfg 4
}


def _chroma_doc_rows() -> dict[str, str]:
    """{config key: 'ours' cell} of docs/recipes.md's chroma.yaml table, for rows naming one config key."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    section = text.split("## `chroma.yaml`", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([a-z_]+(?:\.[a-z_]+)+)`", cells[0]) if len(cells) == 4 else None
        if m:
            rows[m.group(1)] = cells[1]
    return rows


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_chroma_preset_is_the_documented_recipe():
    """configs/chroma.yaml validates; every one-key row of docs/recipes.md's chroma table states the preset's
    effective value, and the settings taken from Chroma unchanged equal its sources."""
    import yaml

    cfg = load_config("configs/chroma.yaml")
    rows = _chroma_doc_rows()
    assert len(rows) >= 20 and set(CHROMA_SOURCE) - {"objective.temperature"} <= set(rows), set(CHROMA_SOURCE) - set(rows)
    for key, cell in rows.items():
        shown = cell.split("`")[1] if cell.startswith("`") else cell.split(" (")[0]
        value = _value(cfg, key)
        got = float(shown) if isinstance(value, float) else yaml.safe_load(shown)  # YAML 1.1 reads 1e-05 as text
        assert got == value, f"docs/recipes.md says {key} = {shown!r}, the preset {value!r}"
    for key, value in CHROMA_SOURCE.items():
        assert _value(cfg, key) == value, key
    assert cfg.model.path == "/path/to/chroma-pruned"  # made by `dedistill prune` (the docs say how)
