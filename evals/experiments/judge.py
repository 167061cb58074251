"""The toy's FID/CLIP: a small CNN trained on the world to read each attribute of a single-object image.

Heads: main object's shape, colour, position, size, and the background colour. The penultimate layer (width
`feat_dim`) gives the toy FID's features; per-attribute accuracy against the prompt gives prompt adherence.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dataset_tools.tiny_data import (BACKGROUND_COLOURS, COLOURS, DEFAULT_WORLD, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES,
                                     WorldSpec, draw_sample)

ATTRS: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": sorted(COLOURS),
    "position": list(POSITIONS),
    "size": sorted(SIZES),
    "background": sorted(COLOURS),
}


def chance(world: WorldSpec = DEFAULT_WORLD) -> dict[str, float]:
    """The judge's accuracy per attribute (and their mean) for a guess uniform over what `world` draws: the heads read
    all 12 colours, but a split-palette world draws an object's colour and a background from 6 each."""
    n = {k: len(v) for k, v in ATTRS.items()}
    if world.palettes == "split":
        n["colour"], n["background"] = len(OBJECT_COLOURS), len(BACKGROUND_COLOURS)
    out = {k: 1.0 / v for k, v in n.items()}
    return {**out, "mean": sum(out.values()) / len(out)}


def labels_of(attrs: dict) -> dict[str, int]:
    """World attribute dict (tiny_data.draw_sample) -> class index per judge head; objects[0] is the main one."""
    main = attrs["objects"][0]
    values = {"shape": main["shape"], "colour": main["colour"], "position": main["position"], "size": main["size"],
              "background": attrs["background"]}
    return {k: ATTRS[k].index(v) for k, v in values.items()}


def full_caption(attrs: dict) -> str:
    """The caption naming all five attributes (the eval prompts' form; the world's captions take this form too)."""
    o = attrs["objects"][0]
    where = "in the center" if o["position"] == "center" else f"at the {o['position']}"
    bg = attrs["background"]
    return f"a {o['size']} {o['colour']} {o['shape']} {where} on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"


def single_object_samples(n: int, *, size: int, seed: int,
                          world: WorldSpec = DEFAULT_WORLD) -> list[tuple[np.ndarray, dict]]:
    """n samples of `world` with exactly one object (the only case where 'the main object' is visible in pixels)."""
    if 1 not in world.objects:
        raise ValueError(f"world.objects: {world.objects} has no single-object samples, which the judge and the eval "
                         f"prompts need; include 1")
    out, i = [], 0
    while len(out) < n:
        img, _, attrs = draw_sample(random.Random(f"{seed}/{i}"), size, world)
        i += 1
        if len(attrs["objects"]) == 1:
            out.append((np.asarray(img), attrs))
    return out


def to_tensor(images) -> torch.Tensor:
    """list of HxWx3 uint8 arrays / PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Judge(nn.Module):
    """Input: the image and the image minus its per-channel median (the background, which covers most pixels), so
    the object stands out as the non-zero pixels; global max- and coarse average-pooling keep a 3-px object's colour
    and shape from being averaged away, and its grid cell."""

    def __init__(self, *, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.width, self.feat_dim = width, feat_dim
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(6, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # /2
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # /4
        )
        self.fc = nn.Sequential(nn.Linear(4 * w * (9 + 1), feat_dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feat_dim, len(v)) for k, v in ATTRS.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bg = x.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
        h = self.conv(torch.cat([x, x - bg], dim=1))  # (B, 4w, H/4, W/4)
        pooled = torch.cat([nn.functional.adaptive_avg_pool2d(h, 3).flatten(1), h.amax(dim=(2, 3))], dim=1)
        f = self.fc(pooled)  # (B, feat_dim): the FID features
        return f, {k: head(f) for k, head in self.heads.items()}


def smooth_fields(shape: tuple[int, ...], amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """Random smooth colour fields of `shape` (B, C, H, W): noise on 4², 8², 16² and 32² grids, upsampled bilinearly
    and summed, each image's field scaled to a peak of U(0, amplitude). A VAE's or a generator's errors on a flat
    background look like this: broad tints, swirls and faint contours, not independent pixels."""
    b, c, h, w = shape
    field = sum(nn.functional.interpolate(torch.randn((b, c, n, n), generator=generator), size=(h, w), mode="bilinear",
                                          align_corners=False) for n in (4, 8, 16, 32) if n <= min(h, w))
    peak = field.flatten(1).abs().amax(1).clamp_min(1e-6)[:, None, None, None]
    return field / peak * amplitude * torch.rand((b, 1, 1, 1), generator=generator)


def train_judge(images: torch.Tensor, labels: dict[str, torch.Tensor], *, steps: int, batch_size: int, lr: float,
                seed: int, width: int, feat_dim: int, smooth_noise: float = 0.0) -> Judge:
    """`smooth_noise` > 0 adds `smooth_fields` of that peak amplitude to every training image (on [-1, 1]), so the
    judge reads the object, not a tint or a faint outline in the background, as a person looking at the image does."""
    torch.manual_seed(seed)
    judge = Judge(width=width, feat_dim=feat_dim)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        x = x + 0.05 * torch.randn(x.shape, generator=g)  # robust to the VAE's/generator's slight blur and noise
        if smooth_noise:
            x = x + smooth_fields(x.shape, smooth_noise, g)
        _, logits = judge(x)
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k][idx]) for k in ATTRS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"[proof] judge step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    return judge.eval().requires_grad_(False)


def save_judge(judge: Judge, path) -> None:
    """safetensors, with the architecture (width, feat_dim) in its metadata so `load_judge` needs nothing else."""
    meta = {"width": str(judge.width), "feat_dim": str(judge.feat_dim)}
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path), metadata=meta)


def load_judge(path) -> Judge:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "width" not in meta or "feat_dim" not in meta:
        raise ValueError(f"{path}: not a judge file (no width/feat_dim in its safetensors metadata)")
    judge = Judge(width=int(meta["width"]), feat_dim=int(meta["feat_dim"]))
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_images(judge: Judge, x: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features (N, feat_dim), predicted class per head (N,))."""
    feats, preds = [], {k: [] for k in ATTRS}
    for i in range(0, len(x), batch):
        f, logits = judge(x[i : i + batch])
        feats.append(f.numpy())
        for k in ATTRS:
            preds[k].append(logits[k].argmax(1).numpy())
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


def accuracy(preds: dict[str, np.ndarray], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy and their mean ('adherence' when labels come from the prompts)."""
    acc = {k: float((preds[k] == labels[k].numpy()).mean()) for k in ATTRS}
    acc["mean"] = float(np.mean([acc[k] for k in ATTRS]))
    return acc
