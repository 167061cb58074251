#!/usr/bin/env python
"""Training-step benchmark: this project's real step against a diffusers-example step, on the same batches.

    python bench/train_step.py --tiny                       # tiny architecture on CPU, a few steps (CI)
    python bench/train_step.py --size full                  # FLUX.1-schnell size on one GPU: 512² and 1024²
    python bench/train_step.py --size full --modes lora,baseline --resolutions 512 --compile --ac ops

Ours (modes lora, lokr, full) is the trainer's code path: `apply_adapter` (LoRA r16 / LoKr / everything trains),
fp32 trainable parameters, FSDP2 at world size 1 (`parallelize_transformer`, optional AC and per-block compile),
`train.step.forward_backward_step` (caption dropout, timesteps, flow-matching MSE, bool joint mask, text trimmed to
the batch's longest prompt), then grad-norm clipping and the trainer's AdamW. No checkpoints are written. Only the
VAE and the text encoders are replaced: the batch already holds latents and the "text encoder" hands out
precomputed-like T5 states of realistic prompt lengths (padded to 512 tokens, as `TextEncoder` does).

Baseline (mode baseline) is the step of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py with its
defaults: `transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", 12 target modules))`,
the base model cast to bf16, no compile, no gradient checkpointing (a flag, off by default), unmasked 512-token T5
input, uniform timesteps looked up in the scheduler (one `.item()` per sample), autocast, AdamW(weight_decay=1e-4),
clip 1.0, and `loss.item()` for its progress bar every step. It gets the same latents and T5 states.

Weights are random (meta device -> `to_empty` -> init): speed does not depend on them and nothing is downloaded.
The MFU convention is train/mfu.py's (docs/performance.md). Prints a header and one markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from train.config import AdapterConfig, ObjectiveConfig, OptimConfig, ParallelConfig  # noqa: E402
from train.flux import LATENT_NORMS  # noqa: E402
from train.mfu import flops_model, mfu, peak_flops  # noqa: E402
from train.text import PromptEmbeds  # noqa: E402

FLUX1_SCHNELL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


@dataclass(frozen=True, kw_only=True)
class BenchSize:
    arch: dict
    """FluxTransformer2DModel config."""
    resolutions: tuple[int, ...]
    batch: dict[int, int]
    """Micro-batch per resolution (the diffusers example defaults to 4)."""
    warmup: int
    steps: int
    latent_channels: int = 16
    text_tokens: int = 512
    prompt_median: int = 96
    """Median T5 length of a caption in tokens (log-normal spread, see `prompt_lengths`)."""


SIZES: dict[str, BenchSize] = {
    "tiny": BenchSize(
        arch=dict(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),
        resolutions=(64, 128),
        batch={64: 2, 128: 2},
        warmup=1,
        steps=2,
    ),
    "full": BenchSize(arch=FLUX1_SCHNELL, resolutions=(512, 1024), batch={512: 4, 1024: 1}, warmup=3, steps=10),
}

MODES = ("lora", "lokr", "full", "baseline")
EXAMPLE_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
COLUMNS = ["mode", "res", "batch", "tokens", "step_ms", "img_per_s", "peak_mem_GiB", "TFLOP_per_s", "MFU_%", "loss",
           "vs_baseline"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: latents and precomputed-like T5 states


def prompt_lengths(n: int, *, median: int, max_tokens: int, seed: int) -> list[int]:
    """T5 token counts (with </s>) of n captions: log-normal around `median` (σ = 0.5 in log space: half of the
    captions within ~0.7–1.4× the median), clipped to [8, max_tokens]. Recaptioned data sets run 60–200 tokens."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(min(max(round(median * math.exp(0.5 * v)), 8), max_tokens)) for v in z.tolist()]


class LatentsAsPixels:
    """Stands in for the VAE: the batch's "pixels" already are normalised latents (a precomputed data set)."""

    config = SimpleNamespace(shift_factor=0.0, scaling_factor=1.0)

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def encode(self, latents: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=latents, std=latents.new_zeros(())))


# normalised as AutoencoderKL's latents are (shift 0, scale 1: unchanged)
LATENT_NORMS[LatentsAsPixels.__name__] = LATENT_NORMS["AutoencoderKL"]


class PrecomputedText:
    """Stands in for `train.text.TextEncoder`: T5 states on the device, padded to `max_tokens`, for captions whose
    lengths are known. masked=True zeroes the padding rows as TextEncoder does; masked=False leaves them as an
    unmasked T5 would (non-zero)."""

    def __init__(self, lengths: dict[str, int], *, t5_dim: int, pooled_dim: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.lengths, self.device = lengths, device
        self.bank = torch.randn(max_tokens, t5_dim, generator=g).to(device, dtype)  # (L, D)
        self.pooled = torch.randn(pooled_dim, generator=g).to(device, dtype)

    def encode(self, prompts: list[str], *, max_tokens: int, masked: bool = True,
               visible_padding: int = 0) -> PromptEmbeds:
        # "" is </s> only: 1 token; visible pads (objective.visible_padding_tokens) count as kept tokens
        n = torch.tensor([min(self.lengths.get(p, 1) + (visible_padding if masked else 0), max_tokens)
                          for p in prompts])
        mask = (torch.arange(max_tokens)[None] < n[:, None]).to(self.device, non_blocking=True)  # (B, L)
        states = self.bank[:max_tokens].expand(len(prompts), -1, -1)  # (B, L, D)
        states = states * mask[..., None].to(states.dtype) if masked else states.clone()
        return PromptEmbeds(states, mask, self.pooled.expand(len(prompts), -1).clone(), tuple(n.tolist()))

    def empty(self, *, max_tokens: int, masked: bool = True, visible_padding: int = 0) -> PromptEmbeds:
        return self.encode([""], max_tokens=max_tokens, masked=masked, visible_padding=visible_padding)


def make_batches(size: BenchSize, res: int, batch: int, *, n: int, median: int, seed: int,
                 length_grouping: bool = False) -> tuple[list[dict], dict]:
    """n batches of {"pixels": (B, C, res/8, res/8) latents, "caption": [...]} and the caption -> length table.
    length_grouping: the n batches' captions regrouped by length, as `data.length_grouping` with window n does."""
    g = torch.Generator().manual_seed(seed)
    lat = res // 8
    lengths = prompt_lengths(n * batch, median=median, max_tokens=size.text_tokens, seed=seed + 1)
    table = {f"caption-{i}": length for i, length in enumerate(lengths)}
    captions = [[f"caption-{b * batch + j}" for j in range(batch)] for b in range(n)]
    if length_grouping:
        from train.data import group_by_length

        samples = [{"caption": c, "pixels": torch.empty(0)} for cs in captions for c in cs]
        grouped = group_by_length(samples, batch_size=batch, length_of=lambda s: table[s["caption"]])
        captions = [[s["caption"] for s in b] for b in grouped]
    batches = [
        {"pixels": torch.randn(batch, size.latent_channels, lat, lat, generator=g), "caption": captions[b]}
        for b in range(n)
    ]
    return batches, table


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_random_transformer(arch: dict, *, device: torch.device, dtype: torch.dtype):
    """The FLUX transformer on meta, then `to_empty` on `device` in `dtype`, then a small random init."""
    from train.model import build_transformer_meta

    model = build_transformer_meta(arch)
    torch.nn.Module.to(model, dtype)  # (ModelMixin.to warns about fp32-kept modules; FLUX has none)
    model.to_empty(device=device)
    init_weights(model)
    return model


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    """N(0, 0.02) weights, zero biases, unit norms: keeps activations finite through 57 random blocks."""
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            continue
        seen.update(id(p) for p in module.parameters(recurse=False))
    missed = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not missed, f"left uninitialised after to_empty: {missed[:3]}"


# ---------------------------------------------------------------------------------------------------------------
# The two steps


@dataclass
class Options:
    compile: bool = False
    ac: str = "none"
    attention: str | None = None
    float8: bool = False
    base_quant: str = "none"
    offload: str = "auto"
    sync_debug: bool = False
    optim: str = "auto"


@dataclass
class Runner:
    """One benchmark row's model, optimizer and step function."""

    step: Callable[[dict], None] | None
    model: torch.nn.Module
    full: bool
    text_tokens: list[int] = field(default_factory=list)
    image_tokens: int = 0
    last_loss: torch.Tensor | None = None


def build_ours(mode: str, arch: dict, *, info, dtype, opts: Options, frozen, obj: ObjectiveConfig, seed: int) -> Runner:
    from train.adapters import apply_adapter, trainable_named_parameters
    from train.trainer import step_generator
    from train.optim import build_optimizer, step_if
    from train.parallelize import parallelize_transformer
    from train.step import forward_backward_step

    # Full fine-tune: trainable parameters are fp32, so build them in fp32 directly (no bf16 copy to convert).
    model = build_random_transformer(arch, device=info.device, dtype=torch.float32 if mode == "full" else dtype)
    adapter = AdapterConfig(kind=mode, rank=16, alpha=16.0)
    apply_adapter(model, adapter)
    for _, p in trainable_named_parameters(model):
        p.data = p.data.float()  # fp32 master copy of what trains (as train.build.build_model)
    if opts.attention:
        if opts.attention in _UNRESHAPED_MASK_BACKENDS:
            print(f"warning: diffusers 0.39's {opts.attention} backend hands our (B, S) key mask to SDPA without "
                  "reshaping it to (B, 1, 1, S); batches > 1 fail until train/flux.py passes a 4-D mask", flush=True)
        model.set_attention_backend(opts.attention)
    if opts.float8:
        _convert_float8(model)
    replicated: list[str] = []
    if opts.base_quant != "none" and mode != "full":  # model.base_quant, as train.build.build_model applies it
        from train.quant import quantize_base

        replicated = quantize_base(model, opts.base_quant)
    offload = opts.offload == "on" or (opts.offload == "auto" and mode == "full" and info.device.type == "cuda")
    pcfg = ParallelConfig(
        cpu_offload=offload, compile_blocks=opts.compile, ac_policy=opts.ac if opts.ac != "none" else "full"
    )
    model = parallelize_transformer(
        model, pcfg, info=info, compute_dtype=dtype, activation_checkpointing=opts.ac != "none",
        replicated=frozenset(replicated),
    )
    model.train()
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    optimizer = build_optimizer(params, OptimConfig(lr=1e-5, implementation=opts.optim))
    runner = Runner(step=None, model=model, full=mode == "full")
    counter = {"step": 0}

    def step(batch: dict) -> None:
        # the training loop's step (train/trainer.py, FSDP2Backend.step): device generator, skip decided on the device
        out = forward_backward_step(
            model, batch, frozen, obj,
            generator=step_generator(seed, info.rank, counter["step"], 0, device=info.device),
        )
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        step_if(optimizer, torch.isfinite(norm) & torch.isfinite(out["loss"]))
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1
        runner.image_tokens = out["image_tokens"]
        runner.text_tokens.append(out["text_tokens"])
        runner.last_loss = out["loss"]

    runner.step = step
    return runner


_UNRESHAPED_MASK_BACKENDS = ("_native_math", "_native_efficient", "_native_cudnn")


def _convert_float8(model: torch.nn.Module) -> None:
    """torchao float8 training linears for the base matmuls (H100-class GPUs); adapter layers stay bf16/fp32."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise SystemExit(f"--float8 needs torchao (pip install torchao): {e}") from None
    if not torch.cuda.is_available():
        raise SystemExit("--float8 needs a CUDA GPU with float8 tensor cores (sm89+)")

    def keep(module, fqn: str) -> bool:
        return (
            "lora_" not in fqn
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
            and module.in_features >= 1024
        )

    convert_to_float8_training(model, module_filter_fn=keep)


def build_baseline(arch: dict, *, device, dtype, text: PrecomputedText, text_tokens: int) -> Runner:
    """diffusers' train_dreambooth_lora_flux.py step with its defaults (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    transformer = build_random_transformer(arch, device=device, dtype=dtype)  # cast to weight_dtype, as the example
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=EXAMPLE_TARGETS)
    )
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # schnell's scheduler config
    vae_scale_factor = 8
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else None
    runner = Runner(step=None, model=transformer, full=False)

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def step(batch: dict) -> None:
        prompts = text.encode(list(batch["caption"]), max_tokens=text_tokens, masked=False)
        prompt_embeds, pooled_prompt_embeds = prompts.t5, prompts.pooled  # (B, 512, D) unmasked, (B, D_clip)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        model_input = batch["pixels"].to(device, dtype)  # (latents - shift) * scale, cast to weight_dtype
        b, c, h, w = model_input.shape
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(
            weighting_scheme="none", batch_size=b, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
        )
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device=device)
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy_model_input, b, c, h, w)
        kwargs = dict(
            hidden_states=packed, timestep=timesteps / 1000, guidance=None, pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False,
        )
        if autocast is not None:
            with autocast:
                model_pred = transformer(**kwargs)[0].float()  # accelerate's convert_to_fp32 on the output
        else:
            model_pred = transformer(**kwargs)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, h * vae_scale_factor, w * vae_scale_factor,
                                                  vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.detach().item()  # the example's progress bar / tracker log, every step
        runner.image_tokens = packed.shape[1]
        runner.text_tokens.append(prompt_embeds.shape[1])
        runner.last_loss = loss.detach()

    runner.step = step
    return runner


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; the process's peak RSS


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(runner: Runner, batches: list[dict], *, warmup: int, steps: int, device, sync_debug: bool) -> dict:
    for i in range(warmup):
        runner.step(batches[i % len(batches)])
    _sync(device)
    runner.text_tokens.clear()
    debug = sync_debug and device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        if debug:
            warnings.simplefilter("always")  # every sync, not the first per call site
            torch.cuda.set_sync_debug_mode("warn")  # a warning for every host sync inside the timed steps
        t0 = time.perf_counter()
        for i in range(steps):
            runner.step(batches[(warmup + i) % len(batches)])
        if debug:
            torch.cuda.set_sync_debug_mode("default")
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
    out = {"seconds": seconds, "loss": float(runner.last_loss)}
    if debug:
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        print(f"# sync-debug: {len(syncs)} host syncs in {steps} timed steps at {', '.join(sites) or 'no site'}",
              flush=True)
        out["syncs_per_step"] = len(syncs) / steps
        out["sync_sites"] = sites
    for w in caught:  # the other warnings still reach the user
        if "synchroniz" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="shorthand for --size tiny (CPU, a few steps)")
    p.add_argument("--size", choices=sorted(SIZES), default=None)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--resolutions", default=None, help="comma-separated pixels (default: the size's)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: the size's per resolution)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompt-median", type=int, default=None, help="median caption length in T5 tokens")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each block (parallel.compile_blocks)")
    p.add_argument("--ac", default="none", help="ours: activation checkpointing: none | full | ops | every_N")
    p.add_argument("--attention", default=None, help="ours: a diffusers attention backend (e.g. _native_cudnn)")
    p.add_argument("--float8", action="store_true", help="ours: torchao float8 training linears (GPU only)")
    p.add_argument("--base-quant", choices=("none", "int8", "float8"), default="none",
                   help="ours, lora/lokr: the frozen block Linears weight-only quantized (model.base_quant)")
    p.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                   help="ours: FSDP2 CPU offload (auto: on for mode full on a GPU — 12B fp32 + AdamW needs ~190 GB)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    p.add_argument("--sync-debug", action="store_true", help="count the host syncs in the timed steps (CUDA)")
    p.add_argument("--optim-impl", choices=("auto", "single_tensor", "foreach", "fused"), default="auto",
                   help="ours: AdamW kernel (optim.implementation; auto = fused on a GPU)")
    p.add_argument("--length-grouping", action="store_true",
                   help="regroup the benchmark's 4 batches by caption length (data.length_grouping, window 4)")
    p.add_argument("--json", default=None, help="also write the header and rows as JSON to this path")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    size_name = "tiny" if args.tiny else (args.size or "full")
    size = SIZES[size_name]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad[0]!r} (choose from {', '.join(MODES)})")
    if args.ac != "none":
        try:
            ParallelConfig(ac_policy=args.ac)
        except ValueError as e:
            p.error(f"--ac: {e}")
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else list(size.resolutions)
    if any(r % 16 for r in resolutions):
        p.error("--resolutions: each must be a multiple of 16")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and size_name != "tiny" else "cpu"))
    if size_name == "full" and device.type != "cuda":
        print("warning: the full-size benchmark on CPU needs ~50 GB of RAM per row and hours; use --tiny", flush=True)

    if args.offload == "on" and device.type != "cuda":
        p.error("--offload on: FSDP2 CPU offload needs a CUDA device (it pins host memory)")

    from train.model import resolve_dtype
    from train.parallelize import destroy_distributed, init_distributed

    dtype = resolve_dtype(args.dtype, device)
    info = init_distributed(ParallelConfig(dist_backend="nccl" if device.type == "cuda" else "gloo"))
    if info.device != device:
        info = type(info)(info.rank, info.world_size, info.local_rank, info.local_world_size, device)
    opts = Options(compile=args.compile, ac=args.ac, attention=args.attention, float8=args.float8,
                   base_quant=args.base_quant,
                   offload=args.offload, sync_debug=args.sync_debug, optim=args.optim_impl)
    torch.manual_seed(args.seed)
    fm = flops_model(_meta_model(size.arch))
    peak = peak_flops(device, override_tflops=args.peak_tflops)

    rows = []
    try:
        for res in resolutions:
            for mode in modes:
                rows.append(_run_and_summarise(mode, res, size=size, args=args, info=info, dtype=dtype, opts=opts,
                                               fm=fm, peak=peak))
    finally:
        destroy_distributed()
    header = print_report(rows, size_name=size_name, device=device, dtype=dtype, opts=opts, peak=peak, fm=fm,
                          args=args)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    return 0


def _meta_model(arch: dict):
    from train.model import build_transformer_meta

    return build_transformer_meta(arch)


def _run_and_summarise(mode, res, *, size, args, info, dtype, opts, fm, peak) -> dict:
    batch = args.batch_size or size.batch.get(res, min(size.batch.values()))
    batches, table = make_batches(size, res, batch, n=4, median=args.prompt_median or size.prompt_median,
                                  seed=args.seed, length_grouping=args.length_grouping)
    text = PrecomputedText(table, t5_dim=size.arch["joint_attention_dim"],
                           pooled_dim=size.arch["pooled_projection_dim"], max_tokens=size.text_tokens,
                           device=info.device, dtype=dtype, seed=args.seed)
    row = {"mode": mode, "res": res, "batch": batch}
    why = _cannot_fit(mode, size, info.device, opts)
    if why:
        print(f"note: {mode} at {res}² skipped: {why}", flush=True)
        return {**row, "skipped": why}
    runner = None
    torch.manual_seed(args.seed)  # the random init of each row, independent of the rows before it
    try:
        if mode == "baseline":
            runner = build_baseline(size.arch, device=info.device, dtype=dtype, text=text,
                                    text_tokens=size.text_tokens)
        else:
            from train.step import Encoders

            frozen = Encoders(vae=LatentsAsPixels(info.device, dtype), text=text, dtype=dtype, device=info.device)
            obj = ObjectiveConfig(max_text_tokens=size.text_tokens)  # the trainer's defaults: mask on, trim on
            runner = build_ours(mode, size.arch, info=info, dtype=dtype, opts=opts, frozen=frozen, obj=obj,
                                seed=args.seed)
        m = measure(runner, batches, warmup=args.warmup if args.warmup is not None else size.warmup,
                    steps=args.steps or size.steps, device=info.device, sync_debug=opts.sync_debug)
        image_tokens, text_tokens = runner.image_tokens, list(runner.text_tokens)
        full, oom, error = runner.full, False, None
    except torch.OutOfMemoryError:
        oom, error = True, None  # (cleaned up below, once the traceback no longer holds the model)
    except Exception as e:  # one broken row (a compile error, say) must not cost the GPU session the others
        import traceback

        traceback.print_exc()
        oom, error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    peak_mem = _peak_mem_gib(info.device)
    del runner
    _free(info.device)
    if oom:
        return {**row, "oom": True}
    if error:
        print(f"note: {mode} at {res}² failed: {error}", flush=True)
        return {**row, "error": error}

    # FLOPs of the timed steps, each at its own (trimmed) text length; per-sample tokens reported as the mean.
    flops = sum(fm.per_step(image_tokens=image_tokens, text_tokens=n, batch=batch, full=full) for n in text_tokens)
    flops_per_step = flops / len(text_tokens)
    u = mfu(flops_per_step, m["seconds"], peak)
    return {
        **row,
        "tokens": image_tokens + sum(text_tokens) / len(text_tokens),
        "step_ms": m["seconds"] * 1e3,
        "img_per_s": batch / m["seconds"],
        "peak_mem_GiB": peak_mem,
        "TFLOP_per_s": flops_per_step / m["seconds"] / 1e12,
        "MFU_%": None if u is None else 100 * u,
        "loss": m["loss"],
        **({"syncs_per_step": m["syncs_per_step"], "sync_sites": m["sync_sites"]} if "syncs_per_step" in m else {}),
    }


def _cannot_fit(mode: str, size: BenchSize, device: torch.device, opts: Options) -> str | None:
    """A reason to skip a full fine-tune whose offloaded fp32 state cannot fit in host RAM (the OOM killer would end
    the whole benchmark, not just the row); None when it may fit. GPU OOMs are caught per row instead."""
    offload = opts.offload == "on" or (opts.offload == "auto" and device.type == "cuda")
    if mode != "full" or not offload:
        return None
    n = sum(p.numel() for p in _meta_model(size.arch).parameters())
    need = 16 * n  # fp32 parameters, gradients and AdamW's two moments, all pinned in host memory
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.9 * have:
        return (f"FSDP2 CPU offload needs ~{need / 2**30:.0f} GiB of host RAM for fp32 params + grads + AdamW, "
                f"this machine has {have / 2**30:.0f} GiB")
    return None


def _fmt(v, digits: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _sig(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def print_report(rows, *, size_name, device, dtype, opts, peak, fm, args) -> dict:
    """Prints the header and the table; returns the header's facts (for --json)."""
    import diffusers
    import peft

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = {r["res"]: r["img_per_s"] for r in rows if r["mode"] == "baseline" and "img_per_s" in r}
    for r in rows:
        if "img_per_s" in r and r["res"] in base:
            r["vs_baseline"] = r["img_per_s"] / base[r["res"]]
    print(f"# bench/train_step.py --size {size_name}  ({when})")
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"# device: {device.type} ({gpu}), threads {torch.get_num_threads()}, dtype {dtype_name}")
    print(f"# torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"python {platform.python_version()}")
    print(f"# ours: compile={opts.compile} ac={opts.ac} attention={opts.attention or 'native'} float8={opts.float8} "
          f"base_quant={opts.base_quant} offload={opts.offload} optim={opts.optim} length_grouping={args.length_grouping}; peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; "
          f"P_tok={fm.p_tok:.4g} L={fm.layers} h={fm.hidden}")
    print("# tokens = image + processed text tokens per sample (mean over the timed steps); peak_mem_GiB: "
          + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "the process's peak RSS (cumulative)"))
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        if r.get("oom") or r.get("skipped") or r.get("error"):
            status = "OOM" if r.get("oom") else "skipped" if r.get("skipped") else "error"
            cells = [r["mode"], str(r["res"]), str(r["batch"]), "-", status]
            cells += ["-"] * (len(COLUMNS) - len(cells))
        else:
            ratio = r.get("vs_baseline")
            cells = [
                r["mode"], str(r["res"]), str(r["batch"]), _fmt(r["tokens"], 1), _fmt(r["step_ms"], 1),
                _fmt(r["img_per_s"], 3), _fmt(r["peak_mem_GiB"], 2), _sig(r["TFLOP_per_s"]), _sig(r["MFU_%"]),
                _fmt(r["loss"], 4), _fmt(ratio, 2),
            ]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()
    return {
        "when": when, "size": size_name, "device": device.type, "gpu": gpu, "dtype": dtype_name,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "peak_tflops": None if peak is None else peak / 1e12,
        "options": {"compile": opts.compile, "ac": opts.ac, "attention": opts.attention or "native",
                    "float8": opts.float8, "base_quant": opts.base_quant, "offload": opts.offload, "optim": opts.optim,
                    "length_grouping": args.length_grouping},
    }


if __name__ == "__main__":
    sys.exit(main())
