#!/usr/bin/env python
"""Padding left after trimming, with and without `data.length_grouping` (train/data.py's `group_by_length`).

    python bench/length_grouping.py [--samples 8192] [--median 96] [--buckets 1,5]

Caption lengths are drawn as bench/train_step.py draws them (T5 tokens, log-normal around the median, σ 0.5,
clipped to [8, 512]); batches come from aspect buckets as per_stream batching hands them out (each batch from one
bucket, buckets drawn with unequal weights). Each batch's text is trimmed to its longest caption, as the trainer
does. Columns: `text pad %` — padding among the text tokens the transformer processes; `text/sample` — mean
processed text tokens per sample; `pad % of T at 512²/1024²` — padding among all tokens (1024 / 4096 image tokens +
text), roughly the share of matmul work spent on padding. Window 1 is grouping off (the stream's own batches).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import prompt_lengths  # noqa: E402
from train.data import group_by_length  # noqa: E402

WINDOWS = (1, 4, 8, 16, 64)
IMAGE_TOKENS = {512: 1024, 1024: 4096}


def stream(n: int, *, batch: int, buckets: int, median: int, seed: int) -> list[dict]:
    """n samples in stream order: whole batches, each from one bucket; bucket k drawn with weight 1/(k+1)."""
    rng = random.Random(seed)
    lengths = prompt_lengths(n, median=median, max_tokens=512, seed=seed)
    keys = [torch.empty(0, k) for k in range(buckets)]  # only the shape matters: it names the bucket
    weights = [1 / (k + 1) for k in range(buckets)]
    out = []
    for b in range(n // batch):
        key = rng.choices(keys, weights)[0]
        out += [{"caption": f"c{b * batch + j}", "pixels": key, "n": lengths[b * batch + j]} for j in range(batch)]
    return out


def measure(samples: list[dict], *, batch: int, window: int) -> dict:
    length_of = lambda s: s["n"]  # noqa: E731
    batches = []
    step = batch * window
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        batches += group_by_length(chunk, batch_size=batch, length_of=length_of) if window > 1 else [
            chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    real = sum(s["n"] for b in batches for s in b)
    processed = sum(len(b) * max(s["n"] for s in b) for b in batches)
    n = sum(len(b) for b in batches)
    row = {"text_pad": 1 - real / processed, "text_per_sample": processed / n}
    for res, img in IMAGE_TOKENS.items():
        row[res] = (processed - real) / (processed + img * n)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--median", type=int, default=96)
    p.add_argument("--batches", default="4,16", help="micro-batch sizes")
    p.add_argument("--buckets", default="1,5", help="numbers of aspect buckets")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"# bench/length_grouping.py: {a.samples} captions, log-normal median {a.median} T5 tokens (σ 0.5, "
          f"clipped to [8, 512]), seed {a.seed}\n")
    print("| buckets | batch | window | text pad % | text/sample | pad % of T at 512² | pad % of T at 1024² |")
    print("|---|---|---|---|---|---|---|")
    for buckets in map(int, a.buckets.split(",")):
        for batch in map(int, a.batches.split(",")):
            samples = stream(a.samples, batch=batch, buckets=buckets, median=a.median, seed=a.seed)
            for window in WINDOWS:
                r = measure(samples, batch=batch, window=window)
                print(f"| {buckets} | {batch} | {'off' if window == 1 else window} | {100 * r['text_pad']:.1f} | "
                      f"{r['text_per_sample']:.1f} | {100 * r[512]:.1f} | {100 * r[1024]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
