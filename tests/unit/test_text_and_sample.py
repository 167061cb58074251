"""Invariants of DESIGN.md: with masking on, padding length changes nothing — in sampling and in the loss."""

import numpy as np
import pytest
import torch

from evals.sampler import SamplingSettings, generate
from train.config import ObjectiveConfig
from train.inference import load_for_inference
from train.step import Encoders, forward_backward_step

PROMPT = "a small blue square at the top left on a yellow background"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir, device=torch.device("cpu"))


def test_t5_states_do_not_depend_on_padding(loaded):
    a = loaded.text.encode([PROMPT, "a red circle"], max_tokens=64)
    b = loaded.text.encode([PROMPT, "a red circle"], max_tokens=128)
    n = int(a.mask.sum(1).max())
    assert a.mask.dtype == torch.bool and 2 < n < 64
    torch.testing.assert_close(a.t5[:, :n], b.t5[:, :n], atol=1e-6, rtol=0)
    assert torch.equal(a.mask[:, :n], b.mask[:, :n]) and not b.mask[:, n:].any()
    assert torch.equal(a.pooled, b.pooled)


def _sample(loaded, tokens, masked=True, cfg=3.0):
    s = SamplingSettings(steps=3, cfg_scale=cfg, resolution=64, seed=7, max_text_tokens=tokens, masked=masked)
    (img,) = generate(loaded.transformer, loaded.vae, loaded.text, [PROMPT], s, dtype=loaded.dtype)
    return np.asarray(img)


def test_sample_same_image_for_64_and_128_tokens(loaded):
    a, b = _sample(loaded, 64), _sample(loaded, 128)
    assert a.shape == (64, 64, 3) and a.std() > 0
    assert np.array_equal(a, b)


def test_unmasked_sampling_depends_on_padding(loaded):
    """Control: schnell's unmasked T5 makes the image depend on max_text_tokens, which is what masking removes."""
    a, b = _sample(loaded, 64, masked=False), _sample(loaded, 128, masked=False)
    assert not np.array_equal(a, b)


def test_cfg_changes_the_image(loaded):
    assert not np.array_equal(_sample(loaded, 64, cfg=1.0), _sample(loaded, 64, cfg=5.0))


def _loss(loaded, tokens, *, trim=True, dropout=0.0):
    frozen = Encoders(vae=loaded.vae, text=loaded.text, dtype=torch.float32, device=torch.device("cpu"))
    cfg = ObjectiveConfig(max_text_tokens=tokens, trim_text=trim, caption_dropout=dropout)
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    batch = {"pixels": pixels, "caption": [PROMPT, "a red circle"]}
    out = forward_backward_step(loaded.transformer, batch, frozen, cfg, generator=torch.Generator().manual_seed(11), backward=False)
    return out


def test_loss_does_not_depend_on_padding_or_trimming(loaded):
    base = _loss(loaded, 64)["loss"]
    assert torch.isfinite(base) and base > 0
    torch.testing.assert_close(_loss(loaded, 128)["loss"], base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_loss(loaded, 128, trim=False)["loss"], base, atol=1e-6, rtol=0)


def test_caption_dropout_uses_the_empty_prompt(loaded):
    out = _loss(loaded, 64, dropout=1.0)
    assert out["dropped"].all()
    # same draws, but the captions themselves are empty and nothing is dropped
    empty = _loss_with_captions(loaded, ["", ""])
    torch.testing.assert_close(out["loss"], empty, atol=1e-6, rtol=0)


def _loss_with_captions(loaded, captions):
    frozen = Encoders(vae=loaded.vae, text=loaded.text, dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    out = forward_backward_step(
        loaded.transformer, {"pixels": pixels, "caption": captions}, frozen, ObjectiveConfig(max_text_tokens=64, caption_dropout=0.0),
        generator=torch.Generator().manual_seed(11), backward=False,
    )
    return out["loss"]
