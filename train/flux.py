"""The one place that calls the transformer (FLUX or Chroma): latent packing, position ids and the joint-attention
mask. How each family is called is its row in train/family.py.

Training (train/step.py) and sampling (evals/sampler.py) both go through `predict_velocity`, so the mask used at
inference is, by construction, the mask used in training.
"""

from __future__ import annotations

import torch

from train.family import family_of_model
from train.flux2 import denormalise_packed, normalise_packed
from train.text import PromptEmbeds


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, C*4): FLUX's 2x2 patchify, same layout as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2*W/2, C*4) -> (B, C, H, W) with H, W in latent pixels."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, *, device, dtype) -> torch.Tensor:
    """(H/2*W/2, 3) rotary position ids of the packed latent grid (h, w in latent pixels)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def joint_attention_mask(text_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """(B, L) bool text mask -> (B, L + N) bool key mask over [text; image], the order FLUX concatenates in.

    It must stay bool: SDPA *adds* a float mask to the scores, so a 0/1 float mask shifts logits by at most 1 and
    masks nothing (the bug in LibreFLUX/SimpleTuner). A bool key mask leaves every query at least the image keys, so
    no softmax row is empty.
    """
    assert text_mask.dtype == torch.bool, "the joint attention mask must be bool"
    image = torch.ones(text_mask.shape[0], n_image, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask, image], dim=1)


ATTENTION = ("sdpa", "flex")
"""How joint attention applies the key mask (`objective.attention`): sdpa = diffusers' native backend, PyTorch SDPA
with a (B, 1, 1, S) bool mask; flex = FlexAttention with a BlockMask built from the same key mask (blocks that hold
only padding are skipped; fast only compiled, e.g. under `parallel.compile_blocks`)."""


def flex_block_mask(key_mask: torch.Tensor):
    """(B, S) bool key mask -> a FlexAttention BlockMask over (S queries × S keys): key j is visible to every query
    of row b exactly when key_mask[b, j]. diffusers' own flex path reads a 2-D mask as a *query* mask (it views it as
    (B, 1, S, 1)), so the BlockMask is built here and passed through as is."""
    # deferred: flex_attention imports sympy (~0.3 s), and only the flex attention backend uses it
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = key_mask.shape

    def visible(batch, head, q_idx, kv_idx):
        return key_mask[batch, kv_idx]

    return create_block_mask(visible, b, None, s, s, device=key_mask.device)


def _use_backend(transformer, attention: str) -> None:
    """Set the attention backend of every processor (diffusers `set_attention_backend`) once per change. Per
    processor, not diffusers' `attention_backend` context: a checkpointed block recomputes its forward during the
    backward, outside any context the forward ran in."""
    backend = {"sdpa": "native", "flex": "flex"}[attention]
    if getattr(transformer, "_dedistill_attention", "native") != backend:
        transformer.set_attention_backend(backend)
        transformer._dedistill_attention = backend


def predict_velocity(
    transformer,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompt: PromptEmbeds,
    img_ids: torch.Tensor,
    *,
    masked: bool = True,
    attention: str = "sdpa",
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity v(x_t, t | prompt) for packed latents x_t (B, N, C*4); t in [0, 1] (the transformer scales it by 1000).

    With `masked`, the bool key mask is passed unless the host knows the batch has no padding left
    (`prompt.unpadded`, e.g. a trimmed batch of equal-length prompts): an all-True mask changes nothing, and
    without one SDPA may pick its flash kernel, which takes no mask. Deciding reads no device tensor.
    `attention` (ATTENTION) picks how the mask is applied; both give the same output within float rounding.
    `guidance` (B,): the scales a guidance-embedding transformer (a teacher) is fed; None for every other call.
    """
    dtype = x_t.dtype
    txt_ids = torch.zeros(prompt.t5.shape[1], 3, device=x_t.device, dtype=img_ids.dtype)
    need_mask = masked and not prompt.unpadded
    family = family_of_model(transformer)
    if attention not in family.attentions:
        raise ValueError(f"objective.attention: {attention} is not available for the {family.name} family "
                         f"(choose from {', '.join(family.attentions)})")
    if attention == "flex" and x_t.device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError("objective.attention: flex has no backward on CPU (PyTorch's FlexAttention); use sdpa")
    _use_backend(transformer, attention)
    key_mask = joint_attention_mask(prompt.mask, x_t.shape[1]) if need_mask else None
    if key_mask is not None and attention == "flex":
        key_mask = flex_block_mask(key_mask)
    extra = {} if guidance is None else {"guidance": guidance.to(dtype)}
    return family.call(
        transformer, x=x_t, t=t.to(dtype), t5=prompt.t5.to(dtype), pooled=prompt.pooled.to(dtype),
        key_mask=key_mask, img_ids=img_ids, txt_ids=txt_ids, **extra,
    )


def _flux2_norm(vae, z: torch.Tensor, inverse: bool) -> torch.Tensor:
    h, w = z.shape[-2:]
    f = denormalise_packed if inverse else normalise_packed
    return unpack_latents(f(vae, pack_latents(z)), h, w)


LATENT_NORMS = {
    # FLUX.1 / Chroma: a global shift and scale from the VAE config.
    "AutoencoderKL": lambda vae, z, inverse: (z / vae.config.scaling_factor + vae.config.shift_factor) if inverse
    else (z - vae.config.shift_factor) * vae.config.scaling_factor,
    # FLUX.2: per packed channel (2x2 patch), by the VAE's BatchNorm running statistics (train/flux2.py).
    "AutoencoderKLFlux2": _flux2_norm,
}
"""VAE class -> how its raw latents (B, C, H, W) are normalised for the transformer (inverse: back for decoding)."""


def normalise_latents(vae, latents: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    return LATENT_NORMS[type(vae).__name__](vae, latents, inverse)
