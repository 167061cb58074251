"""FLUX.2 specifics ([dev] and [klein]): the transformer call with 4-axis ids, the stacked text features, the
32-channel VAE's BatchNorm normalisation and the model's own sampling schedule.

What differs from FLUX.1, and where it is handled:
- Ids are 4-axis (T, H, W, L) and shared by the batch (`Flux2Transformer2DModel.forward` keeps `ids[0]` of 3-D ids):
  text is (0, 0, 0, l), the image (0, h, w, 0). `call_flux2` builds both from the FLUX.1-shaped ids the common code
  passes (image (0, h, w), text zeros), so `train/flux.py` stays the one caller for every family.
- No pooled text input; `guidance=None` skips the guidance embedder even when `guidance_embeds` is true, which is the
  guidance-distilled [dev]'s embedder out of the graph.
- The mask is a bool key mask over [text; image] through `joint_attention_kwargs`, as FLUX.1's: the blocks hand it
  to the processors and diffusers' native SDPA backend expands a (B, S) mask to keys.
- Text features: hidden states of three layers of the causal text model, stacked per token (Mistral3 10/20/30 ->
  3 x 5120 = 15360 for [dev]; Qwen3 9/18/27 -> 3 x 4096 = 12288 for klein 9B). The family row lists the layers.
- Latents: the VAE's 32 channels, patchified 2x2 to 128 and normalised by the VAE's BatchNorm running statistics
  (`affine=False`) in the patchified space. `pack_latents` of FLUX.1 packs in the same (c, 2, 2) channel order as
  Flux2Pipeline's `_patchify_latents` + `_pack_latents`, so normalising per packed channel is the pipeline's.
"""

from __future__ import annotations

import torch


def flux2_ids(img_ids: torch.Tensor, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) FLUX.1 image ids (0, h, w) and a text length -> FLUX.2's (N, 4) image ids (0, h, w, 0) and (L, 4) text
    ids (0, 0, 0, l), as Flux2Pipeline's `_prepare_latent_ids` / `_prepare_text_ids` build them."""
    img4 = torch.nn.functional.pad(img_ids, (0, 1))  # (N, 4): L axis 0
    txt4 = torch.zeros(n_text, 4, device=img_ids.device, dtype=img_ids.dtype)
    txt4[:, 3] = torch.arange(n_text, device=img_ids.device, dtype=img_ids.dtype)
    return img4, txt4


def call_flux2(transformer, *, x, t, t5, pooled, key_mask, img_ids, txt_ids, guidance=None) -> torch.Tensor:
    """`t5` is the stacked text features (B, L, 3 x hidden); `pooled` is (B, 0) and unused (no pooled input).
    `guidance` None keeps the guidance embedder out of the graph (the default for a guidance-distilled [dev])."""
    img4, txt4 = flux2_ids(img_ids, t5.shape[1])
    kwargs = {"attention_mask": key_mask} if key_mask is not None else None
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=t5, img_ids=img4, txt_ids=txt4,
                       guidance=guidance, joint_attention_kwargs=kwargs, return_dict=False)[0]


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over the 4 x latent_channels packed channels, from the VAE's BatchNorm running statistics."""
    mean = vae.bn.running_mean.float()
    std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps)
    return mean, std


def normalise_packed(vae, packed: torch.Tensor) -> torch.Tensor:
    """(B, N, 4C) packed raw VAE latents -> normalised, as Flux2Pipeline's `_encode_vae_image`."""
    mean, std = bn_stats(vae)
    return (packed - mean.to(packed.device, packed.dtype)) / std.to(packed.device, packed.dtype)


def denormalise_packed(vae, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalise_packed`: what the VAE decodes (after unpacking), as Flux2Pipeline's decode path."""
    mean, std = bn_stats(vae)
    return packed * std.to(packed.device, packed.dtype) + mean.to(packed.device, packed.dtype)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift (the pipeline's `compute_empirical_mu`)."""
    # deferred: diffusers takes seconds to import; train.family (and so `dedistill --help`) imports this module
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
