"""`dedistill data precompute`: raw MDS shards -> VAE latents, unpadded T5 states, CLIP pooled, aspect bucket.

What is stored per sample (MDS columns; `dtype` is the storage dtype, bf16 kept as its raw 16 bits in uint16):
    latent_mean  ndarray (C, H/8, W/8)  the VAE posterior mean, already normalised as the family's VAE is
                                        (train.flux.LATENT_NORMS: FLUX.1 (mean - shift) * scale; FLUX.2 per packed
                                        channel by the VAE's BatchNorm statistics, 32 channels)
    latent_std   ndarray (C, H/8, W/8)  the posterior std times the normalisation's scale (only with --latents dist,
                                        the default)
    t5           ndarray (L, D)         the family's text features of the L real tokens, no padding: T5's hidden
                                        states (incl. </s>), or FLUX.2's stacked hidden layers of the chat-wrapped
                                        prompt (train.text.StackedTextEncoder)
    t5_len       int                    L (so `data inspect` needs no array decode)
    pooled       ndarray (D_clip,)      CLIP pooled output; no column for a family without CLIP (Chroma, FLUX.2):
                                        the loader reads it as (0,)
    caption, key, width, height, bucket (and `image`, the encoded bytes, with --keep-image)

Decisions (docs/data.md has the reasoning):
- Latents: `dist` stores mean and std, and the trainer draws mean + std * eps with its per-step generator, exactly
  as the raw path's `encode_images` does, so a sample gets a fresh latent draw every epoch and the loss equals the
  raw path's. `mean` halves the bytes and trains on the posterior mean.
- T5 runs with its attention mask, which makes a prompt's states independent of padding; so they are stored
  unpadded, and the trainer pads each batch to its longest prompt. This is why precomputed data requires
  `objective.attention_mask=true` and the same `objective.max_text_tokens` as `--max-text-tokens`.
- Caption dropout needs the empty prompt: it is encoded once and stored as `OUT/empty_prompt.safetensors`, so a
  trainer on precomputed data needs no text encoder at all.
- Images are assigned a bucket and resized once (`dataset_tools.buckets`), in batches of one bucket for the VAE.

Resumable and shardable like `data convert`: one part per source shard, done parts skipped on a re-run, slices with
`--shard-index/--num-shards` (one per GPU or per SLURM task); see `dataset_tools.buckets.run_parts`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dataset_tools.buckets import BucketSpec, BucketWriters, assign_bucket, read_index, run_parts, source_columns
from dataset_tools.convert import check_caption
from dataset_tools.report import Skip, SkipLog
from train.data import image_to_tensor, resize_cover_crop
from train.images import open_rgb
from train.flux import normalise_latents, pack_latents, unpack_latents
from train.family import family_of_dir
from train.flux2 import bn_stats
from train.model import check_model_dir, load_vae, resolve_dtype
from train.outputs import atomic_write
from train.text import TextEncoder

_STORE = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "uint16")}


@dataclass(kw_only=True)
class PrecomputeOptions:
    latents: str = "dist"
    """dist: posterior mean and std (a fresh draw every epoch, same loss as raw) | mean: the mean only."""
    dtype: str = "auto"
    """Storage dtype of latents and text states: auto (the encoders' dtype: bf16 on GPU, fp32 on CPU) | fp32 |
    fp16 | bf16."""
    max_text_tokens: int = 512
    """T5 truncation length; training must use the same objective.max_text_tokens."""
    batch_size: int = 16
    device: str = "auto"
    """auto (cuda when present) | cpu | cuda | cuda:N"""
    model_dtype: str = "auto"
    """Encoders' compute dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    caption_key: str = "caption"
    image_key: str = "image"
    keep_image: bool = False
    """Also copy the encoded image bytes (for evals on the training data); off: shards hold only what trains."""

    def __post_init__(self) -> None:
        if self.latents not in ("dist", "mean"):
            raise ValueError(f"--latents: '{self.latents}' is not one of dist, mean")
        if self.dtype not in ("auto", *_STORE):
            raise ValueError(f"--dtype: '{self.dtype}' is not one of auto, {', '.join(_STORE)}")
        if self.model_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--model-dtype: '{self.model_dtype}' is not one of auto, fp32, bf16")
        if self.max_text_tokens < 1:
            raise ValueError(f"--max-text-tokens: must be >= 1, got {self.max_text_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: '{name}' but CUDA is not available here")
    return dev


def to_store(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in MDS (bf16 as its 16 raw bits)."""
    torch_dtype, _ = _STORE[dtype]
    t = t.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def columns(opts: PrecomputeOptions, dtype: str, *, pooled: bool = True) -> dict[str, str]:
    """pooled False (a family without CLIP): no `pooled` column, since MDS cannot store an array of 0 elements; the
    loader reads its absence as the (0,) vector."""
    arr = f"ndarray:{_STORE[dtype][1]}"
    cols = {"caption": "str", "key": "str", "width": "int", "height": "int", "bucket": "int",
            "latent_mean": arr, "t5": arr, "t5_len": "int"}
    if pooled:
        cols["pooled"] = arr
    if opts.latents == "dist":
        cols["latent_std"] = arr
    if opts.keep_image:
        cols["image"] = "bytes"
    return cols


class Encoders:
    """The frozen VAE and text encoders, loaded on first use (a finished slice loads nothing)."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self._vae = self._text = None

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_vae(self.model_dir, dtype=self.dtype, device=self.device)
        return self._vae

    @property
    def text(self):
        if self._text is None:
            self._text = TextEncoder(self.model_dir, dtype=self.dtype, device=self.device)
        return self._text

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> normalised posterior (mean, std), each (B, C, H/8, W/8), as train.step.encode_images.

        The normalisation is affine per channel, so the std takes its scale only: mean + std * eps is then the
        normalised draw the raw path makes (equal up to float rounding)."""
        vae = self.vae
        dist = vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        if type(vae).__name__ == "AutoencoderKLFlux2":  # per packed channel: (x - bn_mean) / bn_std
            _, bn_std = bn_stats(vae)
            h, w = dist.std.shape[-2:]
            std = unpack_latents(pack_latents(dist.std) / bn_std.to(dist.std.device, dist.std.dtype), h, w)
            return normalise_latents(vae, dist.mean), std
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor
        return (dist.mean - shift) * scale, dist.std * scale

    @torch.no_grad()
    def prompts(self, captions: list[str], max_tokens: int) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
        """Unpadded text states [(L_i, D)], CLIP pooled (B, D_clip), lengths L_i; the batch is padded only to its
        longest prompt (masked T5, or FLUX.2's causal text model padded on the right: the states do not depend on
        the padding). The family's encoder counts the tokens as it keeps them (FLUX.2: the chat-wrapped prompt)."""
        text = self.text
        lengths = [text.token_count(c, max_tokens=max_tokens) for c in captions]
        enc = text.encode(captions, max_tokens=max(lengths), masked=True)
        assert enc.mask.sum(1).tolist() == lengths, "T5 token counts disagree with the tokenizer"
        return [enc.t5[i, :n] for i, n in enumerate(lengths)], enc.pooled, lengths


def write_empty_prompt(out: Path, enc: Encoders, max_tokens: int, dtype: str) -> None:
    """The empty prompt's encoding (caption dropout), once per dataset, in the storage dtype."""
    path = out / "empty_prompt.safetensors"
    if path.is_file():
        return
    (t5,), pooled, _ = enc.prompts([""], max_tokens)
    torch_dtype = _STORE[dtype][0]
    tensors = {"t5": t5.to("cpu", torch_dtype).contiguous(), "pooled": pooled[0].to("cpu", torch_dtype).contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _caption_and_image(sample: dict, opts: PrecomputeOptions):
    """(caption, RGB image) of a converted sample; `Skip` with the reason when either is unusable."""
    caption = check_caption(sample.get(opts.caption_key))
    data = sample.get(opts.image_key)
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise Skip("empty_file", f"no bytes in column '{opts.image_key}'")
    try:
        return caption, open_rgb(bytes(data))
    except Exception as e:  # PIL: OSError, SyntaxError, ValueError, ...
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None


def precompute(
    model_dir: str | Path, src: str | Path, out: str | Path, *, spec: BucketSpec, opts: PrecomputeOptions | None = None,
    shard_index: int = 0, num_shards: int = 1, progress_bar: bool = True,
) -> dict:
    """Precompute one slice of `src` into `out` (bucketed layout, dataset_tools.buckets); finalize when all done."""
    opts = opts or PrecomputeOptions()
    model_dir = check_model_dir(model_dir, key="--model").resolve()
    out = Path(out)
    device = _device(opts.device)
    model_dtype = resolve_dtype(opts.model_dtype, device)
    dtype = opts.dtype if opts.dtype != "auto" else ("bf16" if model_dtype == torch.bfloat16 else "fp32")
    enc = Encoders(model_dir, device, model_dtype)
    has_pooled = family_of_dir(model_dir, key="--model").clip is not None
    table = spec.table()
    # deferred: diffusers takes seconds to import, and `dedistill --help` imports this module
    from diffusers import AutoencoderKL

    vae_config = AutoencoderKL.load_config(str(model_dir / "vae"))
    settings = {
        "kind": "precomputed",
        "spec": asdict(spec),
        "buckets": table,
        "precompute": {
            "model": str(model_dir), "latents": opts.latents, "dtype": dtype, "model_dtype": str(model_dtype),
            "max_text_tokens": opts.max_text_tokens, "caption_key": opts.caption_key, "image_key": opts.image_key,
            "keep_image": opts.keep_image, "vae_shift_factor": vae_config.get("shift_factor"),
            "vae_scaling_factor": vae_config.get("scaling_factor"), "vae_class": vae_config.get("_class_name"),
        },
    }

    def handle_part(samples, writers: BucketWriters, log: SkipLog, progress) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_empty_prompt(out, enc, opts.max_text_tokens, dtype)
        queues: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

        def flush(b: int) -> None:
            items = queues.pop(b, [])
            if not items:
                return
            mean, std = enc.latents(torch.stack([p for _, _, p in items]))  # (B, C, h, w) each
            t5, pooled, lengths = enc.prompts([c for _, c, _ in items], opts.max_text_tokens)
            for i, (s, caption, _) in enumerate(items):
                row = {"caption": caption, "key": str(s.get("key", "")), "width": s["_w"], "height": s["_h"],
                       "bucket": b, "latent_mean": to_store(mean[i], dtype), "t5": to_store(t5[i], dtype),
                       "t5_len": lengths[i]}
                if has_pooled:
                    row["pooled"] = to_store(pooled[i], dtype)
                if opts.latents == "dist":
                    row["latent_std"] = to_store(std[i], dtype)
                if opts.keep_image:
                    row["image"] = s[opts.image_key]
                writers.write(b, row)
            log.converted += len(items)

        for s in samples:
            key = str(s.get("key", ""))
            try:
                caption, img = _caption_and_image(s, opts)
            except Skip as e:
                log.skip(e.reason, key=key, file=str(src), detail=e.detail)
                progress(1)
                continue
            w, h = img.size
            b = assign_bucket(w, h, table)
            bw, bh = table[b]
            pixels = image_to_tensor(resize_cover_crop(img, bw, bh))  # (3, bh, bw)
            queues.setdefault(b, []).append(({**s, "_w": w, "_h": h}, caption, pixels))
            if len(queues[b]) >= opts.batch_size:
                flush(b)
            progress(1)
        for b in sorted(queues):
            flush(b)

    src_cols = source_columns(read_index(Path(src)))
    for key, flag in ((opts.image_key, "--image-key"), (opts.caption_key, "--caption-key")):
        if key not in src_cols:
            raise ValueError(f"{flag}: '{key}' is not a column of '{src}' (columns: {', '.join(src_cols)})")
    return run_parts(src, out, settings=settings, shard_index=shard_index, num_shards=num_shards,
                     handle_part=handle_part, columns=columns(opts, dtype, pooled=has_pooled),
                     progress_bar=progress_bar, desc="precompute")


def precompute_random(
    model_dir: str | Path, src: str | Path, out: str | Path, *, resolution: int, max_text_tokens: int = 512,
    seed: int = 0, dtype: str = "bf16", progress_bar: bool = False,
) -> dict:
    """A precomputed dataset with the layout and widths `precompute` gives for `model_dir`, but random values and
    text lengths, for tests and benchmarks at FLUX widths without running any encoder.

    One row per sample of `src` (its captions are kept): latents (C, R/8, R/8) with C from the VAE config, T5 states
    of D = T5 d_model, CLIP pooled of the CLIP width. Lengths vary over [1, max_text_tokens]; the first sample of
    every part has the full length, so the longest batches reach max_text_tokens.
    """
    model_dir = Path(model_dir).resolve()
    cfgs = {sub: json.loads((model_dir / sub / "config.json").read_text())
            for sub in ("vae", "text_encoder", "text_encoder_2")}
    channels, t5_dim = cfgs["vae"]["latent_channels"], cfgs["text_encoder_2"]["d_model"]
    pooled_dim = cfgs["text_encoder"]["hidden_size"]
    spec = BucketSpec(resolution=resolution, square=True)
    opts = PrecomputeOptions(latents="mean", dtype=dtype, max_text_tokens=max_text_tokens)
    settings = {
        "kind": "precomputed", "spec": asdict(spec), "buckets": spec.table(),
        "precompute": {"model": str(model_dir), "latents": "mean", "dtype": dtype, "model_dtype": "random",
                       "max_text_tokens": max_text_tokens, "caption_key": "caption", "image_key": "image",
                       "keep_image": False, "vae_shift_factor": cfgs["vae"].get("shift_factor"),
                       "vae_scaling_factor": cfgs["vae"].get("scaling_factor")},
    }
    out = Path(out)
    gen = torch.Generator().manual_seed(seed)

    def handle_part(samples, writers: BucketWriters, log: SkipLog, progress) -> None:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "empty_prompt.safetensors").is_file():
            save_file({"t5": torch.randn(1, t5_dim, generator=gen).to(_STORE[dtype][0]),
                       "pooled": torch.randn(pooled_dim, generator=gen).to(_STORE[dtype][0])},
                      str(out / "empty_prompt.safetensors"))
        for i, s in enumerate(samples):
            length = max_text_tokens if i == 0 else int(torch.randint(1, max_text_tokens + 1, (), generator=gen))
            side = resolution // 8
            writers.write(0, {
                "caption": str(s.get("caption", "")), "key": str(s.get("key", "")), "width": resolution,
                "height": resolution, "bucket": 0, "t5_len": length,
                "latent_mean": to_store(torch.randn(channels, side, side, generator=gen), dtype),
                "t5": to_store(torch.randn(length, t5_dim, generator=gen), dtype),
                "pooled": to_store(torch.randn(pooled_dim, generator=gen), dtype),
            })
            log.converted += 1
            progress(1)

    return run_parts(src, out, settings=settings, shard_index=0, num_shards=1, handle_part=handle_part,
                     columns=columns(opts, dtype), progress_bar=progress_bar, desc="random precompute")
