"""Proof that de-distillation works, at toy scale: teacher -> distilled ("toy schnell") -> de-distilled.

    python -m evals.experiments.proof --config configs/proof-cpu.yaml [--smoke] [key=value ...]

Stages (each writes into `out_dir` and is skipped when its output is already there *and was made with the same
settings*, recorded per stage in `out_dir/stages.json`, so a rerun resumes; other settings are an error naming the
directory). `--smoke` writes to `<out_dir>-smoke`, never where a full run looks:
  1. world    `tiny_data` MDS shards (training set) + a held-out set of single-object samples whose full captions
              are not among the training captions (the eval prompts).
  2. judge    small CNN reading shape/colour/position/size/background; held-out accuracy on real images reported.
  3. vae      AutoencoderKL (diffusers) trained on the world; reconstruction error reported. Pipeline dir = the tiny
              pipeline (tokenizers, text encoders) + this VAE + a transformer of `model` dims, in diffusers layout.
  4. teacher  `train.trainer.train`, adapter `full`, flow matching, caption dropout, masked T5 — the real trainer.
  5. student  reflow on teacher CFG couplings (evals/experiments/distill.py), few-step, no CFG: the toy schnell.
     dev      only for a `dev-*` recipe: guided distillation of the teacher into a student with a guidance
              embedder (distill.py `guidance_distill`), the toy FLUX.1-dev.
  6. dedistill `train.trainer.train` from the student's pipeline dir: our recipe, one run per adapter kind, and one
              full run per entry of `dedistill_recipes` (RECIPES: Chroma's OT pairing, its timestep density, the
              student pruned to Chroma's architecture by `dedistill prune` and de-distilled with Chroma's objective,
              and the toy dev de-distilled by the data or the teacher objective), each for every seed in
              `dedistill_seeds`.
  7. eval     toy FID + prompt adherence per model x steps x cfg x repeat; table, CFG curve PNG, sample grids. The
              toy dev is sampled twice: bypassed with real CFG (`dev`) and fed each scale through its embedder with
              real CFG off (`dev-embedded`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from dataset_tools.tiny_data import WorldSpec, check_object_counts, iter_samples, write_tiny_data
from dataset_tools.tiny_model import ToyText, build_tiny_pipeline
from evals.experiments.distill import guidance_distill, reflow, teacher_pairs
from evals.experiments.judge import (
    ATTRS, accuracy, full_caption, judge_images, labels_of, load_judge, save_judge, single_object_samples, to_tensor,
    train_judge,
)
from evals.fid import frechet_distance
from evals.periodic import trainer_hooks
from evals.sampler import SamplingSettings, generate, make_grid
from tools.prune import FitSettings
from tools.prune_pipeline import run_prune
from train.config import JobConfig, dump_config, from_dict, load_yaml, parse_yaml, to_dict
from train.flux import normalise_latents, pack_latents
from train.inference import load_for_inference, text_settings
from train.model import load_transformer
from train.checkpoint.format import list_checkpoints
from train.run_dir import RunDir
from train.trainer import train
from train.outputs import as_stored, atomic_output_dir, check_same_settings, write_text_atomic


@dataclass(kw_only=True)
class JudgeConfig:
    n_train: int = 4000
    n_test: int = 1000
    steps: int = 800
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 32
    feat_dim: int = 64
    smooth_noise: float = 0.0
    """Peak amplitude (on [-1, 1]) of random smooth fields added to the judge's training images
    (`judge.smooth_fields`). Clean renders teach it that any pixel off the background colour is object, so a VAE's
    faint background tints and outlines, which a person looking at the image ignores, read as a large object of
    another shape; 0: none."""

    def __post_init__(self) -> None:
        if self.smooth_noise < 0:
            raise ValueError(f"judge.smooth_noise: must be >= 0, got {self.smooth_noise}")


@dataclass(kw_only=True)
class VAEConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """n blocks = 2^(n-1)x downsampling: 3 blocks take a 32 px image to 8x8 latents (16 image tokens); the presets'
    4 blocks take 64 px to the same 8x8."""
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    fg_weight: float = 0.0
    """Extra weight of object pixels in the reconstruction loss (0: plain MSE). The objects cover a few percent of a
    toy image, so plain MSE is met by the background and blurs them into blobs of the wrong colour and shape
    (docs/proof.md, sanity checks); the weight spends the small VAE's capacity where the judge looks."""
    fg_dilate: int = 0
    """Widen the weighted region by this many pixels around each object. A shape is its outline: weighting only the
    object's own pixels leaves its colour free to bleed into the background around it at weight 1, which blurs a
    star and a diamond into the same blob."""
    objects: list[int] | None = None
    """Object counts of the VAE's training images (unset: the world's own). A world of one object per image shows the
    VAE 0.57 of the object pixels per step of the default world's, and its VAE lost shape (judge 0.36 on its
    reconstructions, docs/proof.md); drawing its images with the default world's counts in the same palettes keeps
    the shapes at the same budget. The judge's check and every later stage still use the world's own images."""

    def __post_init__(self) -> None:
        if self.fg_weight < 0 or self.fg_dilate < 0:
            key = "fg_weight" if self.fg_weight < 0 else "fg_dilate"
            raise ValueError(f"vae.{key}: must be >= 0, got {getattr(self, key)}")
        if self.objects is not None:
            check_object_counts("vae.objects", self.objects)


@dataclass(kw_only=True)
class ModelDims:
    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])


@dataclass(kw_only=True)
class TrainBudget:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    caption_dropout: float = 0.15
    nproc: int = 1
    """Trainer processes: 1 runs in-process; N > 1 runs torchrun with N gloo/nccl ranks, batch_size / N each (on a
    shared CPU box, 2 single-thread processes get twice the time slices of one)."""

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.batch_size % self.nproc:
            raise ValueError(f"nproc: must be >= 1 and divide batch_size ({self.batch_size}), got {self.nproc}")


@dataclass(kw_only=True)
class DistillConfig:
    n_pairs: int = 1024
    teacher_cfg: float = 4.0
    teacher_steps: int = 28
    student_steps: int = 4
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 1e-4


@dataclass(kw_only=True)
class PruneSettings:
    """`dedistill prune`'s approximator fit (tools/prune.py FitSettings) for the `pruned-chroma` recipe."""
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3


@dataclass(kw_only=True)
class DevConfig:
    """The toy "dev" (evals/experiments/distill.py `guidance_distill`): the teacher guidance-distilled into a student
    with a guidance embedder, for the `dev-*` recipes."""
    guidance: list[float] = field(default_factory=lambda: [1.0, 5.0])
    """[lo, hi]: the scales w ~ U(lo, hi) it is distilled at, and those the `dev-teacher` recipe draws (the eval's
    CFG scales lie inside)."""
    train_steps: int = 800
    batch_size: int = 64
    lr: float = 3e-4

    def __post_init__(self) -> None:
        if len(self.guidance) != 2 or not 0 <= self.guidance[0] <= self.guidance[1]:
            raise ValueError(f"dev.guidance: needs [lo, hi] with 0 <= lo <= hi, got {self.guidance!r}")


# Extra de-distillation recipes, each a full fine-tune with the proof's budget. name -> (objective keys changed from
# the proof's LibreFLUX-style recipe, the model it starts from: `student` (the toy schnell), `pruned` (it, pruned to
# Chroma's architecture) or `dev` (the toy dev)).
RECIPES: dict[str, tuple[dict, str]] = {
    "ot": ({"noise_pairing": "ot_cosine"}, "student"),  # Chroma's minibatch OT alone
    "chroma-t": ({"timestep_sampler": "chroma"}, "student"),  # Chroma's timestep density alone
    # Chroma's objective (configs/chroma.yaml) on the pruned student; caption dropout stays the proof's 0.15, not
    # Chroma's 0.01, so that this row differs from the others in the model and the three Chroma choices only.
    "pruned-chroma": ({"noise_pairing": "ot_cosine", "timestep_sampler": "chroma", "visible_padding_tokens": 1},
                      "pruned"),
    # The toy dev, by the two objectives of a guidance-distilled base (docs/recipes.md): data (its embedder
    # bypassed) and teacher (itself, embedder kept, at w ~ U(dev.guidance), the target of the student's real CFG).
    "dev-data": ({}, "dev"),
    "dev-teacher": ({"kind": "teacher"}, "dev"),
}


@dataclass(kw_only=True)
class EvalSettings:
    n_prompts: int = 256
    steps: list[int] = field(default_factory=lambda: [4, 28])
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.5, 5.0])
    repeats: int = 2
    """Noise seeds per setting: seed r uses initial noise seeds 100_000·(r+1) + i."""
    grid_prompts: int = 4


@dataclass(kw_only=True)
class ProofConfig:
    out_dir: str = "runs/proof-cpu"
    seed: int = 0
    resolution: int = 32
    n_train: int = 4000
    max_text_tokens: int = 64
    threads: int = 2
    world: WorldSpec = field(default_factory=WorldSpec)
    """What the world stage draws (dataset_tools/tiny_data.py); the judge always learns the default world, which
    holds every other one's samples."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    model: ModelDims = field(default_factory=ModelDims)
    text: ToyText = field(default_factory=ToyText)
    """The text encoders, where they differ from the tiny model's (a random 32-wide T5 that mixes its words)."""
    teacher: TrainBudget = field(default_factory=TrainBudget)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dedistill: TrainBudget = field(default_factory=lambda: TrainBudget(steps=300))
    dedistill_adapters: list[str] = field(default_factory=lambda: ["full", "lokr"])
    dedistill_recipes: list[str] = field(default_factory=list)
    """Names in RECIPES: full runs with Chroma's choices, rows next to `dedistilled-full` (the proof's recipe)."""
    dedistill_seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds of every de-distillation run (data order, caption dropout, timesteps, noise). The world, judge,
    VAE, teacher and student are `seed`'s: the student is the fixed input de-distillation starts from."""
    prune: PruneSettings = field(default_factory=PruneSettings)
    dev: DevConfig = field(default_factory=DevConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.resolution % 16:
            raise ValueError(f"resolution: must be a multiple of 16, got {self.resolution}")
        for a in self.dedistill_adapters:
            if a not in ("full", "lokr", "lora"):
                raise ValueError(f"dedistill_adapters: '{a}' is not one of full, lokr, lora")
        for r in self.dedistill_recipes:
            if r not in RECIPES:
                raise ValueError(f"dedistill_recipes: '{r}' is not one of {', '.join(RECIPES)}")
        if not self.dedistill_seeds or len(set(self.dedistill_seeds)) != len(self.dedistill_seeds):
            raise ValueError(f"dedistill_seeds: must be distinct and at least one, got {self.dedistill_seeds}")
        if 1 not in self.world.objects:
            raise ValueError(f"world.objects: {self.world.objects} has no single-object samples, which the eval "
                             f"prompts are; include 1")


SMOKE = {  # seconds-long: every stage runs, numbers are meaningless
    "n_train": 64, "judge": {"n_train": 64, "n_test": 32, "steps": 5, "batch_size": 16},
    "vae": {"steps": 3, "batch_size": 8, "block_out_channels": [8, 8, 8]},
    "model": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
              "axes_dims_rope": [4, 6, 6]},
    # in-process trainers (nproc 1): the demo's tests run the torchrun path
    "teacher": {"steps": 2, "batch_size": 4, "nproc": 1}, "dedistill": {"steps": 2, "batch_size": 4, "nproc": 1},
    "distill": {"n_pairs": 8, "teacher_steps": 2, "train_steps": 2, "batch_size": 4},
    "eval": {"n_prompts": 6, "repeats": 1, "grid_prompts": 2}, "prune": {"steps": 2},
    "dev": {"train_steps": 2, "batch_size": 4},
    # one adapter and one recipe (the pruned one: the other recipes are objective keys the trainer's tests cover),
    # with the preset's seeds: every code path of the de-distillation stage, 4 runs instead of 10
    "dedistill_adapters": ["full"], "dedistill_recipes": ["pruned-chroma"],
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


SMOKE_SUFFIX = "-smoke"


def load_proof_config(path: str | None, *, smoke: bool = False, overrides: list[str] = ()) -> ProofConfig:
    """A preset (+ SMOKE when `smoke`) + key=value overrides. A smoke run's out_dir gets SMOKE_SUFFIX, so its
    64-sample world, judge and VAE never sit where the full run with the same config looks for its stages."""
    data = load_yaml(path) if path else {}
    if smoke:
        data = _merge(data, SMOKE)
    for item in overrides:
        key, _, value = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_yaml(value)
    cfg = from_dict(ProofConfig, data)
    if smoke:
        cfg.out_dir = cfg.out_dir.rstrip("/") + SMOKE_SUFFIX
    return cfg


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class StageRecord:
    """`out_dir/stages.json`: the settings that made each stage's output. A stage whose output exists is reused only
    when the settings it was made with are the ones asked for now (as `dedistill data convert` checks its parts);
    anything else is a ValueError naming the directory and the keys that differ, never a silent reuse."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def claim(self, stage: str, settings: dict, outputs: list[Path]) -> dict:
        """Check `stage`'s existing outputs against `settings`, then record them (before the stage runs, so an
        interrupted stage resumes only under the same settings). Returns the settings, normalised."""
        settings = as_stored(settings)
        present = [p for p in outputs if p.exists()]
        old = self.done.get(stage)
        if present and old != settings:
            if old is None:
                raise ValueError(f"{present[0]}: exists, but {self.path} does not say which settings made it (an older "
                                 f"or interrupted run); delete it or use another out_dir")
            check_same_settings(f"{present[0]}: made by an earlier run", old, settings,
                                remedy="delete it or use another out_dir")
        if old != settings:
            self.done[stage] = settings
            write_text_atomic(self.path, json.dumps(self.done, indent=2))
        return settings


def stage_settings(cfg: ProofConfig) -> dict[str, dict]:
    """What each stage's output depends on: its own settings and those of the stages it reads."""
    def recorded(settings, added: dict) -> dict:
        """asdict(settings) less the keys added after records existed, while they hold the value that reproduces the
        old behaviour: records made before a key existed stay valid."""
        return {k: v for k, v in asdict(settings).items() if k not in added or v != added[k]}

    def budget(b: TrainBudget) -> dict:
        return recorded(b, {"nproc": 1})

    world = {"n_train": cfg.n_train, "resolution": cfg.resolution, "seed": cfg.seed}
    if drawn := recorded(cfg.world, asdict(WorldSpec())):  # absent for the default world: its records stay valid
        world["world"] = drawn
    judge = {"judge": recorded(cfg.judge, {"smooth_noise": 0}), "resolution": cfg.resolution, "seed": cfg.seed}
    vae = {"vae": recorded(cfg.vae, {"fg_weight": 0, "fg_dilate": 0, "objects": None}), **world}
    # The pipeline (the VAE, the text encoders, a fresh transformer): a VAE is reused when only the model or the text
    # encoders change.
    pipeline = {"vae": vae, "model": asdict(cfg.model)}
    if text := recorded(cfg.text, asdict(ToyText())):  # absent for the tiny model's encoders
        pipeline["text"] = text
    teacher = {"teacher": budget(cfg.teacher), "max_text_tokens": cfg.max_text_tokens, "pipeline": pipeline,
               "world": world}
    distill = {"distill": asdict(cfg.distill), "teacher": teacher}
    prune = {"prune": asdict(cfg.prune), "student": distill}
    dev = {"dev": asdict(cfg.dev), "teacher": teacher}
    out = {"world": world, "judge": judge, "vae": vae, "pipeline": pipeline, "teacher": teacher, "distill": distill,
           "prune": prune, "dev": dev}
    for r in dedistill_runs(cfg):
        settings = {"dedistill": budget(cfg.dedistill), "adapter": r.adapter,
                    "student": {"student": distill, "pruned": prune, "dev": dev}[r.base]}
        if r.objective:  # keys absent for the plain adapter runs: records made before recipes existed stay valid
            settings["objective"] = r.objective
        if r.seed != cfg.seed:
            settings["seed"] = r.seed
        out[r.run_dir] = settings
    return out


@dataclass(frozen=True)
class DedistillRun:
    model: str  # its rows' name in the table: dedistilled-<adapter or recipe>
    run_dir: str  # under out_dir; seeds other than the config's get a -seed<N> suffix
    adapter: str
    objective: dict
    base: str  # the model it starts from (RECIPES)
    seed: int


def dedistill_runs(cfg: ProofConfig) -> list[DedistillRun]:
    """Every de-distillation run: each adapter with the proof's recipe, then each recipe (full), for every seed."""
    kinds = [(a, a, {}, "student") for a in cfg.dedistill_adapters]
    kinds += [(r, "full", *RECIPES[r]) for r in cfg.dedistill_recipes]
    guidance = {"teacher_guidance": list(cfg.dev.guidance)}  # the teacher objective draws w where dev learnt it
    return [DedistillRun(model=f"dedistilled-{name}", adapter=adapter, base=base, seed=seed,
                         objective={**objective, **guidance} if objective.get("kind") == "teacher" else objective,
                         run_dir=f"dedistill-{name}" + ("" if seed == cfg.seed else f"-seed{seed}"))
            for name, adapter, objective, base in kinds for seed in cfg.dedistill_seeds]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------- stages


def stage_world(cfg: ProofConfig, out: Path) -> dict:
    """Training shards + held-out eval set (single-object samples, full captions unseen in training)."""
    data = out / "data"
    if not data.exists():
        write_tiny_data(data, n=cfg.n_train, size=cfg.resolution, seed=cfg.seed, world=cfg.world)
    return {"data": data, **held_out_world(cfg)}


def held_out_world(cfg: ProofConfig) -> dict:
    """The training captions and the held-out eval set (the demo evaluates on the same prompts as the proof)."""
    train_captions = {c for _, _, c, _ in iter_samples(cfg.n_train, size=8, seed=cfg.seed, world=cfg.world)}
    pool = single_object_samples(4 * cfg.eval.n_prompts, size=cfg.resolution, seed=cfg.seed + 10_000, world=cfg.world)
    held = [(img, a) for img, a in pool if full_caption(a) not in train_captions][: cfg.eval.n_prompts]
    return {"train_captions": sorted(train_captions), "eval": held, "eval_prompts": [full_caption(a) for _, a in held]}


def held_out_renders(cfg: ProofConfig, world: WorldSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single-object renders of `world` at the judge's test seed, and their labels."""
    test = single_object_samples(cfg.judge.n_test, size=cfg.resolution, seed=cfg.seed + 20_000, world=world)
    return to_tensor([im for im, _ in test]), {k: torch.tensor([labels_of(a)[k] for _, a in test]) for k in ATTRS}


def stage_judge(cfg: ProofConfig, out: Path, world: dict):
    """The judge, its accuracy on the default world's held-out renders (the world it learns), and the held-out renders
    of `cfg.world` (the VAE's check and toy FID's real images: a VAE trained on another world never saw the default's;
    for the default world they are the same images)."""
    path = out / "judge.safetensors"
    j = cfg.judge
    test_x, test_y = held_out_renders(cfg, WorldSpec())
    if path.exists():
        judge = load_judge(path)
    else:
        t0 = time.time()
        # The judge trains on a seed disjoint from the generators' training shards and from its test set.
        train = single_object_samples(j.n_train, size=cfg.resolution, seed=cfg.seed + 30_000)
        x = to_tensor([im for im, _ in train])
        y = {k: torch.tensor([labels_of(a)[k] for _, a in train]) for k in ATTRS}
        judge = train_judge(x, y, steps=j.steps, batch_size=j.batch_size, lr=j.lr, seed=cfg.seed, width=j.width,
                            feat_dim=j.feat_dim, smooth_noise=j.smooth_noise)
        save_judge(judge, path)
        log(f"[proof] judge trained in {time.time() - t0:.0f}s")
    _, preds = judge_images(judge, test_x)
    acc = accuracy(preds, test_y)
    log(f"[proof] judge held-out accuracy on real images: {json.dumps({k: round(v, 3) for k, v in acc.items()})}")
    if cfg.world != WorldSpec():
        test_x, test_y = held_out_renders(cfg, cfg.world)
    return judge, acc, test_x, test_y


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, fg_weight: float, fg_dilate: int = 0) -> torch.Tensor:
    """MSE with object pixels, and those within `fg_dilate` pixels of one, weighted 1 + fg_weight. An object pixel
    differs from the image's per-channel median (its background, as the judge sees it) by more than 0.1 in some
    channel, on [-1, 1]."""
    if not fg_weight:
        return torch.nn.functional.mse_loss(rec, x)
    bg = x.flatten(2).median(dim=2).values[..., None, None]
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).to(x.dtype)
    if fg_dilate:
        fg = torch.nn.functional.max_pool2d(fg, 2 * fg_dilate + 1, stride=1, padding=fg_dilate)
    return ((1 + fg_weight * fg) * (rec - x).pow(2)).mean()


def vae_world(cfg: ProofConfig) -> WorldSpec:
    """The world the VAE's training images are drawn from: the world's palettes, with `vae.objects`' counts if set."""
    return cfg.world if cfg.vae.objects is None else replace(cfg.world, objects=list(cfg.vae.objects))


def stage_vae(cfg: ProofConfig, out: Path, judge, test_x: torch.Tensor) -> tuple[Path, dict, dict | None]:
    """Train the VAE into `out/vae` (a diffusers AutoencoderKL dir); its reconstruction of the held-out renders."""
    vae_dir = out / "vae"
    v = cfg.vae
    if not vae_dir.exists():
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        n = len(v.block_out_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=v.latent_channels,
            block_out_channels=tuple(v.block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8 if min(
                v.block_out_channels) % 8 == 0 else 4, sample_size=cfg.resolution,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        x = to_tensor([im for _, im, _, _ in iter_samples(cfg.n_train, size=cfg.resolution, seed=cfg.seed,
                                                          world=vae_world(cfg))])
        opt = torch.optim.AdamW(vae.parameters(), lr=v.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=v.lr, total_steps=v.steps)
        g = torch.Generator().manual_seed(cfg.seed)
        for step in range(v.steps):
            xb = x[torch.randint(len(x), (v.batch_size,), generator=g)]
            post = vae.encode(xb).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
            loss = reconstruction_loss(rec, xb, v.fg_weight, v.fg_dilate) + v.kl_weight * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % max(1, v.steps // 5) == 0:
                log(f"[proof] vae step {step + 1}/{v.steps} loss {loss.item():.4f}")
        vae.eval().requires_grad_(False)
        with torch.no_grad():  # FLUX-style normalisation: latents' mean -> shift_factor, 1/std -> scaling_factor
            lat = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, min(len(x), 2048), 256)])
        vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1.0 / lat.std()))
        with atomic_output_dir(vae_dir) as tmp:
            vae.save_pretrained(str(tmp), safe_serialization=True)
        log(f"[proof] vae trained in {time.time() - t0:.0f}s")
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    with torch.no_grad():
        lat = vae.encode(test_x).latent_dist.mean
        rec = vae.decode(lat).sample.clamp(-1, 1)
    mse = float(torch.nn.functional.mse_loss(rec, test_x))  # on [-1, 1]
    preds = judge_images(judge, rec)[1] if judge is not None else None  # scored against the test labels by the caller
    stats = {"mse": mse, "psnr_db": float(10 * np.log10(4.0 / mse))}
    return vae_dir, stats, preds


def stage_pipeline(cfg: ProofConfig, out: Path, vae_dir: Path) -> Path:
    """The pipeline dir the teacher trains from: the tiny tokenizers and text encoders (`cfg.text`'s), the trained
    VAE and a fresh transformer of `cfg.model`'s dims."""
    pipe_dir = out / "pipeline"
    if not pipe_dir.exists():
        d = cfg.model
        assert sum(d.axes_dims_rope) == d.attention_head_dim, "model.axes_dims_rope must sum to attention_head_dim"
        text = cfg.text.dims("tiny")["transformer"]  # the text encoders' widths
        vae = AutoencoderKL.from_pretrained(str(vae_dir))
        with atomic_output_dir(pipe_dir) as tmp:
            pipe = build_tiny_pipeline(tmp / ".tok", seed=cfg.seed, text=cfg.text)
            torch.manual_seed(cfg.seed + 1)
            pipe.transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=d.num_layers,
                num_single_layers=d.num_single_layers, attention_head_dim=d.attention_head_dim,
                num_attention_heads=d.num_attention_heads, joint_attention_dim=text["joint_attention_dim"],
                pooled_projection_dim=text["pooled_projection_dim"], guidance_embeds=False,
                axes_dims_rope=tuple(d.axes_dims_rope),
            )
            pipe.vae = vae
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            shutil.rmtree(tmp / ".tok")
        log(f"[proof] pipeline: transformer width {d.num_attention_heads * d.attention_head_dim}, "
            f"{d.num_layers}+{d.num_single_layers} blocks, text {cfg.text}")
    return pipe_dir


def _job(cfg: ProofConfig, *, run_dir: Path, model_path: Path, data: Path, budget: TrainBudget, adapter: str,
         seed: int | None = None, objective: dict | None = None):
    return from_dict(JobConfig, {
        "run_dir": str(run_dir), "seed": cfg.seed if seed is None else seed,
        "model": {"path": str(model_path), "dtype": "fp32",
                  "adapter": {"kind": adapter, "rank": 8, "alpha": 8.0, "lokr_factor": 4}},
        "objective": {"timestep_sampler": "logit_normal", "shift": "none", "caption_dropout": budget.caption_dropout,
                      "max_text_tokens": cfg.max_text_tokens, "attention_mask": True, "trim_text": True,
                      **(objective or {})},
        "data": {"local": str(data), "resolution": cfg.resolution, "shuffle": True, "num_workers": 0},
        "train": {"max_steps": budget.steps, "batch_size": budget.batch_size // budget.nproc, "grad_clip": 1.0,
                  "log_every": max(1, budget.steps // 10), "progress_bar": False},
        "optim": {"lr": budget.lr, "schedule": "cosine", "warmup_steps": min(50, budget.steps // 10),
                  "min_lr_ratio": 0.1},
        "checkpoint": {"every_steps": budget.steps, "keep_last": 1, "resume": True},
        "sample": {"at_end": False, "resolution": cfg.resolution},
        "parallel": {"backend": "fsdp2"},
    })


def trained(run_dir: Path, steps: int) -> bool:
    """Whether `run_dir` holds a complete checkpoint at `steps` or later. A run stopped before that (a signal, a
    lost session) is not trained: `run_trainer` on it resumes from its latest checkpoint, as the trainer does."""
    done = list_checkpoints(RunDir(run_dir).checkpoints)
    return bool(done) and done[-1][0] >= steps


def run_trainer(job, nproc: int = 1) -> None:
    """The real trainer: in-process at world size 1 (env:// rendezvous on a free local port), or under torchrun."""
    if nproc > 1:
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        job_yaml = Path(job.run_dir) / "proof_job.yaml"
        dump_config(job, job_yaml)
        t0 = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "train", str(job_yaml)]
        rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if rc:
            raise RuntimeError(f"{job.run_dir}: torchrun exited with {rc}")
        log(f"[proof] {job.run_dir}: {job.train.max_steps} steps on {nproc} processes in {time.time() - t0:.0f}s")
        return

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t0 = time.time()
        state = train(job, trainer_hooks(job))
        losses = [h["loss"] for h in state.history]
        if losses:
            log(f"[proof] {job.run_dir}: {state.step} steps in {time.time() - t0:.0f}s, loss "
                f"{np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_pipeline(base: Path, transformer, out: Path) -> Path:
    """A diffusers pipeline dir: `base` with its transformer replaced."""
    if not out.exists():
        with atomic_output_dir(out) as tmp:
            for item in base.iterdir():
                if item.name != "transformer":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
    return out


def load_model(path: Path):
    # fp32 everywhere (the toy is small; also on GPU, so CPU and GPU numbers differ only by kernels)
    return load_for_inference(path, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype="fp32")


def stage_teacher(cfg: ProofConfig, out: Path, pipe_dir: Path, world: dict) -> Path:
    """The real trainer, adapter `full`, on the world's shards -> `teacher_pipeline/` (a diffusers dir)."""
    teacher_run = out / "teacher"
    if not (out / "teacher_pipeline").exists():
        run_trainer(_job(cfg, run_dir=teacher_run, model_path=pipe_dir, data=world["data"], budget=cfg.teacher,
                         adapter="full"), cfg.teacher.nproc)
        export_pipeline(pipe_dir, load_model(teacher_run).transformer, out / "teacher_pipeline")
    return out / "teacher_pipeline"


def stage_distill(cfg: ProofConfig, out: Path, pipe_dir: Path, world: dict) -> Path:
    """Reflow on the teacher's CFG couplings (evals/experiments/distill.py) -> `student_pipeline/`."""
    student_dir = out / "student_pipeline"
    if not student_dir.exists():
        d = cfg.distill
        teacher = load_model(out / "teacher_pipeline")
        h = w = cfg.resolution // (2 ** (len(cfg.vae.block_out_channels) - 1))
        prompts = (world["train_captions"] * (d.n_pairs // len(world["train_captions"]) + 1))[: d.n_pairs]
        t0 = time.time()
        noise, x0 = teacher_pairs(teacher.transformer, teacher.text, prompts, latent_hw=(h, w),
                                  channels=cfg.vae.latent_channels, cfg_scale=d.teacher_cfg, steps=d.teacher_steps,
                                  seed=cfg.seed + 50_000, max_text_tokens=cfg.max_text_tokens)
        log(f"[proof] {len(prompts)} teacher CFG pairs in {time.time() - t0:.0f}s")
        student, hist = reflow(teacher.transformer, teacher.text, prompts, noise, x0, latent_hw=(h, w),
                               student_steps=d.student_steps, train_steps=d.train_steps, batch_size=d.batch_size,
                               lr=d.lr, seed=cfg.seed, max_text_tokens=cfg.max_text_tokens, log=log)
        export_pipeline(pipe_dir, student, student_dir)
    return student_dir


def stage_dev(cfg: ProofConfig, out: Path, pipe_dir: Path) -> Path:
    """Guided distillation of the teacher (evals/experiments/distill.py) -> `dev_pipeline/`, a diffusers dir whose
    transformer has `guidance_embeds: true`, as FLUX.1-dev's does."""
    dev_dir = out / "dev_pipeline"
    if not dev_dir.exists():
        d = cfg.dev
        teacher = load_model(out / "teacher_pipeline")
        t0 = time.time()
        images, captions = [], []
        for _, im, caption, _ in iter_samples(cfg.n_train, size=cfg.resolution, seed=cfg.seed, world=cfg.world):
            images.append(im)
            captions.append(caption)
        x = to_tensor(images).to(teacher.device)
        with torch.no_grad():  # the world's training images as the transformer sees them: packed, normalised latents
            x0 = torch.cat([pack_latents(normalise_latents(teacher.vae, teacher.vae.encode(x[i : i + 256]).latent_dist
                                                           .mean)) for i in range(0, len(x), 256)]).float()
        h = w = cfg.resolution // (2 ** (len(cfg.vae.block_out_channels) - 1))
        student, _ = guidance_distill(teacher.transformer, teacher.text, captions, x0, latent_hw=(h, w),
                                      guidance=tuple(d.guidance), train_steps=d.train_steps, batch_size=d.batch_size,
                                      lr=d.lr, seed=cfg.seed, max_text_tokens=cfg.max_text_tokens, log=log)
        export_pipeline(pipe_dir, student, dev_dir)
        log(f"[proof] toy dev (guidance-distilled, w in {d.guidance}) in {time.time() - t0:.0f}s")
    return dev_dir


def stage_prune(cfg: ProofConfig, out: Path, student_dir: Path, world: dict) -> Path:
    """`dedistill prune` of the student (FLUX -> Chroma, the approximator fit on the world's captions) ->
    `student_pruned/`, a ChromaPipeline dir with its prune_report.json."""
    pruned = out / "student_pruned"
    if not pruned.exists():
        p = cfg.prune
        report = run_prune(student_dir, pruned, world["data"], eval_resolution=cfg.resolution, dtype="fp32",
                           fit=FitSettings(steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=cfg.seed),
                           device="cuda" if torch.cuda.is_available() else "cpu",
                           max_text_tokens=cfg.max_text_tokens, log=log)
        log(f"[proof] pruned student: {json.dumps({k: report[k] for k in ('parameters', 'approximator', 'velocity')})}")
    return pruned


# ------------------------------------------------------------------------------------------------------------ eval


def evaluate(cfg: ProofConfig, models: dict[str, Path | list[Path]], judge, world: dict, out: Path,
             real_x: torch.Tensor, *, cells: dict | None = None, write_grid: bool = True,
             embedded: frozenset[str] = frozenset()) -> list[dict]:
    """Rows of {model, seed, steps, cfg, repeat, fid, acc_*}; a model given as a list of paths (one per training
    seed) gets rows from each, numbered by `seed` in list order. A model named in `embedded` (a guidance-distilled
    one) is fed each scale through its guidance embedder, with real CFG off, as FluxPipeline samples FLUX.1-dev. The
    first row is real images: adherence of the eval set's own renders, FID of an independent real set (`real_x`, the
    judge's test images) against them (the floor). Each model samples with the mask and visible padding tokens it
    was trained with (train.inference.text_settings). The grid shows each model's first path."""
    e = cfg.eval
    prompts = world["eval_prompts"]
    labels = {k: torch.tensor([labels_of(a)[k] for _, a in world["eval"]]) for k in ATTRS}
    ref_feats, ref_preds = judge_images(judge, to_tensor([im for im, _ in world["eval"]]))
    ref_mu, ref_sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    real_feats, _ = judge_images(judge, real_x)
    real_fid = frechet_distance(real_feats.mean(0), np.cov(real_feats, rowvar=False), ref_mu, ref_sigma)
    rows = [{"model": "real (held-out)", "steps": 0, "cfg": 0.0, "repeat": 0, "fid": real_fid,
             **{f"acc_{k}": v for k, v in accuracy(ref_preds, labels).items()}}]
    grid_rows = []
    for name, paths in models.items():
        for seed, path in enumerate(paths if isinstance(paths, list) else [paths]):
            rows += _evaluate_model(cfg, name, seed, path, judge, prompts, labels, (ref_mu, ref_sigma),
                                    grid_rows if seed == 0 else None, cells if seed == 0 else None,
                                    embedded=name in embedded)
    if not write_grid:
        return rows
    # Sample grid: one row per (model, steps); columns = cfg scales x grid prompts (same noise seeds throughout).
    make_grid([imgs for _, imgs in grid_rows]).resize(
        (len(grid_rows[0][1]) * (cfg.resolution + 2) * 2, len(grid_rows) * (cfg.resolution + 2) * 2), 0
    ).save(out / "samples_grid.png")
    (out / "samples_grid.txt").write_text(
        "rows: " + ", ".join(n for n, _ in grid_rows) + "\ncolumns: for each cfg in " + str(e.cfg_scales)
        + ", prompts:\n" + "\n".join(prompts[: e.grid_prompts]) + "\n")
    return rows


def _evaluate_model(cfg: ProofConfig, name: str, seed: int, path: Path, judge, prompts: list[str], labels: dict,
                    ref: tuple, grid_rows: list | None, cells: dict | None, *, embedded: bool = False) -> list[dict]:
    e, rows = cfg.eval, []
    m = load_model(path)
    masked, visible = text_settings(path, m.config)
    # embedded: the embedder kept and fed each scale (model.guidance: keep), one transformer per scale, loaded once;
    # sampled with one conditional pass per step
    guided = {scale: load_transformer(path, dtype=m.dtype, guidance="keep", guidance_scale=scale).to(m.device)
              .eval().requires_grad_(False) for scale in e.cfg_scales} if embedded else {}
    for steps in e.steps:
        row_imgs = []
        for scale in e.cfg_scales:
            m.transformer = guided.get(scale, m.transformer)
            for r in range(e.repeats):
                t0 = time.time()
                s = SamplingSettings(steps=steps, cfg_scale=1.0 if embedded else scale, resolution=cfg.resolution,
                                    seed=100_000 * (r + 1),
                                    max_text_tokens=cfg.max_text_tokens, batch_size=256, masked=masked,
                                    visible_padding_tokens=visible)
                images = generate(m.transformer, m.vae, m.text, prompts, s, dtype=m.dtype)
                feats, preds = judge_images(judge, to_tensor(images))
                fid = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), *ref)
                acc = accuracy(preds, labels)
                rows.append({"model": name, "seed": seed, "steps": steps, "cfg": scale, "repeat": r, "fid": fid,
                             **{f"acc_{k}": v for k, v in acc.items()}})
                log(f"[proof] {name:>16} seed {seed} steps {steps:2d} cfg {scale:3.1f} rep {r}: fid {fid:8.3f} "
                    f"adherence {acc['mean']:.3f} ({time.time() - t0:.1f}s)")
                if r == 0:
                    row_imgs += images[: e.grid_prompts]
                    if cells is not None:  # (model, steps, cfg) -> the grid prompts' images, for other layouts
                        cells[name, steps, scale] = images[: e.grid_prompts]
        if grid_rows is not None:
            grid_rows.append((f"{name} {steps} steps", row_imgs))
    return rows


def summarise(rows: list[dict], cfg: ProofConfig) -> str:
    """Markdown table: mean ± spread (half the range over training seeds x noise repeats) of toy FID and adherence
    per model/steps/cfg."""
    models = list(dict.fromkeys(r["model"] for r in rows if r["steps"]))
    lines = ["| model | steps | " + " | ".join(f"cfg {c:g} FID" for c in cfg.eval.cfg_scales) + " | "
             + " | ".join(f"cfg {c:g} adh." for c in cfg.eval.cfg_scales) + " |",
             "|---|---|" + "---|" * (2 * len(cfg.eval.cfg_scales))]

    def cell(vals, fmt):
        return f"{np.mean(vals):{fmt}}" + (f" ± {(max(vals) - min(vals)) / 2:{fmt}}" if len(vals) > 1 else "")

    for m in models:
        for steps in cfg.eval.steps:
            sel = {c: [r for r in rows if r["model"] == m and r["steps"] == steps and r["cfg"] == c]
                   for c in cfg.eval.cfg_scales}
            lines.append(f"| {m} | {steps} | " + " | ".join(cell([r["fid"] for r in sel[c]], ".2f")
                                                          for c in cfg.eval.cfg_scales) + " | "
                         + " | ".join(cell([r["acc_mean"] for r in sel[c]], ".3f") for c in cfg.eval.cfg_scales)
                         + " |")
    return "\n".join(lines)


def plot(rows: list[dict], cfg: ProofConfig, path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows if r["steps"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(models):
        for steps, ls in zip(cfg.eval.steps, ("--", "-")):
            xs = cfg.eval.cfg_scales
            for ax, key in zip(axes, ("acc_mean", "fid")):
                vals = [[r[key] for r in rows if r["model"] == m and r["steps"] == steps and r["cfg"] == c] for c in xs]
                ax.errorbar(xs, [np.mean(v) for v in vals], yerr=[(max(v) - min(v)) / 2 for v in vals], ls=ls,
                            marker="o", color=f"C{i}", label=f"{m}, {steps} steps", capsize=3)
    real = [r for r in rows if r["model"].startswith("real")][0]
    axes[0].axhline(real["acc_mean"], color="gray", lw=0.8, ls=":", label="real images")
    axes[0].set(xlabel="CFG scale", ylabel="prompt adherence (judge accuracy)", title="Adherence vs CFG")
    axes[1].set(xlabel="CFG scale", ylabel="toy FID (judge features)", title="Toy FID vs CFG (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main


STAGES = ("vae", "distill", "eval")  # where --until may stop: the sanity checks, the toy schnell, everything


def run(cfg: ProofConfig, *, until: str = "eval") -> dict:
    """All stages, or those up to and including `until` (`distill` is what `dedistill toy-schnell` ships)."""
    if until not in STAGES:
        raise ValueError(f"--until: '{until}' is not one of {', '.join(STAGES)}")
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record, settings = StageRecord(out), stage_settings(cfg)
    # Checked for every stage before any runs: a mismatch fails in a second, not after an hour of retraining.
    outputs = {"world": [out / "data"], "judge": [out / "judge.safetensors"], "vae": [out / "vae"],
               "pipeline": [out / "pipeline"],
               "teacher": [out / "teacher", out / "teacher_pipeline"], "distill": [out / "student_pipeline"],
               "prune": [out / "student_pruned"], "dev": [out / "dev_pipeline"],
               **{r.run_dir: [out / r.run_dir] for r in dedistill_runs(cfg)}}
    for stage, paths in outputs.items():
        record.claim(stage, settings[stage], paths)

    (out / "proof_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    timings: dict[str, float] = {}
    t = time.time()

    def lap(name):
        nonlocal t
        timings[name] = round(time.time() - t, 1)
        t = time.time()

    world = stage_world(cfg, out)
    log(f"[proof] world: {cfg.n_train} training samples, {len(world['eval_prompts'])} held-out eval prompts")
    lap("world")
    judge, judge_acc, test_x, test_y = stage_judge(cfg, out, world)
    lap("judge")
    vae_dir, vae_stats, rec_preds = stage_vae(cfg, out, judge, test_x)
    pipe_dir = stage_pipeline(cfg, out, vae_dir)
    rec_acc = accuracy(rec_preds, test_y)
    log(f"[proof] vae held-out reconstruction: {vae_stats}")
    log(f"[proof] judge on vae reconstructions: {json.dumps({k: round(v, 3) for k, v in rec_acc.items()})}")
    lap("vae")
    sanity = {"judge_heldout_accuracy": judge_acc, "vae": vae_stats, "judge_accuracy_on_vae_reconstructions": rec_acc}
    (out / "sanity.json").write_text(json.dumps(sanity, indent=2))
    if until == "vae":
        return {**sanity, "timings_s": timings}

    stage_teacher(cfg, out, pipe_dir, world)
    lap("teacher")
    student_dir = stage_distill(cfg, out, pipe_dir, world)
    lap("distill")
    if until == "distill":
        return {**sanity, "timings_s": timings, "student": str(student_dir)}

    models = {"teacher": [out / "teacher_pipeline"], "student": [student_dir]}
    runs = dedistill_runs(cfg)
    bases = {"student": student_dir}
    if any(r.base == "pruned" for r in runs):
        bases["pruned"] = stage_prune(cfg, out, student_dir, world)
        models["student-pruned"] = [bases["pruned"]]
        lap("prune")
    if any(r.base == "dev" for r in runs):
        bases["dev"] = stage_dev(cfg, out, pipe_dir)
        # bypassed with real CFG (what de-distillation starts from), and as it is meant to be used: embedded scale
        models["dev"] = models["dev-embedded"] = [bases["dev"]]
        lap("dev")
    for r in runs:
        run_dir = out / r.run_dir
        if not trained(run_dir, cfg.dedistill.steps):
            run_trainer(_job(cfg, run_dir=run_dir, model_path=bases[r.base],
                             data=world["data"], budget=cfg.dedistill, adapter=r.adapter, seed=r.seed,
                             objective=r.objective), cfg.dedistill.nproc)
        models.setdefault(r.model, []).append(run_dir)  # one entry per seed: its rows pool seeds and repeats
        lap(r.run_dir)

    rows = evaluate(cfg, models, judge, world, out, test_x, embedded=frozenset({"dev-embedded"}))
    lap("eval")
    table = summarise(rows, cfg)
    plot(rows, cfg, out / "cfg_curve.png")
    results = {"config": to_dict(cfg), **sanity, "rows": rows,
               "timings_s": timings, "torch_threads": torch.get_num_threads(),
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
    log(table)
    log(f"[proof] timings (s): {timings}; results in {out}/results.json, table.md, cfg_curve.png, samples_grid.png")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evals.experiments.proof", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a configs/proof*.yaml preset")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run of every stage (for the test suite), written to <out_dir>-smoke")
    p.add_argument("--until", default="eval", choices=STAGES,
                   help="stop after this stage (vae: the sanity checks only; distill: the toy schnell)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. out_dir=runs/x teacher.steps=100")
    a = p.parse_args(argv)
    try:  # a bad key, value or out_dir is one line, as from `dedistill` and `toy_schnell`, not a traceback
        run(load_proof_config(a.config, smoke=a.smoke, overrides=a.overrides), until=a.until)
    except ValueError as e:
        print(f"proof: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
