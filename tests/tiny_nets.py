"""A tiny random FLUX transformer for unit tests, with the dims of `dedistill tiny-model` (TINY_SIZES)."""

import torch


def tiny_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    from dataset_tools.tiny_model import TINY_SIZES

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**TINY_SIZES["tiny"]["transformer"]).eval()
    # Randomise the zero-initialised output layers, or every forward is trivially zero and equalities prove nothing.
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return m


def spy_attention_masks(monkeypatch) -> list:
    """Record the `attn_mask` every FLUX/Chroma attention call hands diffusers' dispatcher (both families' blocks
    dispatch through transformer_flux), and still run it."""
    from diffusers.models.transformers import transformer_flux

    seen = []
    orig = transformer_flux.dispatch_attention_fn

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    return seen
