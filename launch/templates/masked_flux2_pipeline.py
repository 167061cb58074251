"""A FLUX.2 pipeline ([dev] or [klein]) that samples a dedistill export the way it was trained: the text padding masked
out of joint attention, the text trimmed to the longest prompt, real classifier-free guidance (negative prompt,
`true_cfg_scale`, `cfg_skip_steps`, `cfg_rescale`) and the model's own schedule (FLUX.2's empirical mu).

`dedistill export --format diffusers` writes this file as `pipeline.py` into the export; load it with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)

Why not stock `Flux2Pipeline` / `Flux2KleinPipeline`: they pad the text to 512 tokens and pass no attention mask, so
the model attends to padding states it never saw in training, and Flux2Pipeline has no negative prompt (no real CFG).

It subclasses the stock pipeline of the export's family (`STOCK_PIPELINE`, written by the export) and takes the
FLUX.1 export's arguments: `prompt` (or a list), `negative_prompt`, `true_cfg_scale` (1: no CFG, one forward per
step; a de-distilled model wants 3.5 or so; no `negative_prompt` then means the empty prompt, the unconditional input
the model learned), `cfg_skip_steps`, `cfg_rescale`, `noise_temperature`, `mask_text_padding`, `prompt_embeds` /
`negative_prompt_embeds` with `prompt_attention_mask` / `negative_prompt_attention_mask` (without them the mask is
read back from the embeddings: `encode_prompt` zeroes the padding rows), `num_images_per_prompt`, `sigmas`,
`guidance_scale` (fed to the guidance embedder only where the transformer has one, `guidance_embeds`),
`latents` (packed, (B, N, 128)), `callback_on_step_end`, `joint_attention_kwargs` (or Flux2Pipeline's name,
`attention_kwargs`), `output_type` pil / np / pt / latent (packed), `return_dict`. Image conditioning (`image`) and
caption upsampling are not taken.

Self-contained (torch, numpy, PIL, diffusers only): the PIL image equals `dedistill sample --model DIR`'s pixel for
pixel (same seed, settings and dtype), step for step the same arithmetic. Seeds: `generator=torch.Generator()
.manual_seed(S)` draws the noise `dedistill sample --seed S` draws (fp32, (1, 32, H/8, W/8) on the CPU generator,
then packed 2x2); for several prompts pass a list of generators seeded S, S+1, ... Sigmas come from this export's
scheduler config (`scheduler/scheduler_config.json`) with mu = compute_empirical_mu(image tokens, steps), as in
Flux2Pipeline.
"""

from __future__ import annotations

from typing import Any, Callable

import diffusers
import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import (SYSTEM_MESSAGE, compute_empirical_mu, format_input,
                                                      retrieve_timesteps)
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from PIL import Image

# How the model was trained; `dedistill export` writes the run's values here.
ATTENTION_MASK = True
MAX_TEXT_TOKENS = 512
VISIBLE_PADDING_TOKENS = 0  # objective.visible_padding_tokens: the first k pads after each prompt stay visible
STOCK_PIPELINE = "Flux2Pipeline"  # the family's stock pipeline: Flux2Pipeline ([dev]) or Flux2KleinPipeline
TEXT_LAYERS = (10, 20, 30)  # hidden states of the text model stacked per token ([dev]: Mistral3; [klein]: Qwen3)


def _as_list(prompt: str | list[str] | None, n: int) -> list[str] | None:
    return None if prompt is None else [prompt] * n if isinstance(prompt, str) else list(prompt)


def _pad_to(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero states / masked-out columns up to `length`, so embeddings of different lengths stack."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    return (torch.cat([states, states.new_zeros(states.shape[0], extra, states.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


def _chat(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt wrapped as the stock pipeline wraps it before tokenising."""
    if STOCK_PIPELINE == "Flux2KleinPipeline":  # one user turn, generation prompt, thinking off
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              enable_thinking=False, tokenize=False) for p in prompts]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=False, tokenize=False)
            for m in format_input(prompts=prompts, system_message=SYSTEM_MESSAGE)]


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, C*4), the 2x2 patches in (c, 2, 2) order (Flux2Pipeline's patchify + pack)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `_pack`, h and w in latent pixels."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class DedistillFlux2Pipeline(getattr(diffusers, STOCK_PIPELINE)):
    @torch.no_grad()
    def encode_masked(self, prompts: list[str], *, max_tokens: int, masked: bool, device):
        """(stacked text features (B, L, 3 x hidden), bool mask (B, L)). Padded on the right, so the real tokens
        are a prefix and a causal model's states of a prompt do not depend on the padding after it; masked: the
        padding rows are zero (and the first VISIBLE_PADDING_TOKENS pads stay visible, as training saw them)."""
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's tokenizer
        tokens = tokenizer(_chat(tokenizer, prompts), truncation=True, max_length=max_tokens,
                           add_special_tokens=False, padding="max_length", padding_side="right", return_tensors="pt")
        mask = tokens.attention_mask.to(device).bool()
        out = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask.long(),
                                output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=2).flatten(2)  # layer-major per token
        if not masked:
            return states, mask
        if VISIBLE_PADDING_TOKENS:
            pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
            mask = pos < mask.sum(1, keepdim=True) + VISIBLE_PADDING_TOKENS
        return states * mask[..., None].to(states.dtype), mask

    def _text(self, prompt, embeds, mask, *, n: int, masked: bool, max_tokens: int, device):
        """(text features, bool mask) of a prompt or of passed embeddings, each row repeated n times."""
        if embeds is None:
            embeds, mask = self.encode_masked(_as_list(prompt, 1), max_tokens=max_tokens, masked=masked,
                                              device=device)
        elif mask is None:
            # encode_prompt zeroes the rows outside the mask; a real token's state is never all zero
            mask = (embeds != 0).any(dim=-1)
        return embeds.repeat_interleave(n, 0), mask.to(embeds.device).bool().repeat_interleave(n, 0)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      max_sequence_length: int = MAX_TEXT_TOKENS, text_encoder_out_layers=None, **kwargs):
        """The stock (prompt_embeds, text_ids), encoded as this model was trained: rows outside the mask are zero,
        which is how `__call__` reads the mask back when the embeddings come without `prompt_attention_mask`.
        The stacked layers are the export's (TEXT_LAYERS): `text_encoder_out_layers` is accepted and ignored."""
        device = device or self._execution_device
        states, _ = self._text(prompt, prompt_embeds, None, n=num_images_per_prompt, masked=ATTENTION_MASK,
                               max_tokens=max_sequence_length, device=device)
        return states, self._text_ids(states.shape[1], device, states.dtype)[None].expand(states.shape[0], -1, -1)

    @staticmethod
    def _text_ids(n: int, device, dtype) -> torch.Tensor:
        ids = torch.zeros(n, 4, device=device, dtype=dtype)  # (T, H, W, L) = (0, 0, 0, l)
        ids[:, 3] = torch.arange(n, device=device, dtype=dtype)
        return ids

    @staticmethod
    def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """(h/2 * w/2, 4) ids (0, row, column, 0) of the packed latent grid (h, w in latent pixels)."""
        ids = torch.zeros(h // 2, w // 2, 4, device=device, dtype=dtype)
        ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        return ids.reshape(-1, 4)

    def _bn(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's BatchNorm running statistics over the 128 packed channels."""
        mean = self.vae.bn.running_mean.float()
        std = torch.sqrt(self.vae.bn.running_var.float() + self.vae.config.batch_norm_eps)
        return mean, std

    def _velocity(self, x, t, states, mask, img_ids, guidance, *, masked: bool, dtype, kwargs):
        txt_ids = self._text_ids(states.shape[1], x.device, img_ids.dtype)
        kwargs = dict(kwargs or {})
        # An all-True mask changes nothing; left out, as dedistill's sampler leaves it out (same kernels).
        if masked and not bool(mask.all()):
            # Bool, never float: SDPA adds a float mask to the scores, so a 0/1 float mask masks nothing.
            image = torch.ones(mask.shape[0], x.shape[1], dtype=torch.bool, device=mask.device)
            kwargs["attention_mask"] = torch.cat([mask, image], dim=1)  # keys: [text; image]
        # diffusers' step caches keep one state per context: the CFG batch and the conditional-only batch
        # (cfg_skip_steps) differ in shape, so each gets its own.
        with self.transformer.cache_context(f"batch_{x.shape[0]}"):
            return self.transformer(
                hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=states.to(dtype), img_ids=img_ids,
                txt_ids=txt_ids, guidance=None if guidance is None else guidance[: x.shape[0]],
                joint_attention_kwargs=kwargs or None, return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
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
        """The stock pipeline's text-to-image arguments, plus: true_cfg_scale 1 is no guidance (one forward per
        step); cfg_skip_steps: no CFG for the first N steps; cfg_rescale in [0, 1] rescales the guided velocity's
        std toward the conditional one; noise_temperature multiplies the initial noise; prompt_attention_mask /
        negative_prompt_attention_mask: the masks of passed embeddings; mask_text_padding: how the model was trained
        (leave the default)."""
        f = self.vae_scale_factor
        height = height or self.default_sample_size * f
        width = width or self.default_sample_size * f
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"height, width: must be multiples of {2 * f}, got {height} x {width}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt, prompt_embeds: pass exactly one")
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale: must be in [0, 1], got {cfg_rescale}")
        if joint_attention_kwargs is not None and attention_kwargs is not None:
            raise ValueError("joint_attention_kwargs, attention_kwargs: pass one (they are the same)")
        kwargs = joint_attention_kwargs if joint_attention_kwargs is not None else attention_kwargs
        self._guidance_scale = guidance_scale
        self._attention_kwargs = kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        n = num_images_per_prompt
        text = dict(n=n, masked=mask_text_padding, max_tokens=max_sequence_length, device=device)

        states, mask = self._text(prompt, prompt_embeds, prompt_attention_mask, **text)
        b = states.shape[0]  # images
        guided = true_cfg_scale != 1.0
        if guided:
            # Prompts and negatives are encoded as two batches, then stacked [cond; uncond], as dedistill's sampler
            # does (one batch of 2B could round differently in the text model).
            if negative_prompt_embeds is None:
                negative_prompt = _as_list("" if negative_prompt is None else negative_prompt, b // n)
                if len(negative_prompt) != b // n:
                    raise ValueError(f"negative_prompt: {len(negative_prompt)} prompts for {b // n} prompts")
            neg = self._text(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask, **text)
            if neg[0].shape[0] != b:
                raise ValueError(f"negative_prompt_embeds: {neg[0].shape[0]} rows for {b} images")
            length = max(states.shape[1], neg[0].shape[1])
            (states, mask), neg = _pad_to(states, mask, length), _pad_to(neg[0], neg[1], length)
            states, mask = torch.cat([states, neg[0]]), torch.cat([mask, neg[1]])
        if mask_text_padding:
            # Drop columns that are padding in every row: exact under the mask, and the image no longer depends
            # on max_sequence_length.
            used = mask.any(dim=0).nonzero()
            longest = int(used.max().item()) + 1 if len(used) else 1
            states, mask = states[:, :longest], mask[:, :longest]
        states = states.to(device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:  # as Flux2Pipeline: a [dev] export that kept its embedder
            guidance = torch.full([states.shape[0]], guidance_scale, device=device, dtype=torch.float32)

        # Noise: fp32 (dedistill's sampler draws fp32 and casts per step), (1, C, h, w) per image then packed,
        # scaled by the noise temperature.
        h, w = int(height) // f, int(width) // f  # latent pixels
        channels = self.vae.config.latent_channels
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * b
            if len(gens) != b:
                raise ValueError(f"generator: {len(gens)} generators for {b} images")
            noise = torch.cat([torch.randn((1, channels, h, w), generator=g, dtype=torch.float32) for g in gens])
            x = _pack(noise * noise_temperature)
        else:
            x = latents.float()
        x = x.to(device)
        img_ids = self._image_ids(h, w, device, dtype)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=x.shape[1], num_steps=num_inference_steps)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        sigmas = self.scheduler.sigmas.to(device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i in range(num_inference_steps):
                if self.interrupt:
                    continue
                self._current_timestep = timesteps[i]
                t = sigmas[i].expand(b)
                if guided and i >= cfg_skip_steps:
                    v = self._velocity(torch.cat([x, x]).to(dtype), torch.cat([t, t]), states, mask, img_ids,
                                       guidance, masked=mask_text_padding, dtype=dtype, kwargs=kwargs)
                    v_cond, v_uncond = v.float().chunk(2)
                    v = v_uncond + true_cfg_scale * (v_cond - v_uncond)
                    if cfg_rescale > 0:
                        dims = tuple(range(1, v.ndim))
                        factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-8)
                        v = cfg_rescale * (v * factor) + (1 - cfg_rescale) * v
                else:
                    v = self._velocity(x.to(dtype), t, states[:b], mask[:b], img_ids, guidance,
                                       masked=mask_text_padding, dtype=dtype, kwargs=kwargs).float()
                x = x + (sigmas[i + 1] - sigmas[i]) * v  # Euler, in fp32
                if callback_on_step_end is not None:
                    state = {"latents": x, "prompt_embeds": states[:b]}
                    out = callback_on_step_end(self, i, timesteps[i],
                                               {k: state[k] for k in callback_on_step_end_tensor_inputs})
                    x = out.pop("latents", x)
                    if "prompt_embeds" in out:
                        states = torch.cat([out.pop("prompt_embeds").to(device, dtype), states[b:]])
                progress.update()
        self._current_timestep = None

        if output_type == "latent":
            images = x
        else:
            mean, std = self._bn()  # the VAE's BatchNorm statistics, undone per packed channel
            lat = _unpack(x * std.to(x.device, x.dtype) + mean.to(x.device, x.dtype), h, w)
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
        return Flux2PipelineOutput(images=images)
