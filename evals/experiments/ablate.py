"""Ablations of the toy world's generators (docs/proof.md, "Why the generators do not bind shape and colour").

The proof's teacher reads position and size from its captions but barely colour and shape. Two measurements split
the candidate causes:

- `onehot`: the teacher stage on the same images, VAE, model and budget, conditioned on the attributes themselves in
  place of the text encoders' output. Each object is one context token (its shape, colour, position and size as
  one-hot blocks side by side), the background one more, and the pooled vector is the main object's token. The real
  trainer trains it from a precomputed dataset (`dedistill data precompute`'s layout), caption dropout included (the
  empty prompt is all zeros). If this teacher draws colour and shape, the generator can and the text path is what
  fails; if it cannot either, the generator (capacity, latent, objective) is the limit.
- `words` / `words-roles`: the same, with one token per attribute *word* instead of one per object (`word_tokens`):
  the text path as an order-free transformer sees it, with the colour words' roles left ambiguous or told apart.
  Between `words` and `onehot`, they say how much of the text teacher's loss is binding a colour word to its role
  and how much binding an object's words to each other.
- `t5-only` / `pooled-only`: the captions through the real text encoders, with CLIP's pooled vector zeroed or the
  T5 tokens replaced by one zero token: which of FLUX's two text inputs carries what the teacher learns.
- `text-nofill`: the text run on each caption's attribute words alone (`attribute_words`: no article, preposition,
  prefix or adjective), through the same encoders, in training and at sampling: what the captions' filler words cost.
- `curves`: per-attribute adherence of every checkpoint of a teacher run, text- or one-hot-conditioned: whether
  colour and shape rise late (budget) or never (something else).

    python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning onehot out_dir=runs/abl-onehot
    python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text out_dir=runs/abl-text

Each trains the teacher stage (configs/proof-cpu.yaml's budget unless overridden, e.g. teacher.steps=1500), keeps a
checkpoint every --every steps and writes curves_<conditioning>.{json,md} in out_dir: per-attribute adherence of each
checkpoint at every cfg scale. The world, judge and VAE stages are the proof's (reused if out_dir holds them).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from dataset_tools.buckets import BucketSpec, run_parts
from dataset_tools.precompute import Encoders, PrecomputeOptions, columns, to_store
from dataset_tools.tiny_data import ADJECTIVES, COLOURS, FILLER_WORDS, POSITIONS, PREFIXES, SHAPES, SIZES
from evals.experiments.judge import ATTRS, accuracy, judge_images, labels_of, load_judge, to_tensor
from evals.experiments.proof import (
    ProofConfig, _job, held_out_world, load_model, load_proof_config, log, run, run_trainer, trained,
)
from evals.sampler import SamplingSettings, batch_noise, decode, denoise, generate
from train.checkpoint.format import list_checkpoints
from train.flux import pack_latents
from train.model import vae_scale_factor
from train.run_dir import RunDir
from train.text import PromptEmbeds

# One object token: [shape | colour | position | size | object flag | background flag]; the background token sets
# its colour in the colour block and the last flag. 7 + 12 + 9 + 2 + 2 = 32 = the tiny T5's width.
_BLOCKS = {"shape": list(SHAPES), "colour": sorted(COLOURS), "position": list(POSITIONS), "size": sorted(SIZES)}
_OFFSET = {}
_n = 0
for _k, _v in _BLOCKS.items():
    _OFFSET[_k] = _n
    _n += len(_v)
OBJECT_FLAG, BACKGROUND_FLAG = _n, _n + 1
TOKEN_DIM = _n + 2
ONEHOT_TOKENS = 4  # up to 3 objects and the background
ONEHOT_SCALE = 3.0  # about the per-token norm of the tiny T5's output (5.7), so the context embedder starts alike


def _slot(block: str, value: str) -> int:
    """The index of `value`'s one-hot entry in `block` (shape, colour, position or size)."""
    return _OFFSET[block] + _BLOCKS[block].index(value)


def onehot_tokens(attrs: dict, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World attributes -> (context tokens (n_objects + 1, dim), pooled (dim_pooled = dim,)), both scaled."""
    if dim < TOKEN_DIM:
        raise ValueError(f"text width {dim} < {TOKEN_DIM}: the one-hot attribute token does not fit")
    rows = []
    for obj in attrs["objects"]:
        t = torch.zeros(dim)
        for k in _BLOCKS:
            t[_slot(k, obj[k])] = 1.0
        t[OBJECT_FLAG] = 1.0
        rows.append(t)
    bg = torch.zeros(dim)
    bg[_slot("colour", attrs["background"])] = 1.0
    bg[BACKGROUND_FLAG] = 1.0
    rows.append(bg)
    tokens = torch.stack(rows) * ONEHOT_SCALE
    return tokens, tokens[0].clone()


# The text path without its order: one token per attribute word, in a vocabulary shared by both colour roles, so a
# colour word says nothing of whether it names an object or the background, nor which object's shape it goes with.
# FLUX gives text tokens no position (their rope ids are 0), so this is what the transformer sees of a caption whose
# encoder does not mix its words. "words-roles" sets a flag on the background's colour word (the word "background"
# merged into it): the roles are told apart, the objects' attributes still are not bound to each other.
_WORD_BLOCKS = ("shape", "colour", "position", "size")
ROLE_FLAG = _n
WORD_TOKENS = 3 * len(_WORD_BLOCKS) + 1  # up to 3 objects, 4 words each, and the background's colour


def word_tokens(attrs: dict, dim: int, *, roles: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """World attributes -> (one token per attribute word (4 n_objects + 1, dim), pooled: their sum / sqrt(n), a bag of
    words that binds nothing either), scaled as `onehot_tokens`."""
    if dim <= ROLE_FLAG:
        raise ValueError(f"text width {dim} < {ROLE_FLAG + 1}: the one-hot word token does not fit")
    rows = []
    for obj in attrs["objects"]:
        for k in _WORD_BLOCKS:
            t = torch.zeros(dim)
            t[_slot(k, obj[k])] = 1.0
            rows.append(t)
    bg = torch.zeros(dim)
    bg[_slot("colour", attrs["background"])] = 1.0
    bg[ROLE_FLAG] = 1.0 if roles else 0.0
    rows.append(bg)
    tokens = torch.stack(rows) * ONEHOT_SCALE
    return tokens, tokens.sum(0) / len(rows) ** 0.5


def without_pooled(made: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`words-nopool`: the word tokens with a zero pooled vector. Every conditioning that taught shape (one-hot, words)
    also put the shape into the pooled vector, which modulates every block; the captions' pooled vector (the random
    tiny CLIP's) barely carries it. This says whether the tokens alone, through joint attention, teach shape."""
    tokens, pooled = made
    return tokens, torch.zeros_like(pooled)


@dataclass(frozen=True)
class Tokens:
    """A conditioning that replaces the text encoders: attributes -> (context tokens, pooled), at most `max_tokens`."""

    make: Callable[[dict, int], tuple[torch.Tensor, torch.Tensor]]
    max_tokens: int


TOKENS = {
    "onehot": Tokens(onehot_tokens, ONEHOT_TOKENS),
    "words": Tokens(partial(word_tokens, roles=False), WORD_TOKENS),
    "words-roles": Tokens(partial(word_tokens, roles=True), WORD_TOKENS),
    "words-nopool": Tokens(lambda attrs, dim: without_pooled(word_tokens(attrs, dim, roles=False)), WORD_TOKENS),
}


# The text path with one of its two inputs taken away: the captions through the real text encoders, then CLIP's
# pooled vector zeroed (`t5-only`: the caption reaches the transformer only as T5 tokens, through the context embedder
# and joint attention) or the T5 tokens replaced by one zero token (`pooled-only`: only through the pooled projection
# into every block's modulation). Zeros rather than absence, so the model keeps every layer: a zero input carries the
# same nothing for every caption (the embedders' biases). The empty prompt (caption dropout, CFG's unconditional
# branch) loses the same part.
TEXT_PARTS = {"t5-only": "t5", "pooled-only": "pooled", "text-mean": "both", "text-nofill": "both"}

# Words of a caption that name no attribute: articles and prepositions, the prefixes ("a simple drawing of") and the
# adjectives ("bright"). "background" stays: it says which colour word names the background.
_FILLERS = frozenset((set(FILLER_WORDS) - {"background"}) | {w for p in PREFIXES for w in p.split()} | set(ADJECTIVES))


def attribute_words(caption: str) -> str:
    """`caption` without the words that name no attribute, the rest in order: "an image of a large white cross at the
    bottom on a green background" -> "large white cross bottom green background". `text-nofill` trains and samples
    on these: the text run without its fillers, through the same encoders, what the word tokens lack."""
    return " ".join(w for w in caption.replace(",", " ").split() if w not in _FILLERS)


CAPTION_VIEWS = {"text-nofill": attribute_words}
"""TEXT_PARTS conditionings that encode a view of each caption (training and sampling alike) instead of the caption."""
CONDITIONINGS = ("text", *TOKENS, *TEXT_PARTS)
PRECOMPUTED = (*TOKENS, *TEXT_PARTS)
"""The conditionings the teacher trains on from a precomputed dataset (`<conditioning>_data` in out_dir)."""
MEAN_LATENTS = (*TOKENS, "text-mean")
"""Those trained on the VAE posterior's mean; the others draw a fresh latent from the posterior each time, as the text
run's raw shards do. `text-mean` is the text run (both encoders' output) on the mean: the attribute-token runs were
made so, and it separates what they gain from their tokens and what from the noise-free latent target."""


def keep_part(e: PromptEmbeds, keep: str) -> PromptEmbeds:
    """`e` with only `keep` ("t5" or "pooled", `TEXT_PARTS`' values) left, the other part zeroed; "both": `e`."""
    if keep == "both":
        return e
    if keep == "t5":
        return replace(e, pooled=torch.zeros_like(e.pooled))
    n, dim = e.t5.shape[0], e.t5.shape[-1]
    return PromptEmbeds(e.t5.new_zeros(n, 1, dim), torch.ones(n, 1, dtype=torch.bool, device=e.mask.device),
                        e.pooled, (1,) * n)


def max_tokens_of(conditioning: str, text_tokens: int) -> int:
    """The context length a precomputed conditioning trains with (`text_tokens`: the proof's `max_text_tokens`)."""
    if conditioning in TOKENS:
        return TOKENS[conditioning].max_tokens
    return 1 if TEXT_PARTS[conditioning] == "pooled" else text_tokens


def _widths(model_dir: Path) -> tuple[int, int]:
    t5 = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())["d_model"]
    pooled = json.loads((model_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    return t5, pooled


def write_token_dataset(model_dir: Path, src: Path, out: Path, *, conditioning: str, resolution: int,
                        text_tokens: int = 64, batch: int = 64) -> Path:
    """The world's shards (`src`, with their `attributes` column) as a precomputed dataset: the VAE's latent means of
    the images (and, for `TEXT_PARTS`, their stds) and, in place of T5 states and CLIP's pooled vector,
    `TOKENS[conditioning]`'s tokens and pooled vector, or (`TEXT_PARTS`) the text encoders' own output of each caption
    (at most `text_tokens` T5 tokens) with one part zeroed."""
    t5_dim, pooled_dim = _widths(model_dir)
    if conditioning in TOKENS and pooled_dim != t5_dim:
        raise ValueError(f"{model_dir}: the attribute-token ablation needs equal T5 and CLIP widths, "
                         f"got {t5_dim}, {pooled_dim}")
    enc = Encoders(model_dir, torch.device("cpu"), torch.float32)
    spec = BucketSpec(resolution=resolution, square=True)
    # the text parts keep the posterior's std, so the trainer draws each latent as from the world's own shards (the
    # text run's); the attribute tokens' runs were made with the mean, and stay so (MEAN_LATENTS)
    opts = PrecomputeOptions(latents="mean" if conditioning in MEAN_LATENTS else "dist", dtype="fp32",
                             max_text_tokens=max_tokens_of(conditioning, text_tokens))
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    settings = {  # the layout `dedistill data precompute` writes, so the trainer's loader reads it as its own
        "kind": "precomputed", "spec": asdict(spec), "buckets": spec.table(),
        "precompute": {"model": str(model_dir.resolve()), "latents": opts.latents, "dtype": opts.dtype,
                       "model_dtype": "fp32", "max_text_tokens": opts.max_text_tokens, "caption_key": opts.caption_key,
                       "image_key": opts.image_key, "keep_image": opts.keep_image,
                       "vae_shift_factor": vae_cfg.get("shift_factor"),
                       "vae_scaling_factor": vae_cfg.get("scaling_factor"),
                       "conditioning": f"{conditioning}-attributes" if conditioning in TOKENS else conditioning},
    }

    def encode(rows: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(context tokens (L_i, D), pooled (D,)) per row."""
        if conditioning in TOKENS:  # MDS decodes the json column to a dict
            return [TOKENS[conditioning].make(r["attributes"], t5_dim) for r in rows]
        view = CAPTION_VIEWS.get(conditioning, str)
        e = text_part([view(r["caption"]) for r in rows])
        return [(e.t5[i, :n], e.pooled[i]) for i, n in enumerate(e.lengths)]

    def text_part(captions: list[str]) -> PromptEmbeds:
        t5, pooled, lengths = enc.prompts(captions, opts.max_text_tokens)
        padded = torch.nn.utils.rnn.pad_sequence(t5, batch_first=True)
        mask = torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]
        return keep_part(PromptEmbeds(padded, mask, pooled, lengths), TEXT_PARTS[conditioning])

    def flush(rows: list[dict], writers, skip_log, progress) -> None:
        pixels = to_tensor([Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows])
        means, stds = enc.latents(pixels)
        for r, mean, std, (tokens, pooled) in zip(rows, means, stds, encode(rows)):
            row = {"caption": r["caption"], "key": r["key"], "width": resolution, "height": resolution, "bucket": 0,
                   "t5_len": len(tokens), "latent_mean": to_store(mean, opts.dtype), "t5": to_store(tokens, opts.dtype),
                   "pooled": to_store(pooled, opts.dtype)}
            if opts.latents == "dist":
                row["latent_std"] = to_store(std, opts.dtype)
            writers.write(0, row)
        skip_log.converted += len(rows)
        progress(len(rows))

    def handle_part(samples, writers, skip_log, progress) -> None:
        out.mkdir(parents=True, exist_ok=True)
        empty = out / "empty_prompt.safetensors"
        if not empty.is_file():  # caption dropout's unconditional input: no attribute at all, or the empty caption's
            if conditioning in TOKENS:
                t5, pooled = torch.zeros(1, t5_dim), torch.zeros(pooled_dim)
            else:
                e = text_part([""])
                t5, pooled = e.t5[0, :e.lengths[0]], e.pooled[0]
            save_file({"t5": t5.contiguous(), "pooled": pooled.contiguous()}, str(empty))
        rows = []
        for s in samples:
            rows.append(s)
            if len(rows) == batch:
                flush(rows, writers, skip_log, progress)
                rows = []
        if rows:
            flush(rows, writers, skip_log, progress)

    run_parts(src, out, settings=settings, shard_index=0, num_shards=1, handle_part=handle_part,
              columns=columns(opts, opts.dtype), progress_bar=False, desc=f"{conditioning} conditioning")
    return out


# ------------------------------------------------------------------------------------------------- adherence curves


def token_embeds(attrs: list[dict], dim: int, conditioning: str) -> tuple[PromptEmbeds, PromptEmbeds]:
    """(cond, uncond) for a batch of single-object eval samples: their `TOKENS[conditioning]` tokens (of equal count:
    one object each), and the empty input."""
    pairs = [TOKENS[conditioning].make(a, dim) for a in attrs]
    t5 = torch.stack([t for t, _ in pairs])
    n, length = t5.shape[:2]
    cond = PromptEmbeds(t5, torch.ones(n, length, dtype=torch.bool), torch.stack([p for _, p in pairs]), (length,) * n)
    uncond = PromptEmbeds(torch.zeros(n, 1, dim), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, dim), (1,) * n)
    return cond, uncond


def sample_tokens(m, attrs: list[dict], s: SamplingSettings, conditioning: str) -> list[Image.Image]:
    """`evals.sampler.generate` with `TOKENS[conditioning]` in place of the text encoders (same noise seeds)."""
    cond, uncond = token_embeds(attrs, m.transformer.config.joint_attention_dim, conditioning)
    return _sample(m, cond, uncond, s)


def sample_text_part(m, prompts: list[str], s: SamplingSettings, conditioning: str) -> list[Image.Image]:
    """`evals.sampler.generate` with the prompts' and the empty prompt's encodings reduced to `TEXT_PARTS[conditioning]`
    (same noise seeds, same encoders)."""
    enc = {"max_tokens": s.max_text_tokens, "masked": s.masked}
    keep = TEXT_PARTS[conditioning]
    view = CAPTION_VIEWS.get(conditioning, str)
    cond = keep_part(m.text.encode([view(p) for p in prompts], **enc), keep)
    uncond = keep_part(m.text.encode([s.negative_prompt] * len(prompts), **enc), keep)
    return _sample(m, cond, uncond, s)


def _sample(m, cond: PromptEmbeds, uncond: PromptEmbeds, s: SamplingSettings) -> list[Image.Image]:
    h = w = s.resolution // vae_scale_factor(m.vae)
    noise = batch_noise(cond.t5.shape[0], (m.vae.config.latent_channels, h, w), s.seed, s.noise_temperature)
    packed = denoise(m.transformer, pack_latents(noise).to(m.device), cond, uncond if s.cfg_scale != 1.0 else None, s,
                     latent_hw=(h, w), dtype=m.dtype)
    return decode(m.vae, packed, (h, w))


def _eval_settings(cfg: ProofConfig, cfg_scale: float, repeat: int) -> SamplingSettings:
    """The proof's eval sampling (its largest step count, its noise seed for `repeat`) at `cfg_scale`."""
    return SamplingSettings(steps=max(cfg.eval.steps), cfg_scale=cfg_scale, resolution=cfg.resolution,
                            seed=100_000 * (repeat + 1), max_text_tokens=cfg.max_text_tokens, batch_size=256)


def checkpoint_curves(cfg: ProofConfig, run_dir: Path, judge, world: dict, *, conditioning: str) -> list[dict]:
    """Per-attribute adherence of every checkpoint of `run_dir`: cfg.eval's scales, 28 steps (the largest of
    cfg.eval.steps), cfg.eval.repeats noise seeds, on the proof's held-out prompts."""
    labels = {k: torch.tensor([labels_of(a)[k] for _, a in world["eval"]]) for k in ATTRS}
    attrs = [a for _, a in world["eval"]]
    rows = []
    for step, ckpt in list_checkpoints(RunDir(run_dir).checkpoints):
        m = load_model(ckpt)
        for scale in cfg.eval.cfg_scales:
            accs = []
            for r in range(cfg.eval.repeats):
                s = _eval_settings(cfg, scale, r)
                if conditioning in TOKENS:
                    images = sample_tokens(m, attrs, s, conditioning)
                elif conditioning in TEXT_PARTS:
                    images = sample_text_part(m, world["eval_prompts"], s, conditioning)
                else:
                    images = generate(m.transformer, m.vae, m.text, world["eval_prompts"], s, dtype=m.dtype)
                accs.append(accuracy(judge_images(judge, to_tensor(images))[1], labels))
            row = {"step": step, "cfg": scale, **{k: float(np.mean([a[k] for a in accs])) for k in accs[0]}}
            rows.append(row)
            log(f"[ablate] step {step} cfg {scale}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                  if k not in ("step", "cfg")))
    return rows


def curves_table(rows: list[dict]) -> str:
    keys = ["mean", *ATTRS]
    lines = ["| step | cfg | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['step']} | {r['cfg']:g} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def colour_roles(cfg: ProofConfig, model_path: Path, judge, world: dict, *, cfg_scale: float = 5.0) -> dict:
    """Does a text-conditioned model know which colour word names the object and which the background? Each held-out
    prompt names two distinct colours. Returns, for the judge's reading of the object colour and of the background,
    the fraction of images in which it is the colour the prompt gives that role (`right`), the colour the prompt gives
    the other role (`swapped`), or neither. A model that reads the colour words but not their roles puts the two on
    a par. Chance for `right` is 1/12 per role in the shared-palette world, 1/6 in the split one
    (`judge.chance(world)`); there `swapped` means an object in a colour the world only gives backgrounds."""
    m = load_model(model_path)
    attrs = [a for _, a in world["eval"]]
    obj = torch.tensor([ATTRS["colour"].index(a["objects"][0]["colour"]) for a in attrs])
    bg = torch.tensor([ATTRS["background"].index(a["background"]) for a in attrs])
    out = {}
    for r in range(cfg.eval.repeats):
        images = generate(m.transformer, m.vae, m.text, world["eval_prompts"], _eval_settings(cfg, cfg_scale, r),
                          dtype=m.dtype)
        _, preds = judge_images(judge, to_tensor(images))
        for role, named, other in (("colour", obj, bg), ("background", bg, obj)):
            got = torch.as_tensor(preds[role])
            for k, v in (("right", (got == named).float().mean()), ("swapped", (got == other).float().mean())):
                out.setdefault(f"{role}_{k}", []).append(float(v))
    return {k: float(np.mean(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------- driver


def run_ablation(cfg: ProofConfig, *, conditioning: str, every: int) -> list[dict]:
    """The proof's world, judge and VAE stages (reused when out_dir holds them), then a teacher with `conditioning`
    (text: the proof's; else from a precomputed dataset of `TOKENS[conditioning]` or `TEXT_PARTS[conditioning]`)
    keeping a checkpoint every `every` steps, then its curves."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"--conditioning: '{conditioning}' is not one of {', '.join(CONDITIONINGS)}")
    if every < 1:
        raise ValueError(f"--every: must be >= 1, got {every}")
    run(cfg, until="vae")
    out = Path(cfg.out_dir)
    world = held_out_world(cfg)
    data = out / "data"
    if conditioning in PRECOMPUTED:
        data = out / f"{conditioning}_data"
        if not (data / "buckets.json").is_file():
            write_token_dataset(out / "pipeline", out / "data", data, conditioning=conditioning,
                                resolution=cfg.resolution, text_tokens=cfg.max_text_tokens)
    run_dir = out / f"teacher_{conditioning}"
    if not trained(run_dir, cfg.teacher.steps):
        objective = ({"max_text_tokens": max_tokens_of(conditioning, cfg.max_text_tokens)}
                     if conditioning in PRECOMPUTED else None)
        job = _job(cfg, run_dir=run_dir, model_path=out / "pipeline", data=data, budget=cfg.teacher, adapter="full",
                   objective=objective)
        job = replace(job, checkpoint=replace(job.checkpoint, every_steps=every,
                                              keep_last=cfg.teacher.steps // every + 1))
        t0 = time.time()
        run_trainer(job, cfg.teacher.nproc)
        log(f"[ablate] teacher ({conditioning}) trained in {time.time() - t0:.0f}s")
    rows = checkpoint_curves(cfg, run_dir, load_judge(out / "judge.safetensors"), world,
                             conditioning=conditioning)
    (out / f"curves_{conditioning}.json").write_text(json.dumps(rows, indent=2))
    (out / f"curves_{conditioning}.md").write_text(curves_table(rows) + "\n")
    log(curves_table(rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evals.experiments.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a configs/proof*.yaml preset (its world, judge, VAE and teacher)")
    p.add_argument("--conditioning", default="onehot",
                   help="text (the proof's captions), onehot (a token per object), words (a token per attribute word), "
                        "words-roles (words, the background's colour word flagged), words-nopool (words, the pooled "
                        "vector zeroed), t5-only (the captions, CLIP's "
                        "pooled vector zeroed) or pooled-only (the captions, T5's tokens zeroed)")
    p.add_argument("--every", type=int, default=250, help="keep a checkpoint every N teacher steps (the curves)")
    p.add_argument("--roles", default=None, metavar="MODEL",
                   help="only measure MODEL's colour roles (colour_roles) on the held-out prompts, at cfg 5")
    p.add_argument("--smoke", action="store_true", help="the proof's --smoke sizes (for the test suite)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. out_dir=runs/abl teacher.steps=1500")
    a = p.parse_args(argv)
    try:
        cfg = load_proof_config(a.config, smoke=a.smoke, overrides=a.overrides)
        if a.roles:
            judge = load_judge(Path(cfg.out_dir) / "judge.safetensors")
            log(json.dumps(colour_roles(cfg, Path(a.roles), judge, held_out_world(cfg))))
        else:
            run_ablation(cfg, conditioning=a.conditioning, every=a.every)
    except ValueError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
