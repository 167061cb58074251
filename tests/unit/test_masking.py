"""The T5 padding mask in joint attention: exact with a bool mask, broken with a float 0/1 mask."""

import pytest
import torch

from train.flux import image_ids, joint_attention_mask, pack_latents, predict_velocity, unpack_latents
from train.text import PromptEmbeds
from tiny_nets import spy_attention_masks, tiny_transformer


def inputs(text_len=5, pad_to=12, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    x = pack_latents(torch.randn(batch, 4, h, w, generator=g))  # (B, 16, 16)
    t = torch.rand(batch, generator=g)
    states = torch.randn(batch, text_len, 32, generator=g)
    pooled = torch.randn(batch, 32, generator=g)
    real = PromptEmbeds(states, torch.ones(batch, text_len, dtype=torch.bool), pooled)
    # Padding rows hold garbage on purpose: a correct mask makes their values irrelevant.
    garbage = torch.randn(batch, pad_to - text_len, 32, generator=g) * 5
    padded = PromptEmbeds(
        torch.cat([states, garbage], 1),
        torch.cat([real.mask, torch.zeros(batch, pad_to - text_len, dtype=torch.bool)], 1),
        pooled,
    )
    return x, t, real, padded, image_ids(h, w, device="cpu", dtype=torch.float32)


def test_pack_roundtrip():
    z = torch.randn(2, 4, 8, 6)
    assert torch.equal(unpack_latents(pack_latents(z), 8, 6), z)


def test_pack_matches_diffusers():
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack_latents(z), FluxPipeline._pack_latents(z, 2, 4, 8, 6))
    ref = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 6, device="cpu", dtype=torch.float32), ref)


def test_bool_mask_equals_truncated_prompt():
    m = tiny_transformer()
    x, t, real, padded, ids = inputs()
    with torch.no_grad():
        ref = predict_velocity(m, x, t, real, ids, masked=True)
        out = predict_velocity(m, x, t, padded, ids, masked=True)
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_float_mask_does_not_mask():
    """The SimpleTuner/LibreFLUX bug: a 0/1 float mask is added to the scores and masks nothing."""
    m = tiny_transformer()
    x, t, real, padded, ids = inputs()
    with torch.no_grad():
        ref = predict_velocity(m, x, t, real, ids, masked=True)
        float_mask = joint_attention_mask(padded.mask, x.shape[1]).float()
        out = m(
            hidden_states=x, timestep=t, pooled_projections=padded.pooled, encoder_hidden_states=padded.t5,
            txt_ids=torch.zeros(padded.t5.shape[1], 3), img_ids=ids,
            joint_attention_kwargs={"attention_mask": float_mask}, return_dict=False,
        )[0]
    assert (out - ref).abs().max() > 1e-3


def test_unmasked_padding_changes_output():
    m = tiny_transformer()
    x, t, real, padded, ids = inputs()
    with torch.no_grad():
        ref = predict_velocity(m, x, t, real, ids, masked=False)
        out = predict_velocity(m, x, t, padded, ids, masked=False)
    assert (out - ref).abs().max() > 1e-3


def test_mixed_lengths_and_trimming_are_exact():
    """A batch of prompts of different lengths: each row equals its own unpadded forward; trimming is exact."""
    m = tiny_transformer()
    x, t, _, padded, ids = inputs(text_len=5, pad_to=16)
    padded.mask[1, 3:] = False  # row 1 is shorter (3 tokens)
    trimmed = padded.trimmed()
    assert trimmed.t5.shape[1] == 5
    with torch.no_grad():
        full = predict_velocity(m, x, t, padded, ids, masked=True)
        trim = predict_velocity(m, x, t, trimmed, ids, masked=True)
        row1 = predict_velocity(m, x[1:], t[1:], PromptEmbeds(padded.t5[1:, :3], padded.mask[1:, :3], padded.pooled[1:]), ids)
    torch.testing.assert_close(trim, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full[1:], row1, atol=1e-5, rtol=0)


def test_mask_reaches_every_block(monkeypatch):
    """Every double- and single-stream block's attention receives the bool mask over [text; image]."""
    m = tiny_transformer()
    x, t, _, padded, ids = inputs()
    seen = spy_attention_masks(monkeypatch)
    with torch.no_grad():
        predict_velocity(m, x, t, padded, ids, masked=True)
    assert len(seen) == 4  # 2 double + 2 single blocks
    for mask in seen:
        assert mask is not None and mask.dtype == torch.bool
        assert mask.shape == (2, padded.t5.shape[1] + x.shape[1])
        assert not mask[:, 5 : padded.t5.shape[1]].any() and mask[:, :5].all() and mask[:, padded.t5.shape[1] :].all()


def test_joint_mask_rejects_float():
    with pytest.raises(AssertionError):
        joint_attention_mask(torch.ones(1, 3), 4)


# ---------------------------------------------------------------------------------------------------------------
# No padding left after trimming: no mask, so SDPA may choose flash (docs/performance.md)


def _out_and_grads(m, x, t, prompt, ids):
    m.zero_grad(set_to_none=True)
    out = predict_velocity(m, x, t, prompt, ids, masked=True)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_unpadded_batch_without_mask_is_bitwise_equal(monkeypatch):
    """Equal-length prompts (here: a padded batch trimmed to its longest prompt, which every row fills): the
    mask-free call equals the masked one exactly, outputs and gradients."""
    m = tiny_transformer()
    x, t, _, padded, ids = inputs(batch=3)
    seen = spy_attention_masks(monkeypatch)
    padded = PromptEmbeds(padded.t5, padded.mask, padded.pooled, PromptEmbeds.host_lengths(padded.mask))
    trimmed = padded.trimmed()
    assert trimmed.unpadded and trimmed.lengths == (5, 5, 5)
    forced = PromptEmbeds(trimmed.t5, trimmed.mask, trimmed.pooled)  # the host "does not know": the mask stays
    with_mask, g_mask = _out_and_grads(m, x, t, forced, ids)
    assert len(seen) == 4 and all(s is not None for s in seen)
    seen.clear()
    without, g_free = _out_and_grads(m, x, t, trimmed, ids)
    assert len(seen) == 4 and all(s is None for s in seen)
    assert with_mask.abs().mean() > 1e-3
    assert torch.equal(without, with_mask)
    assert g_free.keys() == g_mask.keys() and all(torch.equal(g_free[k], g_mask[k]) for k in g_mask)


def test_mask_dropped_exactly_when_no_padding_is_left(monkeypatch):
    m = tiny_transformer()
    x, t, _, padded, ids = inputs(text_len=5, pad_to=16)
    seen = spy_attention_masks(monkeypatch)
    ragged_mask = padded.mask.clone()
    ragged_mask[1, 3:] = False  # row 1 has 3 tokens: padding is left after trimming
    ragged = PromptEmbeds(padded.t5, ragged_mask, padded.pooled, lengths=(5, 3))
    padded = PromptEmbeds(padded.t5, padded.mask, padded.pooled, lengths=(5, 5))
    unknown = PromptEmbeds(padded.t5[:, :5], padded.mask[:, :5], padded.pooled)  # no host lengths: keeps the mask
    cases = [(padded, True), (padded.trimmed(), False), (ragged.trimmed(), True), (unknown, True)]
    for prompt, expect_mask in cases:
        seen.clear()
        with torch.no_grad():
            predict_velocity(m, x, t, prompt, ids, masked=True)
        assert [s is not None for s in seen] == [expect_mask] * 4, prompt.lengths
    seen.clear()
    with torch.no_grad():  # masked=False never passes one
        predict_velocity(m, x, t, padded.trimmed(), ids, masked=False)
    assert seen == [None] * 4


def test_trim_and_mask_decision_read_no_device_tensor():
    """With host lengths, trimming, dropout substitution and the mask-free decision never read the mask: here it
    lives on the meta device, where any read (.item(), .any()) raises."""
    b, L, d = 3, 12, 8
    meta = dict(device="meta")
    prompts = PromptEmbeds(torch.empty(b, L, d, **meta), torch.empty(b, L, dtype=torch.bool, **meta),
                           torch.empty(b, d, **meta), lengths=(7, 4, 2))
    empty = PromptEmbeds(torch.empty(1, L, d, **meta), torch.empty(1, L, dtype=torch.bool, **meta),
                         torch.empty(1, d, **meta), lengths=(1,))
    mixed = prompts.where(torch.tensor([False, False, True]), empty).trimmed()
    assert mixed.lengths == (7, 4, 1) and mixed.t5.shape[1] == 7 and not mixed.unpadded
    same = prompts.select(torch.tensor([0, 0])).trimmed()
    assert same.t5.shape[1] == 7 and same.unpadded
    assert PromptEmbeds.cat([same, same]).unpadded
    with pytest.raises(RuntimeError, match="meta"):  # without host lengths, trimming must read the device mask
        PromptEmbeds(prompts.t5, prompts.mask, prompts.pooled).trimmed()



def _flex_vs_sdpa(device: str, *, grads: bool):
    m = tiny_transformer().to(device)
    x, t, _, padded, ids = (v.to(device) if torch.is_tensor(v) else v for v in inputs(text_len=5, pad_to=16))
    padded.mask[1, 3:] = False
    padded = PromptEmbeds(padded.t5.to(device), padded.mask.to(device), padded.pooled.to(device))
    with torch.set_grad_enabled(grads):
        want, want_g = _out_and_grads(m, x, t, padded, ids) if grads else (
            predict_velocity(m, x, t, padded, ids), {})
        m.zero_grad(set_to_none=True)
        got = predict_velocity(m, x, t, padded, ids, attention="flex")
        if grads:
            got.square().mean().backward()
    got_g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # other garbage in the padding: the same output (the BlockMask masks it)
        other = PromptEmbeds(torch.where(padded.mask[..., None], padded.t5, -padded.t5), padded.mask, padded.pooled)
        torch.testing.assert_close(predict_velocity(m, x, t, other, ids, attention="flex"), got.detach(),
                                   atol=1e-5, rtol=0)
        back = predict_velocity(m, x, t, padded, ids, attention="sdpa")  # and back to SDPA on the same model
    torch.testing.assert_close(back, want.detach(), atol=0, rtol=0)
    return m, x, t, padded, ids


def test_flex_attention_equals_masked_sdpa():
    """objective.attention=flex: FlexAttention with a BlockMask built from the key mask gives the masked SDPA path's
    output within 1e-5 (fp32; the kernels sum in different orders) on rows of different lengths. PyTorch's
    FlexAttention has no backward on CPU: training with it there stops with one line naming the key."""
    m, x, t, padded, ids = _flex_vs_sdpa("cpu", grads=False)
    with pytest.raises(ValueError, match=r"objective\.attention: flex"):
        predict_velocity(m, x, t, padded, ids, attention="flex").sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_attention_equals_masked_sdpa_with_gradients_on_gpu():
    _flex_vs_sdpa("cuda", grads=True)
