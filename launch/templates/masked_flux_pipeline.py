"""A FLUX pipeline that samples a dedistill export the way it was trained: T5 padding masked out of joint attention,
text trimmed to the longest prompt, and real classifier-free guidance (negative prompt, `true_cfg_scale`,
`cfg_skip_steps`, `cfg_rescale`).

`dedistill export --format diffusers` writes this file as `pipeline.py` into the export; load it with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)

Why not stock `FluxPipeline`: it passes no attention mask, so the model attends to up to 512 T5 padding states it
never saw in training (the image then depends on `max_sequence_length`), and its T5 runs without a mask.

A drop-in for `FluxPipeline`: it subclasses it and takes its arguments (`prompt`/`prompt_2` or lists of them,
`prompt_embeds` + `pooled_prompt_embeds`, `negative_*`, `num_images_per_prompt`, `sigmas`, `guidance_scale`,
`latents`, `callback_on_step_end`, `joint_attention_kwargs`, `output_type` pil / np (float32 in [0, 1], stacked) /
pt / latent (packed), `return_dict`). As in FluxPipeline, real CFG is off unless `true_cfg_scale` is set (pass
3.5 or so: a de-distilled model wants it); unlike it, no `negative_prompt` then means the empty prompt, the
unconditional input the model learned;
`prompt_attention_mask` / `negative_prompt_attention_mask` (ChromaPipeline's names) carry the T5 mask of passed
embeddings, and without them the mask is read back from the embeddings (`encode_prompt` zeroes the padding rows);
`guidance_scale` feeds the guidance embedder only where the transformer has one (`guidance_embeds`), as in
FluxPipeline; IP-Adapter inputs are not taken.

Self-contained (torch, numpy, PIL, diffusers only): the PIL image equals `dedistill sample --model DIR`'s pixel for
pixel (same seed, settings and dtype), step for step the same arithmetic. Seeds: `generator=torch.Generator()
.manual_seed(S)` draws the noise `dedistill sample --seed S` draws (fp32 on the CPU generator); for several prompts
pass a list of generators seeded S, S+1, ... to match `dedistill sample`'s per-image seeds. Sigmas come from this
export's scheduler config (`scheduler/scheduler_config.json`), as in FluxPipeline.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from PIL import Image

# How the model was trained; `dedistill export` writes the run's values here.
ATTENTION_MASK = True
MAX_TEXT_TOKENS = 512
VISIBLE_PADDING_TOKENS = 0  # objective.visible_padding_tokens: the first k pads after each prompt stay visible


def _as_list(prompt: str | list[str] | None, n: int) -> list[str] | None:
    return None if prompt is None else [prompt] * n if isinstance(prompt, str) else list(prompt)


def _pad_to(t5: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero states / masked-out columns up to `length`, so embeddings of different lengths stack."""
    extra = length - t5.shape[1]
    if extra <= 0:
        return t5, mask
    return (torch.cat([t5, t5.new_zeros(t5.shape[0], extra, t5.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


class DedistillFluxPipeline(FluxPipeline):
    @torch.no_grad()
    def encode_masked(self, prompts: list[str], *, max_tokens: int, masked: bool, device, prompts_2=None):
        """(T5 states (B, L, D), bool mask (B, L), CLIP pooled (B, D)); T5 runs with its mask and padding rows are
        zero, so a prompt's states do not depend on how much padding follows it. prompts_2 (default: prompts) go
        to T5, as FluxPipeline's prompt_2."""
        clip_len = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=clip_len, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_in = self.tokenizer_2(prompts_2 or prompts, padding="max_length", max_length=max_tokens, truncation=True,
                                 return_tensors="pt")
        mask = t5_in.attention_mask.to(device).bool()  # (B, L)
        ids = t5_in.input_ids.to(device)
        if not masked:
            return self.text_encoder_2(ids)[0], mask, pooled
        # T5 runs on the real tokens only; then the first k pads after each prompt join the mask with their own
        # states (Chroma's visible padding), as training saw them.
        states = self.text_encoder_2(ids, attention_mask=mask.long())[0]
        if VISIBLE_PADDING_TOKENS:
            pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
            mask = pos < mask.sum(1, keepdim=True) + VISIBLE_PADDING_TOKENS
        return states * mask[..., None].to(states.dtype), mask, pooled

    def _text(self, prompt, prompt_2, embeds, pooled, mask, *, n: int, masked: bool, max_tokens: int, device):
        """(T5 states, bool mask, pooled) of a prompt or of passed embeddings, each row repeated n times."""
        if embeds is None:
            prompts = _as_list(prompt, 1)
            embeds, mask, pooled = self.encode_masked(prompts, prompts_2=_as_list(prompt_2, len(prompts)),
                                                      max_tokens=max_tokens, masked=masked, device=device)
        elif mask is None:
            # encode_prompt zeroes the rows outside the mask; a real token's state is never all zero
            mask = (embeds != 0).any(dim=-1)
        return (embeds.repeat_interleave(n, 0), mask.to(embeds.device).bool().repeat_interleave(n, 0),
                pooled.repeat_interleave(n, 0))

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length: int = MAX_TEXT_TOKENS, lora_scale=None):
        """FluxPipeline's (prompt_embeds, pooled_prompt_embeds, text_ids), encoded as this model was trained: rows
        outside the T5 mask are zero, which is how `__call__` reads the mask back when the embeddings come without
        `prompt_attention_mask`. lora_scale is accepted for FluxPipeline's signature; text-encoder LoRA is not part
        of a dedistill export."""
        device = device or self._execution_device
        t5, _, pooled = self._text(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, None,
                                   n=num_images_per_prompt, masked=ATTENTION_MASK, max_tokens=max_sequence_length,
                                   device=device)
        text_ids = torch.zeros(t5.shape[1], 3, device=device, dtype=self.text_encoder.dtype)
        return t5, pooled, text_ids

    def _velocity(self, x, t, t5, mask, pooled, img_ids, guidance, *, masked: bool, dtype):
        txt_ids = torch.zeros(t5.shape[1], 3, device=x.device, dtype=img_ids.dtype)
        kwargs = dict(self.joint_attention_kwargs or {})
        if masked:
            # Bool, never float: SDPA adds a float mask to the scores, so a 0/1 float mask masks nothing.
            image = torch.ones(mask.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)
            kwargs["attention_mask"] = torch.cat([mask, image], dim=1)  # keys: [text; image]
        # diffusers' step caches (FirstBlockCache, MagCache, ...) keep one state per context: the CFG batch and the
        # conditional-only batch (cfg_skip_steps) differ in shape, so each gets its own.
        with self.transformer.cache_context(f"batch_{x.shape[0]}"):
            return self.transformer(
                hidden_states=x, timestep=t.to(dtype), pooled_projections=pooled.to(dtype),
                guidance=None if guidance is None else guidance[: x.shape[0]],
                encoder_hidden_states=t5.to(dtype), txt_ids=txt_ids, img_ids=img_ids,
                joint_attention_kwargs=kwargs or None, return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = MAX_TEXT_TOKENS,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        cfg_skip_steps: int = 0,
        cfg_rescale: float = 0.0,
        noise_temperature: float = 1.0,
        mask_text_padding: bool = ATTENTION_MASK,
    ):
        """FluxPipeline's arguments, plus: true_cfg_scale 1 is no guidance (one forward per step); cfg_skip_steps:
        no CFG for the first N steps; cfg_rescale in [0, 1] rescales the guided velocity's std toward the
        conditional one; noise_temperature multiplies the initial noise; prompt_attention_mask /
        negative_prompt_attention_mask: the T5 masks of passed embeddings; mask_text_padding: how the model was
        trained (leave the default)."""
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale: must be in [0, 1], got {cfg_rescale}")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds: required with negative_prompt_embeds")
        if (true_cfg_scale != 1.0 and prompt_embeds is not None and negative_prompt_embeds is not None
                and prompt_embeds.shape != negative_prompt_embeds.shape):  # FluxPipeline's check, same words
            raise ValueError(f"`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                             f"directly, but got: {prompt_embeds.shape} != {negative_prompt_embeds.shape}.")
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        n = num_images_per_prompt
        text = dict(n=n, masked=mask_text_padding, max_tokens=max_sequence_length, device=device)

        t5, mask, pooled = self._text(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask,
                                      **text)
        b = t5.shape[0]  # images
        guided = true_cfg_scale != 1.0
        if guided:
            # Prompts and negatives are encoded as two batches, then stacked [cond; uncond], as dedistill's sampler
            # does (one batch of 2B would round differently in the encoders).
            if negative_prompt_embeds is None:
                negative_prompt = _as_list("" if negative_prompt is None else negative_prompt, b // n)
                negative_prompt_2 = _as_list(negative_prompt_2, b // n)
                if len(negative_prompt) != b // n:
                    raise ValueError(f"negative_prompt: {len(negative_prompt)} prompts for {b // n} prompts")
            neg = self._text(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                             negative_pooled_prompt_embeds, negative_prompt_attention_mask, **text)
            if neg[0].shape[0] != b:
                raise ValueError(f"negative_prompt_embeds: {neg[0].shape[0]} rows for {b} images")
            length = max(t5.shape[1], neg[0].shape[1])
            (t5, mask), (neg_t5, neg_mask) = _pad_to(t5, mask, length), _pad_to(neg[0], neg[1], length)
            t5, mask, pooled = torch.cat([t5, neg_t5]), torch.cat([mask, neg_mask]), torch.cat([pooled, neg[2]])
        if mask_text_padding:
            # Drop columns that are padding in every row: exact under the mask, and the image no longer depends
            # on max_sequence_length.
            used = mask.any(dim=0).nonzero()
            longest = int(used.max().item()) + 1 if len(used) else 1
            t5, mask = t5[:, :longest], mask[:, :longest]
        t5, pooled = t5.to(device, dtype), pooled.to(device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:  # as FluxPipeline: a dev-style export keeps its input
            guidance = torch.full([t5.shape[0]], guidance_scale, device=device, dtype=torch.float32)

        # Noise: fp32 (dedistill's sampler draws fp32 and casts per step), scaled by the noise temperature.
        channels = self.transformer.config.in_channels // 4
        x, _ = self.prepare_latents(b, channels, height, width, torch.float32, device, generator, latents)
        if latents is None:
            x = x * noise_temperature
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))  # latent pixels, as prepare_latents
        img_ids = self._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)  # (N, 3)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            x.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096), self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        sigmas = self.scheduler.sigmas.to(device)
        x = x.to(device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i in range(num_inference_steps):
                if self.interrupt:
                    continue
                self._current_timestep = timesteps[i]
                t = sigmas[i].expand(b)
                if guided and i >= cfg_skip_steps:
                    v = self._velocity(torch.cat([x, x]).to(dtype), torch.cat([t, t]), t5, mask, pooled, img_ids,
                                       guidance, masked=mask_text_padding, dtype=dtype)
                    v_cond, v_uncond = v.float().chunk(2)
                    v = v_uncond + true_cfg_scale * (v_cond - v_uncond)
                    if cfg_rescale > 0:
                        dims = tuple(range(1, v.ndim))
                        factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
                        v = cfg_rescale * (v * factor) + (1 - cfg_rescale) * v
                else:
                    v = self._velocity(x.to(dtype), t, t5[:b], mask[:b], pooled[:b], img_ids, guidance,
                                       masked=mask_text_padding, dtype=dtype).float()
                x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler, in fp32
                if callback_on_step_end is not None:
                    state = {"latents": x, "prompt_embeds": t5[:b]}
                    out = callback_on_step_end(self, i, timesteps[i],
                                               {k: state[k] for k in callback_on_step_end_tensor_inputs})
                    x = out.pop("latents", x)
                    if "prompt_embeds" in out:
                        t5 = torch.cat([out.pop("prompt_embeds").to(device, dtype), t5[b:]])
                progress.update()
        self._current_timestep = None

        if output_type == "latent":
            images = x
        else:
            lat = self._unpack_latents(x, height, width, f)
            lat = lat / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(lat.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            if output_type == "pil":  # dedistill sample's rounding, so the PNGs are equal
                arr = (((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                       .permute(0, 2, 3, 1).cpu().numpy())
                images = [Image.fromarray(a) for a in arr]
            else:
                images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FluxPipelineOutput(images=images)
