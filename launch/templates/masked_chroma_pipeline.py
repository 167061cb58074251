"""A Chroma pipeline that samples a dedistill export the way it was trained: T5 padding masked out of joint attention,
text trimmed to the longest prompt, and real classifier-free guidance (negative prompt, `true_cfg_scale`,
`cfg_skip_steps`, `cfg_rescale`).

`dedistill export --format diffusers` writes this file as `pipeline.py` into the export; load it with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)

Why not stock `ChromaPipeline`: it builds its mask in the embeddings' float dtype and the blocks hand a float 0/1
(B, 1, S, S) mask to SDPA, which *adds* it to the scores: it masks nothing, so the model attends to every T5 padding
state (the image then depends on `max_sequence_length`). Here the same mask is bool, with the run's k visible pads
(`VISIBLE_PADDING_TOKENS`), and the padding states past them are zero, as in training.

Self-contained (torch, numpy, PIL, diffusers only): the image equals `dedistill sample --model DIR`'s pixel for pixel
(same seed, settings and dtype), step for step the same arithmetic. Seeds: `generator=torch.Generator().manual_seed(S)`
draws the noise `dedistill sample --seed S` draws (fp32 on the CPU generator); for several prompts pass a list of
generators seeded S, S+1, ... to match `dedistill sample`'s per-image seeds. Sigmas come from this export's scheduler
config (`scheduler/scheduler_config.json`), as in ChromaPipeline. Chroma has no CLIP and no guidance input.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ChromaPipeline
from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from diffusers.pipelines.chroma.pipeline_output import ChromaPipelineOutput
from PIL import Image

# How the model was trained; `dedistill export` writes the run's values here.
ATTENTION_MASK = True
MAX_TEXT_TOKENS = 512
VISIBLE_PADDING_TOKENS = 0  # objective.visible_padding_tokens: the first k pads after each prompt stay visible


class NoEmptyRowsProcessor(FluxAttnProcessor):
    """Chroma's blocks make the mask query AND key, so a masked text query attends to nothing, which some CUDA SDPA
    kernels turn into NaN (and NaN leaks through masked keys). Such a row attends everywhere instead: its output is
    never read, so every other output is unchanged. dedistill's trainer uses the same processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = attention_mask | ~attention_mask.any(dim=-1, keepdim=True)  # (B, 1, S, S)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class DedistillChromaPipeline(ChromaPipeline):
    def _no_empty_rows(self):
        """Install NoEmptyRowsProcessor (at call time: diffusers reads __init__'s signature to load a pipeline)."""
        for module in self.transformer.modules():
            if isinstance(module, FluxAttention) and not isinstance(module.processor, NoEmptyRowsProcessor):
                module.set_processor(NoEmptyRowsProcessor())

    @torch.no_grad()
    def encode_masked(self, prompts: list[str], *, max_tokens: int, masked: bool, device):
        """(T5 states (B, L, D), bool mask (B, L)); T5 runs with its mask and padding rows past the visible ones are
        zero, so a prompt's states do not depend on how much padding follows it."""
        t5_in = self.tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True,
                               return_tensors="pt")
        mask = t5_in.attention_mask.to(device).bool()  # (B, L)
        ids = t5_in.input_ids.to(device)
        if not masked:
            return self.text_encoder(ids)[0], mask
        # T5 runs on the real tokens only; then the first k pads after each prompt join the mask with their own
        # states (Chroma's visible padding), as training saw them.
        states = self.text_encoder(ids, attention_mask=mask.long())[0]
        if VISIBLE_PADDING_TOKENS:
            pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
            mask = pos < mask.sum(1, keepdim=True) + VISIBLE_PADDING_TOKENS
        return states * mask[..., None].to(states.dtype), mask

    def _velocity(self, x, t, t5, mask, img_ids, *, masked: bool, dtype):
        txt_ids = torch.zeros(t5.shape[1], 3, device=x.device, dtype=img_ids.dtype)
        key_mask = None
        if masked:
            # Bool, never float: SDPA adds a float mask to the scores, so a 0/1 float mask masks nothing. The
            # blocks make it (B, 1, S, S) as key AND query; bool stays bool.
            image = torch.ones(mask.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)
            key_mask = torch.cat([mask, image], dim=1)  # [text; image]
        return self.transformer(
            hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=t5.to(dtype), txt_ids=txt_ids,
            img_ids=img_ids, attention_mask=key_mask, return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        true_cfg_scale: float = 3.5,
        num_inference_steps: int = 28,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = MAX_TEXT_TOKENS,
        cfg_skip_steps: int = 0,
        cfg_rescale: float = 0.0,
        noise_temperature: float = 1.0,
        mask_text_padding: bool = ATTENTION_MASK,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """true_cfg_scale 1 is no guidance (one forward per step); cfg_skip_steps: no CFG for the first N steps;
        cfg_rescale in [0, 1] rescales the guided velocity's std toward the conditional one; mask_text_padding: how
        the model was trained (leave the default). output_type: pil | np (uint8) | latent (packed)."""
        self._no_empty_rows()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != b:
            raise ValueError(f"negative_prompt: {len(negatives)} prompts for {b} prompts")
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"height/width: must be multiples of {2 * f}, got {height}x{width}")
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale: must be in [0, 1], got {cfg_rescale}")
        device = self._execution_device
        dtype = self.transformer.dtype
        h, w = height // f, width // f  # latent pixels

        # Noise: fp32 (dedistill's sampler draws fp32 and casts per step), scaled by the noise temperature.
        channels = self.transformer.config.in_channels // 4
        x, img_ids = self.prepare_latents(b, channels, height, width, torch.float32, device, generator, latents)
        if latents is None:
            x = x * noise_temperature
        img_ids = self._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)  # (N, 3)

        guided = true_cfg_scale != 1.0
        # Prompts and negatives are encoded as two batches, then stacked [cond; uncond], as dedistill's sampler does
        # (one batch of 2B would round differently in the encoders).
        enc = [self.encode_masked(p, max_tokens=max_sequence_length, masked=mask_text_padding, device=device)
               for p in ([prompts, negatives] if guided else [prompts])]
        t5, mask = (torch.cat(parts) for parts in zip(*enc))
        if mask_text_padding:
            # Drop columns that are padding in every row: exact under the mask, and the image no longer depends
            # on max_sequence_length.
            longest = max(int(mask.sum(1).max().item()), 1)
            t5, mask = t5[:, :longest], mask[:, :longest]
        t5 = t5.to(device, dtype)

        self.scheduler.set_timesteps(
            sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), device=device,
            mu=calculate_shift(
                x.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096), self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.15),
            ),
        )
        sigmas = self.scheduler.sigmas.to(device)
        x = x.to(device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i in range(num_inference_steps):
                t = sigmas[i].expand(b)
                if guided and i >= cfg_skip_steps:
                    v = self._velocity(torch.cat([x, x]).to(dtype), torch.cat([t, t]), t5, mask, img_ids,
                                       masked=mask_text_padding, dtype=dtype)
                    v_cond, v_uncond = v.float().chunk(2)
                    v = v_uncond + true_cfg_scale * (v_cond - v_uncond)
                    if cfg_rescale > 0:
                        dims = tuple(range(1, v.ndim))
                        factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
                        v = cfg_rescale * (v * factor) + (1 - cfg_rescale) * v
                else:
                    v = self._velocity(x.to(dtype), t, t5[:b], mask[:b], img_ids,
                                       masked=mask_text_padding, dtype=dtype).float()
                x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler, in fp32
                progress.update()

        if output_type == "latent":
            images = x
        else:
            c = x.shape[2] // 4
            lat = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)  # unpack
            lat = lat / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(lat.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            arr = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = list(arr) if output_type == "np" else [Image.fromarray(a) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ChromaPipelineOutput(images=images)
