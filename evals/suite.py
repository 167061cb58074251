"""Eval suites: a YAML that names prompts, sampling settings (steps × CFG scales, plus extras such as the schnell
baseline), the FID reference and Inception weights, and the CLIP model. `evaluate` runs one model or checkpoint
through every setting and writes `metrics.json` and `grid_cfg<S>.png` (plus TensorBoard scalars/images under
`eval/<suite>/` when given a logger). In a run, each suite has its own `evals/step_N/<suite>/` directory.

Paths in a suite may use `{model}` (the base model dir: the run's `model.path` for a checkpoint, or the model dir
itself), `{data}` (the run's `data.local`) and `{suite_dir}` (the YAML's directory), so one preset works for any
run of the tiny model.

Across ranks (an eval job under torchrun, model NOT sharded): every rank loads its own copy, samples a contiguous
block of the prompts (image i always uses seed + i, so the images equal a 1-rank run's), computes its images' Inception
features and CLIP cosines, and rank 0 gathers those (and the few grid images) and writes the results.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from evals.clip_score import CLIPScorer, clip_score_from_cosines
from evals.fid import Stats, fid_from_stats, open_mds, reference_stats, source_kind
from evals.sampler import generate, make_grid
from train.config import (
    ImageKnobs, _check_choice, _check_positive, apply_overrides, from_dict, load_run_config, load_yaml,
)
from train.inference import load_for_inference, resolve_checkpoint, text_settings
from train.metrics import Logger
from train.outputs import write_text_atomic
from train.run_dir import RunDir, checkpoint_step
from train.sampling import SamplingSettings

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "evals"


@dataclass(kw_only=True)
class PromptsConfig:
    file: str = ""
    """A text file, one prompt per line (blank lines and lines starting with '#' are skipped)."""
    mds: str = ""
    """Or: an MDS dataset whose captions are sampled (e.g. COCO captions, the same set as fid.reference)."""
    caption_key: str = "caption"
    seed: int = 0
    """Which captions are drawn from `mds`."""

    def __post_init__(self) -> None:
        if bool(self.file) == bool(self.mds):
            raise ValueError("prompts: set exactly one of prompts.file or prompts.mds")


@dataclass(kw_only=True)
class SettingConfig:
    steps: int
    cfg_scale: float


@dataclass(kw_only=True)
class SamplingConfig(ImageKnobs):
    """An eval suite's `sampling:`: the image knobs (`train.config.ImageKnobs`), the (steps, cfg) grid, and how the
    target is loaded."""

    steps: list[int] = field(default_factory=lambda: [28])
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.5, 5.0])
    """Every (steps, cfg) pair of the grid is one setting; cfg 1 is no guidance (one forward per step)."""
    extra: list[SettingConfig] = field(default_factory=list)
    """Settings outside the grid, e.g. FLUX.1-schnell's own: [{steps: 4, cfg_scale: 1.0}]. Image i of every setting
    starts from the noise of seed + i: settings differ only in what they vary."""
    max_text_tokens: int = 0
    """0: the run's objective.max_text_tokens (512 for a model dir)."""
    mask: str = "auto"
    """T5 padding mask: auto (the run's objective.attention_mask; true for a model dir) | true | false.
    Stock FLUX.1-schnell was trained without it: use false for a schnell-only baseline suite."""
    dtype: str = "auto"
    ema: bool = False
    """Evaluate the checkpoint's EMA weights instead of the raw ones."""
    schedule: str = "auto"
    """Sigma schedule: auto (a checkpoint: its run's sample.schedule; a model dir: its own scheduler config, so
    FLUX.1-schnell is sampled on schnell's schedule) | dynamic | model | constant (`shift`)."""
    shift: float = 1.0
    """The shift of `schedule: constant`."""

    section: ClassVar[str] = "sampling."

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.steps or not self.cfg_scales:
            raise ValueError("sampling.steps / sampling.cfg_scales: need at least one value each")
        for i, s in enumerate(self.steps):
            _check_positive(f"sampling.steps[{i}]", s)
        for i, s in enumerate(self.extra):
            _check_positive(f"sampling.extra[{i}].steps", s.steps)
        _check_positive("sampling.max_text_tokens", self.max_text_tokens, allow_zero=True)
        _check_choice("sampling.mask", self.mask, ("auto", "true", "false"))
        _check_choice("sampling.dtype", self.dtype, ("auto", "fp32", "bf16"))
        _check_choice("sampling.schedule", self.schedule, ("auto", "dynamic", "model", "constant"))
        _check_positive("sampling.shift", self.shift)


@dataclass(kw_only=True)
class FIDConfig:
    inception_weights: str = ""
    """FID Inception weights, .safetensors in pytorch-fid's key naming (docs/evals.md); empty: no FID."""
    reference: str = ""
    """Real images: an image folder, an MDS dataset (column `image_key`) or a pytorch-fid .npz (mu, sigma)."""
    reference_count: int = 0
    """Use the first N reference images (0 = all)."""
    image_key: str = "image"
    dims: int = 2048
    """Inception features: 2048 (pool3, the standard FID) | 768 | 192 | 64 (pytorch-fid's --dims)."""
    resize_reference: bool = True
    """Centre-crop and resize reference images to sampling.resolution first (what the trainer sees), so real and
    generated images reach Inception the same way. False: each image straight to 299 px, as pytorch-fid."""
    batch_size: int = 32
    cache_dir: str = ""
    """Where reference statistics are cached (default: ~/.cache/dedistill/fid_stats)."""

    def __post_init__(self) -> None:
        _check_choice("fid.dims", self.dims, (64, 192, 768, 2048))
        _check_positive("fid.reference_count", self.reference_count, allow_zero=True)
        _check_positive("fid.batch_size", self.batch_size)
        if self.inception_weights and not self.reference:
            raise ValueError("fid.reference: must be set when fid.inception_weights is")


@dataclass(kw_only=True)
class ClipConfig:
    model: str = ""
    """A local Hugging Face CLIPModel dir (e.g. openai/clip-vit-large-patch14); empty: no CLIP score."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_positive("clip.batch_size", self.batch_size)


@dataclass(kw_only=True)
class SuiteConfig:
    name: str = "suite"
    prompts: PromptsConfig
    num_samples: int = 0
    """Images per setting; prompts repeat when there are fewer (0 = one per line of prompts.file)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    grid_images: int = 8
    """Images per row of grid_cfg<S>.png (rows: step counts)."""

    def __post_init__(self) -> None:
        _check_positive("num_samples", self.num_samples, allow_zero=True)
        if self.prompts.mds and self.num_samples == 0:
            raise ValueError("num_samples: must be > 0 when prompts come from prompts.mds")
        if self.fid.inception_weights and self.num_samples == 1:
            raise ValueError("num_samples: FID needs at least 2 images per setting")
        _check_positive("grid_images", self.grid_images, allow_zero=True)

    def settings(self) -> list[tuple[int, float]]:
        """(steps, cfg) for the grid, then the extras; duplicates dropped."""
        pairs = [(s, c) for s in self.sampling.steps for c in self.sampling.cfg_scales]
        pairs += [(e.steps, e.cfg_scale) for e in self.sampling.extra]
        return list(dict.fromkeys(pairs))


def setting_name(steps: int, cfg: float) -> str:
    return f"steps{steps}_cfg{cfg:g}"


def resolve_suite_path(name_or_path: str, *, key: str = "eval.suite") -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    candidate = PRESETS / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if candidate.is_file():
        return candidate
    raise ValueError(f"{key}: suite '{name_or_path}' not found (a YAML path or a preset in {PRESETS})")


def load_suite(name_or_path: str | Path, overrides: list[str] | None = None, *, key: str = "suite") -> SuiteConfig:
    """Parse and validate a suite; `{suite_dir}` in any string becomes the YAML's directory (for files shipped
    beside it, e.g. prompt lists)."""
    path = resolve_suite_path(str(name_or_path), key=key)
    data = apply_overrides(load_yaml(path), overrides or [], SuiteConfig)

    def expand(v):
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x) for x in v]
        return v.replace("{suite_dir}", str(path.parent)) if isinstance(v, str) else v

    return from_dict(SuiteConfig, expand(data))


# ----------------------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """What is evaluated: a diffusers model dir, or one checkpoint of a run."""

    path: Path
    checkpoint: Path | None
    run_dir: Path | None
    run_config: Any  # JobConfig | None
    step: int | None

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return self.path.name
        return f"{self.run_dir.name}/{self.checkpoint.name}"

    @property
    def base_model(self) -> Path:
        return Path(self.run_config.model.path) if self.run_config is not None else self.path


def resolve_target(path: str | Path, *, key: str = "--checkpoint") -> Target:
    path = Path(path).resolve()
    ckpt, run_dir = resolve_checkpoint(path, key=key)
    if ckpt is None:
        return Target(path, None, None, None, None)
    run_cfg = load_run_config(run_dir)
    return Target(ckpt, ckpt, run_dir, run_cfg, checkpoint_step(ckpt))


def _expand(value: str, key: str, target: Target) -> str:
    """`{model}` / `{data}` placeholders -> paths from the target (see the module docstring)."""
    if "{model}" in value:
        value = value.replace("{model}", str(target.base_model))
    if "{data}" in value:
        if target.run_config is None or not target.run_config.data.local:
            raise ValueError(f"{key}: uses {{data}}, but {target.path} is not a checkpoint of a run with data.local")
        value = value.replace("{data}", target.run_config.data.local)
    return value


def resolve_paths(suite: SuiteConfig, target: Target) -> SuiteConfig:
    """A copy with placeholders expanded and every path checked; a missing one is a ValueError naming its key."""
    s = dataclasses.replace(
        suite,
        prompts=dataclasses.replace(suite.prompts),
        fid=dataclasses.replace(suite.fid),
        clip=dataclasses.replace(suite.clip),
    )
    for key, obj, attr in [
        ("prompts.file", s.prompts, "file"), ("prompts.mds", s.prompts, "mds"),
        ("fid.inception_weights", s.fid, "inception_weights"), ("fid.reference", s.fid, "reference"),
        ("fid.cache_dir", s.fid, "cache_dir"), ("clip.model", s.clip, "model"),
    ]:
        if getattr(obj, attr):
            setattr(obj, attr, _expand(getattr(obj, attr), key, target))
    if s.prompts.file and not Path(s.prompts.file).is_file():
        raise ValueError(f"prompts.file: file not found: {s.prompts.file}")
    if s.prompts.mds and not (Path(s.prompts.mds) / "index.json").is_file():
        raise ValueError(f"prompts.mds: no MDS dataset (index.json) at {s.prompts.mds}")
    if s.fid.inception_weights:
        if not Path(s.fid.inception_weights).is_file():
            raise ValueError(f"fid.inception_weights: file not found: {s.fid.inception_weights}")
        source_kind(s.fid.reference, key="fid.reference")
    if s.clip.model and not Path(s.clip.model).is_dir():
        raise ValueError(f"clip.model: model dir not found: {s.clip.model}")
    return s


def build_prompts(pc: PromptsConfig, num_samples: int) -> list[str]:
    if pc.file:
        lines = [ln.strip() for ln in Path(pc.file).read_text().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"prompts.file: {pc.file} has no prompts")
        n = num_samples or len(lines)
        return [lines[i % len(lines)] for i in range(n)]
    ds = open_mds(pc.mds)
    if len(ds) == 0:
        raise ValueError(f"prompts.mds: {pc.mds} is empty")
    rng = np.random.default_rng(pc.seed)
    idx = rng.choice(len(ds), size=num_samples, replace=num_samples > len(ds))
    prompts = []
    for i in idx:
        sample = ds[int(i)]
        if pc.caption_key not in sample:
            raise ValueError(f"prompts.caption_key: MDS samples have no column '{pc.caption_key}'")
        prompts.append(str(sample[pc.caption_key]))
    return prompts


# ---------------------------------------------------------------------------------------------------------- sampling


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced block [start, stop) of n items for `rank`."""
    base, rem = divmod(n, world)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Scorers:
    inception: Any = None
    dims: int = 2048
    fid_batch: int = 32
    clip: Any = None
    clip_batch: int = 64


def sample_and_measure(
    generate_fn, prompts: list[str], sampler_settings, scorers: Scorers, *, grid_n: int, rank: int = 0,
    world: int = 1, desc: str = "",
) -> dict | None:
    """Generate images for `prompts` (this rank's block), measure them, gather on rank 0.

    `generate_fn(prompts, settings) -> list[PIL]` (image j uses settings.seed + j). Images are measured a few
    batches at a time and dropped, so memory stays flat at any num_samples. Returns on rank 0:
    {"features": (N, dims) | None, "cosines": (N,) | None, "grid": [first grid_n images]}; None on other ranks.
    """
    # deferred: evals.inception imports torchvision (~1.3 s per process); a suite without FID never needs it
    from evals.inception import inception_features

    start, stop = shard_range(len(prompts), rank, world)
    chunk = sampler_settings.batch_size * 4
    feats, cos, grid = [], [], []
    bar = tqdm(total=stop - start, desc=desc, unit="img", disable=rank != 0 or not desc, dynamic_ncols=True)
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        images = generate_fn(prompts[a:b], dataclasses.replace(sampler_settings, seed=sampler_settings.seed + a))
        if scorers.inception is not None:
            feats.append(inception_features(scorers.inception, images, dims=scorers.dims, batch_size=scorers.fid_batch))
        if scorers.clip is not None:
            cos.append(scorers.clip.cosines(images, prompts[a:b], batch_size=scorers.clip_batch))
        grid += images[: max(0, grid_n - a)]
        bar.update(b - a)  # rank 0's pace stands for everyone's
    bar.close()
    local = {
        "features": np.concatenate(feats) if feats else None,
        "cosines": np.concatenate(cos) if cos else None,
        "grid": grid,
    }
    parts = _gather(local, world)  # rank order == index order: the blocks are contiguous
    if rank != 0:
        return None

    def cat(k):
        arrays = [p[k] for p in parts if p[k] is not None]
        return np.concatenate(arrays) if arrays else None

    grid = [im for p in parts for im in p["grid"]][:grid_n]
    return {"features": cat("features"), "cosines": cat("cosines"), "grid": grid}


# -------------------------------------------------------------------------------------------------------- evaluation


def evaluate(
    suite: SuiteConfig,
    target: Target,
    *,
    out_dir: str | Path,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    logger=None,
) -> dict | None:
    """Sample every setting of `suite` with `target`, measure FID / CLIP, write metrics.json and grids to
    `out_dir` (rank 0). `world > 1` splits the prompts across an initialised process group (unsharded model)."""
    t_start = time.perf_counter()
    suite = resolve_paths(suite, target)  # every rank checks: a bad path fails everywhere, before any collective
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = build_prompts(suite.prompts, suite.num_samples)
    sc = suite.sampling
    run_cfg = target.run_config
    trained_mask, visible_pads = text_settings(target.path, run_cfg)  # a run's objective, or an export's record
    masked = {"true": True, "false": False}.get(sc.mask, trained_mask)
    max_tokens = sc.max_text_tokens or (run_cfg.objective.max_text_tokens if run_cfg else 512)

    scorers, ref = _scorers(suite, device=device, rank=rank)
    loaded = load_for_inference(target.path, device=device, dtype=sc.dtype, ema=sc.ema,
                                schedule=None if sc.schedule == "auto" else sc.schedule, shift=sc.shift)
    schedule = loaded.schedule.describe()

    def generate_fn(chunk: list[str], s: SamplingSettings):
        return generate(loaded.transformer, loaded.vae, loaded.text, chunk, s, dtype=loaded.dtype)

    results, grids = [], {}
    for steps, cfg in suite.settings():
        name = setting_name(steps, cfg)
        s = SamplingSettings.from_source(sc, steps=steps, cfg_scale=cfg, max_text_tokens=max_tokens, masked=masked,
                                         visible_padding_tokens=visible_pads, schedule=loaded.schedule)
        t0 = time.perf_counter()
        got = sample_and_measure(
            generate_fn, prompts, s, scorers, grid_n=suite.grid_images, rank=rank, world=world,
            desc=f"eval {target.label} {name}",
        )
        if got is None:
            continue
        results.append({
            "setting": name, "steps": steps, "cfg_scale": cfg,
            "fid": None if ref is None else fid_from_stats(Stats.of(got["features"]), ref),
            "clip": None if got["cosines"] is None else clip_score_from_cosines(got["cosines"]),
            "seconds": round(time.perf_counter() - t0, 2),
        })
        grids.setdefault(cfg, []).append((steps, got["grid"]))

    loaded = None  # frees the model before the metrics are written (generate_fn shares this variable, so no `del`)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if rank != 0:
        return None

    metrics = {
        "suite": suite.name, "label": target.label, "model": str(target.path),
        "checkpoint": str(target.checkpoint) if target.checkpoint else None, "step": target.step,
        "num_samples": len(prompts), "resolution": sc.resolution, "masked": masked, "schedule": schedule,
        "fid_dims": suite.fid.dims if scorers.inception is not None else None,
        "fid_reference": suite.fid.reference or None, "seconds": round(time.perf_counter() - t_start, 2),
        "results": results,
    }
    _write_outputs(Path(out_dir), metrics, grids, suite=suite, target=target, logger=logger)
    return metrics


def _scorers(suite: SuiteConfig, *, device: torch.device, rank: int) -> tuple[Scorers, Stats | None]:
    """The suite's Inception and CLIP scorers, and the FID reference statistics (rank 0 only). Built before any
    sampling, so a bad reference fails first."""
    sc = suite.sampling
    scorers = Scorers(dims=suite.fid.dims, fid_batch=suite.fid.batch_size, clip_batch=suite.clip.batch_size)
    if suite.fid.inception_weights:
        from evals.inception import load_inception  # deferred: torchvision's import, see the sampling loop

        scorers.inception = load_inception(suite.fid.inception_weights, device=device)
    if suite.clip.model:
        scorers.clip = CLIPScorer(suite.clip.model, device=device)
    ref = None
    if scorers.inception is not None and rank == 0:
        ref = reference_stats(
            suite.fid.reference, model=scorers.inception, weights=suite.fid.inception_weights, dims=suite.fid.dims,
            count=suite.fid.reference_count, resize_to=sc.resolution if suite.fid.resize_reference else 0,
            image_key=suite.fid.image_key, cache_dir=suite.fid.cache_dir or None, batch_size=suite.fid.batch_size,
        )
    return scorers, ref


def _write_outputs(out_dir: Path, metrics: dict, grids: dict, *, suite: SuiteConfig, target: Target,
                   logger=None) -> None:
    """metrics.json, one grid per cfg scale (steps as rows), the TensorBoard scalars and images, one summary line."""
    results = metrics["results"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    for old in out_dir.glob("grid_cfg*.png"):  # an earlier run of this suite may have had other cfg scales
        old.unlink()
    tag = f"eval/{suite_dirname(suite.name)}"
    for cfg, rows in grids.items():
        rows = [r for r in sorted(rows, key=lambda x: x[0]) if r[1]]
        if rows:
            grid = make_grid([imgs for _, imgs in rows])
            grid.save(out_dir / f"grid_cfg{cfg:g}.png")
            if logger is not None:
                logger.image(f"{tag}/grid_cfg{cfg:g}", grid, target.step or 0)
    if logger is not None:
        for r in results:
            values = {f"{tag}/{m}/{r['setting']}": r[m] for m in ("fid", "clip") if r[m] is not None}
            logger.scalars(values, target.step or 0)
        logger.flush()
    summary = ", ".join(
        f"{r['setting']}: " + " ".join(f"{m}={r[m]:.3f}" for m in ("fid", "clip") if r[m] is not None)
        for r in results
    )
    print(f"[dedistill] eval {target.label} ({suite.name}): {summary} -> {out_dir / 'metrics.json'}", flush=True)


def suite_dirname(name: str) -> str:
    """A suite's name as a directory name (what `evals/step_N/<suite>/` uses)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "suite"


def eval_dir(run_dir: Path, step: int, suite: str) -> Path:
    """<run_dir>/evals/step_<N:08d>/<suite>/: one directory per suite, so the results of several suites on one
    checkpoint sit side by side."""
    return RunDir(run_dir).eval_dir(step, suite_dirname(suite))


def evaluate_into_run(
    suite: SuiteConfig, checkpoint: str | Path, *, device: torch.device | None = None, rank: int = 0, world: int = 1
) -> dict | None:
    """Evaluate one checkpoint of a run: results to <run_dir>/evals/step_N/<suite>/, its TensorBoard, and its plots."""
    target = resolve_target(checkpoint)
    if target.checkpoint is None:
        raise ValueError(f"--checkpoint: {checkpoint} is a model dir, not a run checkpoint; pass --out for a report")
    logger = Logger(target.run_dir, enabled=rank == 0)
    try:
        metrics = evaluate(suite, target, out_dir=eval_dir(target.run_dir, target.step, suite.name), device=device,
                           rank=rank, world=world, logger=logger)
    finally:
        logger.close()
    if rank == 0:
        (eval_dir(target.run_dir, target.step, suite.name) / "error.txt").unlink(missing_ok=True)  # a rerun succeeded
        # deferred: matplotlib costs a quarter second to import, and every training process imports this module
        # for its periodic-eval hooks, plots or not
        from evals.report import update_run_plots

        update_run_plots(target.run_dir)
    return metrics
