"""A Chroma pipeline that samples a dedistill export the way it was trained: T5 padding masked out of joint attention,
text trimmed to the longest prompt, and real classifier-free guidance (negative prompt, `guidance_scale` or its
alias `true_cfg_scale`, `cfg_skip_steps`, `cfg_rescale`).

`dedistill export --format diffusers` writes this file as `pipeline.py` into the export; load it with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)

Why not stock `ChromaPipeline`: it builds its mask in the embeddings' float dtype and the blocks hand a float 0/1
(B, 1, S, S) mask to SDPA, which *adds* it to the scores: it masks nothing, so the model attends to every T5 padding
state (the image then depends on `max_sequence_length`). Here the same mask is bool, with the run's k visible pads
(`VISIBLE_PADDING_TOKENS`), and the padding states past them are zero, as in training.

A drop-in for `ChromaPipeline`: it subclasses it and takes its arguments (`prompt` or a list, `negative_prompt`,
`prompt_embeds` / `negative_prompt_embeds` with `prompt_attention_mask` / `negative_prompt_attention_mask`,
`num_images_per_prompt`, `sigmas`, `guidance_scale` (the real-CFG scale, as in ChromaPipeline), `latents`,
`callback_on_step_end`, `joint_attention_kwargs`, `output_type` pil / np (float32 in [0, 1], stacked) / pt / latent
(packed), `return_dict`). Differences: the defaults are dedistill's (28 steps, scale 3.5); passed embeddings may
come without their mask, which is then read back from them (`encode_prompt` zeroes the rows outside it); any passed
mask is used as bool; IP-Adapter inputs are not taken.

Self-contained (torch, numpy, PIL, diffusers only): the PIL image equals `dedistill sample --model DIR`'s pixel for
pixel (same seed, settings and dtype), step for step the same arithmetic. Seeds: `generator=torch.Generator()
.manual_seed(S)` draws the noise `dedistill sample --seed S` draws (fp32 on the CPU generator); for several prompts
pass a list of generators seeded S, S+1, ... to match `dedistill sample`'s per-image seeds. Sigmas come from this
export's scheduler config (`scheduler/scheduler_config.json`), as in ChromaPipeline. Chroma has no CLIP and no
guidance input.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import ChromaPipeline
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift, retrieve_timesteps
from diffusers.pipelines.chroma.pipeline_output import ChromaPipelineOutput
from PIL import Image

# How the model was trained; `dedistill export` writes the run's values here.
ATTENTION_MASK = True
MAX_TEXT_TOKENS = 512
VISIBLE_PADDING_TOKENS = 0  # objective.visible_padding_tokens: the first k pads after each prompt stay visible


def _as_list(prompt: str | list[str] | None, n: int) -> list[str] | None:
    return None if prompt is None else [prompt] * n if isinstance(prompt, str) else list(prompt)


def _mask_of(embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A passed mask as bool; without one, read back from the embeddings (encode_prompt zeroes the rows outside the
    mask; a real token's state is never all zero)."""
    if embeds is None:
        return mask
    return (embeds != 0).any(dim=-1) if mask is None else mask.to(embeds.device).bool()


def _pad_to(t5: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero states / masked-out columns up to `length`, so embeddings of different lengths stack."""
    extra = length - t5.shape[1]
    if extra <= 0:
        return t5, mask
    return (torch.cat([t5, t5.new_zeros(t5.shape[0], extra, t5.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


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

    def _text(self, prompt, embeds, mask, *, n: int, masked: bool, max_tokens: int, device):
        """(T5 states, bool mask) of a prompt or of passed embeddings, each row repeated n times."""
        if embeds is None:
            embeds, mask = self.encode_masked(_as_list(prompt, 1), max_tokens=max_tokens, masked=masked,
                                              device=device)
        mask = _mask_of(embeds, mask)
        return embeds.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)

    def encode_prompt(self, prompt, negative_prompt=None, device=None, num_images_per_prompt: int = 1,
                      prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_attention_mask=None, do_classifier_free_guidance: bool = True,
                      max_sequence_length: int = MAX_TEXT_TOKENS, lora_scale=None):
        """ChromaPipeline's six outputs (embeds, text_ids, mask, and the negative's), encoded as this model was
        trained: bool masks, rows outside them zero. lora_scale is accepted for ChromaPipeline's signature;
        text-encoder LoRA is not part of a dedistill export."""
        device = device or self._execution_device
        text = dict(n=num_images_per_prompt, masked=ATTENTION_MASK, max_tokens=max_sequence_length, device=device)
        t5, mask = self._text(prompt, prompt_embeds, prompt_attention_mask, **text)
        text_ids = torch.zeros(t5.shape[1], 3, device=device, dtype=self.text_encoder.dtype)
        neg_t5 = neg_mask = neg_ids = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt = _as_list(negative_prompt or "", t5.shape[0] // num_images_per_prompt)
            neg_t5, neg_mask = self._text(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask,
                                          **text)
            neg_ids = torch.zeros(neg_t5.shape[1], 3, device=device, dtype=self.text_encoder.dtype)
        return t5, text_ids, mask, neg_t5, neg_ids, neg_mask

    def _velocity(self, x, t, t5, mask, img_ids, *, masked: bool, dtype):
        txt_ids = torch.zeros(t5.shape[1], 3, device=x.device, dtype=img_ids.dtype)
        key_mask = None
        if masked:
            # Bool, never float: SDPA adds a float mask to the scores, so a 0/1 float mask masks nothing. The
            # blocks make it (B, 1, S, S) as key AND query; bool stays bool.
            image = torch.ones(mask.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)
            key_mask = torch.cat([mask, image], dim=1)  # [text; image]
        # diffusers' step caches (FirstBlockCache, MagCache, ...) keep one state per context: the CFG batch and the
        # conditional-only batch (cfg_skip_steps) differ in shape, so each gets its own.
        with self.transformer.cache_context(f"batch_{x.shape[0]}"):
            return self.transformer(
                hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=t5.to(dtype), txt_ids=txt_ids,
                img_ids=img_ids, attention_mask=key_mask, joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = MAX_TEXT_TOKENS,
        true_cfg_scale: float | None = None,
        cfg_skip_steps: int = 0,
        cfg_rescale: float = 0.0,
        noise_temperature: float = 1.0,
        mask_text_padding: bool = ATTENTION_MASK,
    ):
        """ChromaPipeline's arguments, plus: true_cfg_scale (FluxPipeline's name) replaces guidance_scale when
        given; scale 1 is no guidance (one forward per step); cfg_skip_steps: no CFG for the first N steps;
        cfg_rescale in [0, 1] rescales the guided velocity's std toward the conditional one; noise_temperature
        multiplies the initial noise; mask_text_padding: how the model was trained (leave the default)."""
        self._no_empty_rows()
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        prompt_attention_mask = _mask_of(prompt_embeds, prompt_attention_mask)
        negative_prompt_attention_mask = _mask_of(negative_prompt_embeds, negative_prompt_attention_mask)
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          prompt_attention_mask=prompt_attention_mask, negative_prompt_embeds=negative_prompt_embeds,
                          negative_prompt_attention_mask=negative_prompt_attention_mask,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale: must be in [0, 1], got {cfg_rescale}")
        self._guidance_scale = guidance_scale if true_cfg_scale is None else true_cfg_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        n = num_images_per_prompt
        text = dict(n=n, masked=mask_text_padding, max_tokens=max_sequence_length, device=device)

        t5, mask = self._text(prompt, prompt_embeds, prompt_attention_mask, **text)
        b = t5.shape[0]  # images
        guided = self.guidance_scale != 1.0
        if guided:
            # Prompts and negatives are encoded as two batches, then stacked [cond; uncond], as dedistill's sampler
            # does (one batch of 2B would round differently in the encoder).
            if negative_prompt_embeds is None:
                negative_prompt = _as_list("" if negative_prompt is None else negative_prompt, b // n)
                if len(negative_prompt) != b // n:
                    raise ValueError(f"negative_prompt: {len(negative_prompt)} prompts for {b // n} prompts")
            neg_t5, neg_mask = self._text(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask,
                                          **text)
            if neg_t5.shape[0] != b:
                raise ValueError(f"negative_prompt_embeds: {neg_t5.shape[0]} rows for {b} images")
            length = max(t5.shape[1], neg_t5.shape[1])
            (t5, mask), (neg_t5, neg_mask) = _pad_to(t5, mask, length), _pad_to(neg_t5, neg_mask, length)
            t5, mask = torch.cat([t5, neg_t5]), torch.cat([mask, neg_mask])
        if mask_text_padding:
            # Drop columns that are padding in every row: exact under the mask, and the image no longer depends
            # on max_sequence_length.
            used = mask.any(dim=0).nonzero()
            longest = int(used.max().item()) + 1 if len(used) else 1
            t5, mask = t5[:, :longest], mask[:, :longest]
        t5 = t5.to(device, dtype)

        # Noise: fp32 (dedistill's sampler draws fp32 and casts per step), scaled by the noise temperature.
        channels = self.transformer.config.in_channels // 4
        x, _ = self.prepare_latents(b, channels, height, width, torch.float32, device, generator, latents)
        if latents is None:
            x = x * noise_temperature
        h, w = 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))  # latent pixels, as prepare_latents
        img_ids = self._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)  # (N, 3)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
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
                    v = self._velocity(torch.cat([x, x]).to(dtype), torch.cat([t, t]), t5, mask, img_ids,
                                       masked=mask_text_padding, dtype=dtype)
                    v_cond, v_uncond = v.float().chunk(2)
                    # read each step, as ChromaPipeline does, so a step-end callback can change it
                    v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
                    if cfg_rescale > 0:
                        dims = tuple(range(1, v.ndim))
                        factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
                        v = cfg_rescale * (v * factor) + (1 - cfg_rescale) * v
                else:
                    v = self._velocity(x.to(dtype), t, t5[:b], mask[:b], img_ids,
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
        return ChromaPipelineOutput(images=images)
