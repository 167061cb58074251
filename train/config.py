"""Typed job configuration: keyword-only dataclasses, YAML presets and `a.b=c` overrides.

Each component receives only its own sub-config (e.g. the objective gets `ObjectiveConfig`), never the whole job.
Every user mistake raises `ValueError` with the offending key in the message.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from train.run_dir import RunDir


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}: must be in [0, 1], got {value!r}")


@dataclass(kw_only=True)
class AdapterConfig:
    """Which parameters train: a peft LoRA / LoKr adapter on the transformer, or everything (`full`)."""

    kind: str = "lokr"
    """lora | lokr | full"""
    rank: int = 16
    """LoRA rank r; for LoKr the rank of the low-rank factor (LyCORIS `linear_dim`; ignored by full_matrix)."""
    alpha: float = 16.0
    """Scale numerator (LyCORIS `linear_alpha`): the update is multiplied by alpha / rank, except where
    `scale_convention` says otherwise."""
    scale_convention: str = "lycoris"
    """LoKr scale rule. lycoris: LyCORIS's (and ComfyUI's) rule, scale 1 for a layer whose two Kronecker factors are
    both full matrices, alpha / rank where one is a low-rank product — so LyCORIS settings mean what they mean there.
    peft: alpha / rank on every layer (peft's LoKr). LoRA scales by alpha / rank under both."""
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "to_q", "to_k", "to_v", "to_out.0",
            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
            "proj_mlp", "proj_out",
        ]
    )
    """Module-name suffixes inside the transformer blocks that get an adapter."""
    blocks: list[int] | None = None
    """Double-stream block indices to adapt (None = all)."""
    single_blocks: list[int] | None = None
    """Single-stream block indices to adapt (None = all)."""
    lokr_factor: int = -1
    """LoKr decomposition factor (-1: as square as possible; LibreFLUX used 2)."""
    lokr_full_matrix: bool = False
    """LoKr: train the second Kronecker factor as a full matrix (LyCORIS `full_matrix`, as LibreFLUX)."""
    lokr_factor_pattern: dict[str, int] = field(default_factory=dict)
    """LoKr: per-layer factor overrides, {glob: factor}, as LyCORIS's `name_algo_map` with `use_fnmatch`: a glob is
    matched (fnmatch) against the full module name, the first matching glob wins, unmatched layers use
    lokr_factor. Factor 1 makes w1 1x1 and w2 the full matrix: a full update of that layer (LibreFLUX's choice for
    the ff*/norm1* layers of chosen blocks), e.g. {"transformer_blocks.1[0-8].ff*": 1}. Selects no extra layers."""
    lokr_decompose_both: bool = False
    frozen: list[str] = field(default_factory=list)
    """kind full: parameter-name prefixes that stay frozen, e.g. ["time_text_embed."] (the timestep and pooled-text
    embedders: lodestone's FLUX.1-dev de-distill never trains time_in / vector_in / guidance_in)."""
    init_weights: bool = True
    """True: the adapter starts as a no-op (the base model's output is unchanged at step 0)."""
    init_from: str = ""
    """LoKr: a LyCORIS-format .safetensors (`lycoris_<module>.lokr_w1`, ...; what LyCORIS, SimpleTuner and
    `dedistill export --format lycoris` write) to start from instead of the no-op init. Every layer in the file
    must be one this config adapts, with the same factor shapes; its effective update is kept exactly."""

    def __post_init__(self) -> None:
        _check_choice("model.adapter.kind", self.kind, ("lora", "lokr", "full"))
        _check_choice("model.adapter.scale_convention", self.scale_convention, ("lycoris", "peft"))
        _check_positive("model.adapter.rank", self.rank)
        _check_unit("model.adapter.dropout", self.dropout)
        if not self.target_modules and self.kind != "full":
            raise ValueError("model.adapter.target_modules: empty; name at least one module")
        for key, value in (("lokr_factor_pattern", self.lokr_factor_pattern), ("init_from", self.init_from)):
            if value and self.kind != "lokr":
                raise ValueError(f"model.adapter.{key}: applies to kind lokr only (this config has {self.kind!r})")
        if self.frozen and self.kind != "full":
            raise ValueError(f"model.adapter.frozen: applies to kind full only (an adapter trains only its own "
                             f"weights; this config has {self.kind!r})")
        for glob, factor in self.lokr_factor_pattern.items():
            if factor == 0 or factor < -1:
                raise ValueError(f"model.adapter.lokr_factor_pattern: factor for {glob!r} must be >= 1 or -1, "
                                 f"got {factor}")


GUIDANCE_MODES = ("bypass", "keep")
OBJECTIVES = ("data", "teacher")


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """A local diffusers-format FLUX directory (e.g. a downloaded FLUX.1-schnell, or `dedistill tiny-model`)."""
    dtype: str = "auto"
    """Weights/compute dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    text_encoder_placement: str = "device"
    """Where T5 (and CLIP) run when the data is raw captions: device (replicated on every GPU) | cpu (host memory,
    encoded on the CPU; frees ~9.5 GB per GPU at FLUX size) | fsdp (T5 sharded over the ranks with FSDP2, as
    torchtitan does; CLIP stays on the device). With precomputed data no encoder is loaded at all."""
    base_quant: str = "none"
    """The frozen base Linears of the transformer blocks under a LoRA/LoKr adapter (train/quant.py): none (the
    model dtype) | int8 | float8 (torchao weight-only, per-row scales: about half the bf16 bytes; needs the `quant`
    extra). FSDP2 keeps them whole on every rank (frozen: no gradient to reduce, nothing to all-gather)."""
    guidance: str = "bypass"
    """What a guidance-distilled base (`guidance_embeds: true`: FLUX.1-dev, Krea-dev, Kontext-dev) does with its
    guidance embedder: bypass (its weights are not loaded and the transformer is built without it, which equals
    the dev model with the embedder out of the graph: trained, sampled and exported schnell-shaped, for real CFG) |
    keep (the embedder stays, fed `model.guidance_scale` in every training and sampling forward; the export keeps
    it, and FluxPipeline's `guidance_scale` feeds it). Ignored for a model without a guidance embedder."""
    guidance_scale: float = 1.0
    """The constant the kept guidance embedder is fed (`model.guidance: keep`); dev's own default is 3.5."""

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, ("auto", "fp32", "bf16"))
        _check_choice("model.guidance", self.guidance, GUIDANCE_MODES)
        _check_positive("model.guidance_scale", self.guidance_scale, allow_zero=True)
        _check_choice("model.text_encoder_placement", self.text_encoder_placement, ("device", "cpu", "fsdp"))
        _check_choice("model.base_quant", self.base_quant, ("none", "int8", "float8"))
        if self.base_quant != "none" and self.adapter.kind == "full":
            raise ValueError(f"model.base_quant: {self.base_quant} quantizes the frozen base under an adapter; "
                             f"model.adapter.kind=full trains every weight (set model.base_quant=none)")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Flow matching on x_t = (1-t)·x0 + t·ε with target v = ε - x0 (see train/objective.py)."""

    kind: str = "data"
    """data: the target is the data's velocity ε − x0 | teacher: reversed guided distillation, the target is the
    frozen guidance-distilled base (`model.path`, its guidance embedder kept) at scale w, matched by the student's
    real-CFG combination uncond + w·(cond − uncond) (docs/recipes.md states the loss)."""
    teacher_guidance: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """teacher: w ~ U(lo, hi) per sample, fed to the teacher's guidance embedder and used as the student's CFG
    scale (nyanko7/flux-dev-de-distill: w ∈ [1, 4])."""
    teacher_data_weight: float = 0.0
    """teacher: weight λ of the data term added to the teacher term, λ·MSE(v_cond, ε − x0) (0: teacher only)."""

    timestep_sampler: str = "logit_normal"
    """uniform | logit_normal | beta | chroma (Chroma's density ∝ −7.7·(t − 0.5)² + 2 on [0, 1])"""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_alpha: float = 2.0
    """Beta(α, β) over t; LibreFLUX used α=2.0, β=1.6."""
    beta_beta: float = 1.6
    temperature: float = 1.0
    """Timestep-distribution temperature: >1 widens the sampler's spread, <1 narrows it (1 = as configured)."""
    shift: str = "none"
    """none | constant | resolution (FLUX's resolution-dependent shift)."""
    shift_value: float = 3.0
    """The constant shift s in t' = s·t / (1 + (s-1)·t)."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt, so the model learns the unconditional branch."""
    max_text_tokens: int = 512
    """T5 context length (schnell was trained with 256; LibreFLUX raised it to 512)."""
    attention_mask: bool = True
    """Mask T5 padding out of joint attention with a bool key mask."""
    attention: str = "sdpa"
    """How joint attention applies the padding mask in training (train/flux.py): sdpa (PyTorch SDPA, a bool key
    mask) | flex (FlexAttention with a BlockMask: all-padding blocks skipped; compile the blocks for speed). Equal
    outputs within float rounding; sampling uses sdpa."""
    trim_text: bool = True
    """Trim each batch's text to its longest prompt. Applies only with attention_mask (where it is exact);
    without the mask the padding changes the output, so it is kept."""
    loss_weighting: str = "none"
    """none | cosmap (SD3's weighting) — multiplies the per-sample MSE."""
    noise_pairing: str = "none"
    """none | ot_cosine | ot_l2: pair each micro-batch's noise with its latents by a minimum-cost assignment
    (Chroma's minibatch optimal transport uses negative cosine similarity); none draws them independently."""
    visible_padding_tokens: int = 0
    """How many padding tokens after each prompt stay visible in the joint-attention mask (and keep their T5
    states): 0 masks every pad (LibreFLUX's intent), Chroma keeps 1. Training and sampling use the same value."""

    def __post_init__(self) -> None:
        _check_choice(
            "objective.timestep_sampler", self.timestep_sampler, ("uniform", "logit_normal", "beta", "chroma")
        )
        _check_choice("objective.shift", self.shift, ("none", "constant", "resolution"))
        _check_choice("objective.loss_weighting", self.loss_weighting, ("none", "cosmap"))
        _check_choice("objective.attention", self.attention, ("sdpa", "flex"))
        _check_positive("objective.logit_std", self.logit_std)
        _check_positive("objective.beta_alpha", self.beta_alpha)
        _check_positive("objective.beta_beta", self.beta_beta)
        _check_positive("objective.temperature", self.temperature)
        _check_positive("objective.shift_value", self.shift_value)
        _check_unit("objective.caption_dropout", self.caption_dropout)
        _check_positive("objective.max_text_tokens", self.max_text_tokens)
        _check_choice("objective.noise_pairing", self.noise_pairing, ("none", "ot_cosine", "ot_l2"))
        _check_choice("objective.kind", self.kind, OBJECTIVES)
        if len(self.teacher_guidance) != 2 or not 0 <= self.teacher_guidance[0] <= self.teacher_guidance[1]:
            raise ValueError(f"objective.teacher_guidance: needs [lo, hi] with 0 <= lo <= hi, got "
                             f"{self.teacher_guidance!r}")
        _check_positive("objective.teacher_data_weight", self.teacher_data_weight, allow_zero=True)
        _check_positive("objective.visible_padding_tokens", self.visible_padding_tokens, allow_zero=True)
        if self.visible_padding_tokens and not self.attention_mask:
            raise ValueError("objective.visible_padding_tokens: needs objective.attention_mask=true (without the "
                             "mask every pad is visible already)")


@dataclass(kw_only=True)
class DataConfig:
    remote: str | None = None
    """Where the MDS shards live: a local path or s3://, gs://, ... (None: `local` holds the shards)."""
    local: str = ""
    """Local cache directory (or the shard directory itself when `remote` is None)."""
    resolution: int = 512
    """Training resolution R in pixels (multiple of 16): images are R x R, or about R*R pixels with buckets."""
    buckets: bool = False
    """Aspect-ratio buckets: every batch comes from one bucket (W x H ~ R*R, sides multiples of 16). Needs a
    bucketed dataset (`dedistill data bucket` or `dedistill data precompute`, at the same R). false: scale the
    short side to R and centre crop a square. Precomputed multi-bucket data requires true."""
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_seed: int = 9176
    shuffle_block_size: int | None = None
    num_workers: int = 0
    predownload: int | None = None
    caption_key: str = "caption"
    image_key: str = "image"
    length_grouping: bool = False
    """Group captions of similar T5 length into a batch, inside each aspect bucket: the loader's batches are
    regrouped `length_window` at a time, so trimming the text to a batch's longest prompt leaves little padding.
    Deterministic and resumed exactly (the checkpoint records the window's start and how much of it was used)."""
    length_window: int = 16
    """Batches regrouped together by length_grouping (more: less padding, less mixing of lengths across steps)."""
    download_retry: int = 2
    """With `remote`: how many more times streaming downloads a shard (or index) after a failed attempt, on top of
    botocore's and s3transfer's own retries; each retry is logged with a running count (train/remote.py)."""
    download_timeout: float = 60.0
    """With `remote`: seconds one download attempt of one shard may take (streaming's `download_timeout`)."""

    def __post_init__(self) -> None:
        if self.resolution % 16:
            raise ValueError(f"data.resolution: must be a multiple of 16, got {self.resolution}")
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        _check_positive("data.length_window", self.length_window)
        _check_positive("data.download_retry", self.download_retry, allow_zero=True)
        _check_positive("data.download_timeout", self.download_timeout)


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 1
    """Micro-batch per rank; the global batch is batch_size × grad_accum × world size."""
    grad_accum: int = 1
    grad_clip: float = 1.0
    """Max global grad norm (0 disables clipping)."""
    activation_checkpointing: bool = False
    log_every: int = 10
    sync_every: int = 10
    """Steps between the loop's host reads of the device, besides logging and checkpoint steps: the stop-flag
    all-reduce (SIGUSR1/SIGTERM; every rank agrees at the same step), the loss/grad-norm history and the divergence
    guard's count. Between reads the step issues no host sync (docs/performance.md), so a signal or a divergence
    is acted on up to sync_every - 1 steps late; keep sync_every × step time well inside SLURM's grace for SIGTERM."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_positive("train.max_steps", self.max_steps)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("train.log_every", self.log_every)
        _check_positive("train.sync_every", self.sync_every)


@dataclass(kw_only=True)
class GuardConfig:
    """The divergence guard: what happens when the loss or the gradient stays non-finite (train/guard.py).

    A single non-finite step is always skipped (parameters and optimizer state untouched); the guard acts when
    `max_nonfinite_steps` of them come in a row."""

    max_nonfinite_steps: int = 20
    """K: consecutive non-finite (skipped) steps that count as divergence; 0 turns the guard off (skip forever)."""
    on_divergence: str = "rewind"
    """rewind: reload the newest checkpoint saved before the first of those steps and go on with the data loader
    where it is, i.e. past every batch drawn since that checkpoint; stop: end the run with a one-line error."""
    max_rewinds: int = 3
    """Rewinds one process may make; the next divergence stops the run (a run that diverges again and again needs a
    person, not more skipped data)."""

    def __post_init__(self) -> None:
        _check_positive("guard.max_nonfinite_steps", self.max_nonfinite_steps, allow_zero=True)
        _check_choice("guard.on_divergence", self.on_divergence, ("rewind", "stop"))
        _check_positive("guard.max_rewinds", self.max_rewinds, allow_zero=True)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "cosine"
    """cosine | constant (both after a linear warmup)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Cosine decays to lr × min_lr_ratio."""
    implementation: str = "auto"
    """AdamW kernel: auto (fused when the parameters are on a GPU, else single_tensor) | single_tensor (one set of
    small ops per parameter: bitwise-reproducible across save/resume on CPU) | foreach (batched over parameters) |
    fused (one kernel for all parameters)."""

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_choice("optim.implementation", self.implementation, ("auto", "single_tensor", "foreach", "fused"))
        _check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_unit("optim.min_lr_ratio", self.min_lr_ratio)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas: needs two values, got {self.betas!r}")


@dataclass(kw_only=True)
class EMAConfig:
    decay: float = 0.0
    """EMA of the trainable parameters (0 disables it)."""
    every: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay: must be in [0, 1), got {self.decay!r}")
        _check_positive("ema.every", self.every)


@dataclass(kw_only=True)
class ParallelConfig:
    backend: str = "fsdp2"
    """fsdp2 | deepspeed"""
    dist_backend: str = "auto"
    """Collective backend: auto (nccl with CUDA, gloo on CPU) | nccl | gloo."""
    reshard_after_forward: bool = True
    reduce_dtype: str = "fp32"
    """Gradient reduce-scatter dtype: fp32 | bf16."""
    hsdp: bool = False
    """FSDP2 only: shard inside a node, replicate across nodes (2-D mesh)."""
    zero_stage: int = 2
    """DeepSpeed only: ZeRO stage 2 or 3."""
    cpu_offload: bool = False
    ac_policy: str = "full"
    """What `train.activation_checkpointing` recomputes (FSDP2): full (every block) | ops (every block, but the
    outputs of matmuls and attention are kept and only the cheap ops are recomputed — torchtitan's op-level selective
    AC) | every_N, e.g. every_2 (only every N-th block — layer-level selective AC: less recompute, more memory)."""
    compile_blocks: bool = False
    """FSDP2: `torch.compile` each transformer block (after activation checkpointing, before `fully_shard`, as
    torchtitan). Parameter names do not change, so checkpoints are interchangeable with uncompiled runs."""
    timeout_s: float = 1800.0
    """How long a collective may wait for the other ranks before this rank fails (`init_process_group`'s timeout):
    a rank that hangs ends the job after this long, with an error naming the operation, instead of holding the
    allocation. Keep it above the slowest checkpoint save and eval (ranks wait for rank 0 at their barriers)."""
    max_restarts: int = 0
    """torchrun `--max-restarts` when `python -m launch.torchrun` (slurm/train.sbatch, `dedistill submit`) starts
    this config: after a worker dies (SIGKILL, OOM, a GPU off the bus) torchrun restarts the whole group on the same
    nodes up to this many times, and each start resumes from the newest complete checkpoint."""

    def __post_init__(self) -> None:
        _check_choice("parallel.backend", self.backend, ("fsdp2", "deepspeed"))
        if not re.fullmatch(r"full|ops|every_[1-9][0-9]*", self.ac_policy):
            raise ValueError(f"parallel.ac_policy: {self.ac_policy!r} is not one of full, ops, every_N (N >= 1)")
        if self.backend != "fsdp2" and (self.compile_blocks or self.ac_policy != "full"):
            raise ValueError("parallel.compile_blocks / parallel.ac_policy: only the fsdp2 backend applies them")
        _check_choice("parallel.dist_backend", self.dist_backend, ("auto", "nccl", "gloo"))
        _check_choice("parallel.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        _check_choice("parallel.zero_stage", self.zero_stage, (2, 3))
        _check_positive("parallel.timeout_s", self.timeout_s)
        _check_positive("parallel.max_restarts", self.max_restarts, allow_zero=True)


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume: bool = True
    """Resume from the newest complete checkpoint in run_dir/checkpoints."""
    async_save: bool = False
    """Write checkpoints in the background (DCP `async_save`): the loop is blocked only while the state is staged
    (copied to host memory, which then holds a second copy of the saved state until the write ends). The checkpoint
    counts once its COMPLETE marker exists, written when the background write has finished; the next save and the
    end of the run wait for it."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.every_steps", self.every_steps)
        _check_positive("checkpoint.keep_last", self.keep_last)


SCHEDULES = ("dynamic", "model", "constant")


@dataclass(kw_only=True)
class ImageKnobs:
    """How each image of a sampling job is drawn, set by a user by the same name in a run's `sample:`, an eval
    suite's `sampling:` and the `dedistill sample` flags: defined once here, for those configs and for
    `train.sampling.SamplingSettings`, what the sampler takes."""

    negative_prompt: str = ""
    resolution: int = 512
    seed: int = 0
    """Image i starts from the noise of seed + i."""
    noise_temperature: float = 1.0
    """Multiplies the initial noise: the sampling-side temperature (<1: smoother, less varied images)."""
    cfg_skip_steps: int = 0
    """No CFG for the first N steps (LibreFLUX's remedy for blur and shadows at high scales)."""
    cfg_rescale: float = 0.0
    """0 = off; φ in [0, 1] rescales the guided velocity's std toward the conditional one (Lin et al. 2023)."""
    batch_size: int = 4
    """Prompts sampled together."""

    section: ClassVar[str] = ""
    """Where the knobs sit, for error messages (`sample.`, `sampling.`; "" for the flags)."""

    def __post_init__(self) -> None:
        where = self.section
        if self.resolution % 16:
            raise ValueError(f"{where}resolution: must be a multiple of 16, got {self.resolution}")
        _check_positive(f"{where}noise_temperature", self.noise_temperature)
        _check_positive(f"{where}cfg_skip_steps", self.cfg_skip_steps, allow_zero=True)
        _check_unit(f"{where}cfg_rescale", self.cfg_rescale)
        _check_positive(f"{where}batch_size", self.batch_size)


@dataclass(kw_only=True)
class SampleConfig(ImageKnobs):
    """The CFG grid drawn at the end of training (and by `dedistill sample`)."""

    prompts: list[str] = field(default_factory=lambda: ["a red circle on a white background"])
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.5])
    steps: int = 28
    schedule: str = "dynamic"
    """The sigma schedule this run's model is sampled with (here, by `dedistill sample`/`eval` on its checkpoints,
    and written into its export's scheduler config): dynamic (FLUX.1-dev's resolution-dependent shift, what a
    de-distilled model samples with) | model (the base model dir's scheduler config, e.g. schnell's: no shift) |
    constant (`sample.shift`)."""
    shift: float = 1.0
    """The constant shift for `sample.schedule: constant`."""
    at_end: bool = True

    section: ClassVar[str] = "sample."

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("sample.steps", self.steps)
        _check_choice("sample.schedule", self.schedule, SCHEDULES)
        _check_positive("sample.shift", self.shift)
        for key in ("prompts", "cfg_scales"):  # the grid has one row per prompt and one column per scale
            if not getattr(self, key):
                raise ValueError(f"sample.{key}: empty; the sample grid needs at least one")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate every N steps (0 disables periodic evals)."""
    mode: str = "inline"
    """inline (in the training process; tiny CPU runs) | job (a separate SLURM job via submitit)."""
    suite: str = ""
    """An eval suite: a YAML path or a preset name in configs/evals/ (e.g. prompts, coco, tiny). Required when
    every_steps > 0; its paths are checked when training starts (evals/periodic.py)."""

    def __post_init__(self) -> None:
        _check_choice("eval.mode", self.mode, ("inline", "job"))
        _check_positive("eval.every_steps", self.every_steps, allow_zero=True)
        if self.every_steps > 0 and not self.suite:  # would otherwise be a silent no-op for the whole run
            raise ValueError(f"eval.suite: must be set when eval.every_steps is {self.every_steps} (a YAML path or a "
                             f"preset in configs/evals/); set eval.every_steps=0 to train without periodic evals")


@dataclass(kw_only=True)
class JobConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir: must not be empty")
        if self.objective.kind == "teacher" and self.model.guidance != "bypass":
            raise ValueError("objective.kind: teacher trains the student's real CFG against the guidance-distilled "
                             "teacher, so the student's own guidance embedder must be out (set model.guidance=bypass)")
        if self.model.base_quant != "none" and self.parallel.backend != "fsdp2":
            raise ValueError(f"model.base_quant: {self.model.base_quant} needs parallel.backend=fsdp2 (DeepSpeed "
                             f"would partition and cast the quantized weights as if they were plain tensors)")
        if self.model.base_quant != "none" and self.parallel.cpu_offload:
            raise ValueError(f"model.base_quant: {self.model.base_quant} cannot be combined with parallel.cpu_offload "
                             f"(FSDP2 offloads what it shards; the quantized base it keeps whole stays on the GPU)")


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(f"{key} key", k, key_tp): _coerce(f"{key}[{k!r}]", v, item_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {_type_name(tp)} for {key}")


def from_dict(cls: type, data: dict, *, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ValueError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ValueError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive: a missing required field
        raise ValueError(f"{prefix or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without aliases. An alias shares a node, and our config code copies and walks values as
    trees: nine levels of `[*a, *a, ...]` expand to billions of items (memory exhausted in seconds) and a
    self-referencing `&a [*a]` recurses forever. No config needs them, so a `*name` is refused where it stands."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}: aliases are not allowed in configs (write the value "
                f"out)", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, as every config, override and recorded run config is read: no tags (SafeLoader),
    no aliases (`ConfigLoader`). Raises yaml.YAMLError; nesting too deep to read raises one as well."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deep") from None


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ValueError(f"override '{item}': expected key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"override '{item}': empty key")
    return key.split("."), raw


def _override_value(raw: str, tp: Any) -> Any:
    """The value of `key=raw` for a key of type `tp`. A string key takes `raw` exactly: a path may hold ` #` (a YAML
    comment), `: ` (a YAML mapping) or look like a number (`0777`), and YAML would silently change each. Only a
    quoted raw is read as YAML there (`key=""`, `key='a b'`). Other keys read `raw` as YAML: numbers, booleans,
    [lists], {mappings}."""
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if args - {type(None)} == {str} and raw[:1] not in ("'", '"') and not (raw == "null" and type(None) in args):
        return raw
    try:
        return parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str], cls: type = JobConfig) -> dict:
    """Apply `a.b=c` overrides to a nested dict: string keys take the text as given, others parse it as YAML."""
    data = _deepcopy(data)
    for item in overrides:
        parts, raw = _parse_override(item)
        node, tp = data, cls
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
            if part not in hints:
                raise ValueError(f"unknown config key '{'.'.join(parts[: i + 1])}'")
            if i == len(parts) - 1:
                node[part] = _override_value(raw, hints[part])
            else:
                tp = hints[part]
                if not dataclasses.is_dataclass(tp):
                    raise ValueError(f"config key '{'.'.join(parts[: i + 1])}' has no sub-keys")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"config key '{'.'.join(parts[: i + 1])}' is not a mapping")
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of config keys")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type = JobConfig):
    """Load a YAML preset (or defaults when path is None), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data)


def load_run_config(run_dir: str | Path) -> JobConfig:
    """A run's recorded `config.yaml`. Runs recorded before `model.adapter.scale_convention` existed trained LoKr with
    peft's alpha / r on every layer; their checkpoints keep meaning that update."""
    data = load_yaml(RunDir(run_dir).config)
    adapter = data.get("model", {}).get("adapter", {})
    if isinstance(adapter, dict) and adapter.get("kind") == "lokr" and "scale_convention" not in adapter:
        adapter["scale_convention"] = "peft"
    return from_dict(JobConfig, data)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
