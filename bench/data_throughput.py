#!/usr/bin/env python
"""Data-path benchmark: what one CPU core does per second at each stage, and what precomputed shards weigh.

    python bench/data_throughput.py            # realistic sizes (1024x768 JPEG photos, FLUX shapes), ~2 minutes
    python bench/data_throughput.py --tiny     # a few seconds (the tests run this)

Sections (each a markdown table):
1. image check: ms per image for `dedistill data convert`'s checks (header only, --check fast, --check full).
2. convert: samples/s of `dedistill data convert` on an image folder with 1 and 2 workers (processes), total and
   per worker, and the scaling versus 1 worker.
3. loader: samples/s of the training loader on one core (StreamingDataLoader, num_workers=0: the main process is
   the one loader worker), for raw shards (JPEG decode + bicubic resize + centre crop to R, to a tensor) and for
   precomputed shards at FLUX's real shapes (bf16 latent mean+std 16 x R/8 x R/8, unpadded T5 states L x 4096,
   CLIP pooled 768; values are synthetic: reading cost does not depend on them).
4. bytes per sample of the precomputed columns: T5 padded to 512 tokens vs unpadded at typical caption lengths.

The photos are synthetic (smooth colour fields, shapes, sensor-like noise) and compress like photos at JPEG
quality 90. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

T5_DIM, CLIP_DIM, LATENT_CHANNELS, MAX_TOKENS = 4096, 768, 16, 512  # FLUX.1: T5-XXL, CLIP-L, 16-channel VAE


def photo(w: int, h: int, seed: int):
    """A synthetic photo-like RGB image: smooth gradients, a few soft shapes, mild noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(x / w * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(y / h * rng.uniform(1, 3)),
        127 + 100 * np.cos(x / w * rng.uniform(1, 4) + y / h * rng.uniform(1, 3)),
        127 + 100 * np.sin((x + y) / (w + h) * rng.uniform(2, 6)),
    ], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * min(w, h)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def encoded(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def table(title: str, header: list[str], rows: list[list]) -> str:
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- sections


def bench_check(size: tuple[int, int], reps: int) -> str:
    from PIL import Image

    from dataset_tools.convert import check_image

    img = photo(*size, seed=1)
    rows = []
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encoded(img, fmt)
        header = timed(lambda: Image.open(io.BytesIO(data)).size, reps)
        fast = timed(lambda: check_image(data, min_size=0, check="fast"), reps)
        full = timed(lambda: check_image(data, min_size=0, check="full"), max(1, reps // 4))
        rows.append([fmt, f"{len(data) // 1024}", f"{header * 1e3:.3f}", f"{fast * 1e3:.3f}", f"{full * 1e3:.2f}",
                     f"{full / fast:.0f}x"])
    return table(f"image check, {size[0]}x{size[1]}, ms per image (one core)",
                 ["format", "KiB", "header only", "--check fast", "--check full", "full / fast"], rows)


def write_folder(root: Path, n: int, size: tuple[int, int]) -> None:
    """n JPEGs + captions; a few base photos reused with different bytes (re-encoded at varied quality)."""
    root.mkdir(parents=True)
    bases = [photo(*size, seed=s) for s in range(4)]
    for i in range(n):
        buf = io.BytesIO()
        bases[i % 4].save(buf, format="JPEG", quality=85 + i % 10)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (root / f"{i:06d}.txt").write_text(f"a synthetic photograph number {i} with soft coloured shapes")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the convert workers): load-independent cost."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_convert(tmp: Path, n: int, size: tuple[int, int], workers: list[int], checks: list[str]) -> tuple[str, Path]:
    from dataset_tools.convert import ConvertOptions, convert

    src = tmp / "folder"
    write_folder(src, n, size)
    rows, base = [], {}
    last = None
    for check in checks:
        for w in workers:
            out = tmp / f"mds_{check}_{w}"
            t0, c0 = time.perf_counter(), cpu_seconds()
            r = convert(src, out, opts=ConvertOptions(check=check, min_size=0), workers=w, progress_bar=False)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            assert r["converted"] == n, r
            rate = n / dt
            base.setdefault(check, rate)
            rows.append([check, w, n, f"{dt:.2f}", f"{rate:.0f}", f"{rate / w:.0f}", f"{rate / base[check]:.2f}x",
                         f"{n / cpu:.0f}"])
            last = out
    kib = sum(p.stat().st_size for p in src.glob("*.jpg")) // n // 1024
    return table(f"convert, {n} JPEGs of {size[0]}x{size[1]} (~{kib} KiB), image folder -> MDS, wall clock incl. "
                 "startup and merge",
                 ["check", "workers", "samples", "seconds", "samples/s", "per worker", "vs 1 worker",
                  "samples per CPU-second"], rows), last


def loader_rate(local: Path, resolution: int, batch_size: int, buckets: bool) -> tuple[float, float, int]:
    """(samples/s wall, samples per CPU-second, samples) of one epoch after the first batch."""
    from train.config import DataConfig
    from train.data import build_loader

    loader = build_loader(DataConfig(local=str(local), resolution=resolution, shuffle=True, num_workers=0,
                                     buckets=buckets), batch_size=batch_size)
    it = iter(loader)
    next(it)  # warm: index, shared memory, page cache
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for batch in it:
        n += len(batch["caption"])
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0), n


def write_precomputed(root: Path, n: int, resolution: int, t5_mean: int) -> None:
    """A precomputed dataset (`data precompute` layout and columns) at FLUX's shapes, bf16 storage."""
    import torch
    from safetensors.torch import save_file
    from streaming import MDSWriter

    from dataset_tools.precompute import PrecomputeOptions, columns, to_store

    rng = np.random.default_rng(0)
    h = w = resolution // 8
    (root / "b000").mkdir(parents=True)
    opts = PrecomputeOptions(dtype="bf16", latents="dist", max_text_tokens=MAX_TOKENS)
    with MDSWriter(out=str(root / "b000"), columns=columns(opts, "bf16")) as wr:
        for i in range(n):
            length = int(np.clip(rng.normal(t5_mean, t5_mean / 3), 2, MAX_TOKENS))
            wr.write({
                "caption": f"caption {i} " * 8, "key": f"{i:06d}", "width": resolution, "height": resolution,
                "bucket": 0, "t5_len": length,
                "latent_mean": to_store(torch.randn(LATENT_CHANNELS, h, w), "bf16"),
                "latent_std": to_store(torch.rand(LATENT_CHANNELS, h, w) * 0.01, "bf16"),
                "t5": to_store(torch.randn(length, T5_DIM), "bf16"),
                "pooled": to_store(torch.randn(CLIP_DIM), "bf16"),
            })
    save_file({"t5": torch.zeros(1, T5_DIM, dtype=torch.bfloat16), "pooled": torch.zeros(CLIP_DIM, dtype=torch.bfloat16)},
              str(root / "empty_prompt.safetensors"))
    layout = {"layout_version": 1, "kind": "precomputed", "resolution": resolution,
              "spec": {"resolution": resolution, "step": 16, "max_aspect": 1.0, "square": True},
              "buckets": [{"id": 0, "dir": "b000", "width": resolution, "height": resolution, "samples": n}],
              "samples": n, "precompute": {"latents": "dist", "dtype": "bf16", "max_text_tokens": MAX_TOKENS}}
    (root / "buckets.json").write_text(json.dumps(layout))


def bench_loader(tmp: Path, raw_dir: Path, n_raw: int, n_pre: int, resolution: int, t5_mean: int,
                 batch_size: int) -> str:
    raw_rate, raw_cpu, raw_n = loader_rate(raw_dir, resolution, batch_size, buckets=False)
    pre = tmp / "precomputed"
    write_precomputed(pre, n_pre, resolution, t5_mean)
    pre_rate, pre_cpu, pre_n = loader_rate(pre, resolution, batch_size, buckets=True)
    per = (2 * LATENT_CHANNELS * (resolution // 8) ** 2 + t5_mean * T5_DIM + CLIP_DIM) * 2
    rows = [
        ["raw: JPEG decode + resize + crop", f"{resolution}", raw_n, f"{raw_rate:.0f}", f"{raw_cpu:.0f}", "-"],
        [f"precomputed: bf16 latents + T5 (mean {t5_mean} tokens)", f"{resolution}", pre_n, f"{pre_rate:.0f}",
         f"{pre_cpu:.0f}", f"{per / 2**20:.2f}"],
    ]
    return table(f"training loader, one worker (num_workers=0, 1 thread), batch {batch_size}, local shards",
                 ["shards", "R", "samples", "samples/s per worker", "samples per CPU-second", "MiB/sample"], rows)


def bytes_table(lengths: list[int]) -> str:
    padded = MAX_TOKENS * T5_DIM * 2
    rows = [["T5 padded to 512 (bf16)", MAX_TOKENS, f"{padded / 2**20:.2f}", "1.0x"]]
    for n in lengths:
        b = n * T5_DIM * 2
        rows.append([f"T5 unpadded, {n} tokens (bf16)", n, f"{b / 2**20:.3f}", f"{padded / b:.1f}x smaller"])
    for r in (512, 1024):
        lat = LATENT_CHANNELS * (r // 8) ** 2 * 2
        rows.append([f"VAE latent mean (+ std) at {r}x{r} (bf16)", "-", f"{lat / 2**20:.3f} (+{lat / 2**20:.3f})", "-"])
    rows.append(["CLIP pooled (bf16)", "-", f"{CLIP_DIM * 2 / 2**20:.4f}", "-"])
    return table("bytes per sample, precomputed columns at FLUX.1 sizes (computed)",
                 ["column", "tokens", "MiB/sample", "vs padded"], rows)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}{load}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small sizes and counts: a few seconds (tests)")
    p.add_argument("--out", default=None, help="keep the generated data here (default: a temp dir, removed)")
    a = p.parse_args(argv)
    import torch

    # One core per loader worker, as in a DataLoader worker process (torch sets 1 thread there); more intra-op
    # threads on a busy 2-core machine only add OpenMP contention (10x slower bf16->fp32 casts, measured).
    torch.set_num_threads(1)
    from streaming import MDSWriter  # noqa: F401  (import once, outside the timings)
    if a.tiny:
        size, n_conv, n_pre, res, t5_mean, reps, checks, batch = (128, 96), 48, 64, 64, 16, 3, ["fast"], 4
    else:
        size, n_conv, n_pre, res, t5_mean, reps, checks, batch = (1024, 768), 1200, 800, 512, 80, 20, ["fast", "full"], 16
    tmp = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="dedistill-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        print(f"# data throughput — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {machine()}"
              f"{' — tiny mode' if a.tiny else ''}\n", flush=True)
        print(bench_check(size, reps), flush=True)
        conv, raw_dir = bench_convert(tmp, n_conv, size, [1, 2], checks)
        print(conv, flush=True)
        print(bench_loader(tmp, raw_dir, n_conv, n_pre, res, t5_mean, batch), flush=True)
        print(bytes_table([20, 80, 256]), flush=True)
    finally:
        if not a.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
