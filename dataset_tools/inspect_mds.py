"""`dedistill data inspect DIR`: what an MDS dataset holds, from a convert, bucket or precompute run.

Counts come from the indexes (free); per-column bytes, caption lengths and (for raw data) aspect ratios from a
strided sample of at most `max_samples` samples spread over every shard. Named inspect_mds so it never shadows the
standard library's `inspect`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _column_bytes(value) -> int:
    """Bytes a column value takes in an MDS shard (its encoding's payload; array headers are a few bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (int, np.integer)):
        return 8
    if isinstance(value, float):
        return 8
    return len(json.dumps(value).encode("utf-8"))


def _datasets(root: Path) -> tuple[str, list[tuple[str, Path]], dict | None]:
    """(kind, [(bucket label or "", MDS dir)], buckets.json) of a dataset root."""
    layout_path = root / "buckets.json"
    if layout_path.is_file():
        layout = json.loads(layout_path.read_text())
        dirs = [(f"{b['width']}x{b['height']}", root / b["dir"]) for b in layout["buckets"] if b["samples"]]
        return ("precomputed" if layout["kind"] == "precomputed" else "raw, bucketed"), dirs, layout
    if (root / "index.json").is_file():
        return "raw", [("", root)], None
    if (root / "parts").is_dir() or any(root.glob("part-*")):
        raise ValueError(f"{root}: an unfinished run (no index.json / buckets.json yet); finish it or run "
                         f"`dedistill data merge {root}`")
    raise ValueError(f"{root}: not an MDS dataset (no index.json or buckets.json)")


def _hist(values: list[float], bins: list[float]) -> list[int]:
    counts, _ = np.histogram(values, bins=bins)
    return counts.tolist()


def _bins(values: list[int], n: int = 12) -> dict:
    """About n equal integer bins [lo, hi) covering 0..max."""
    top = int(max(values, default=0))
    width = max(1, math.ceil((top + 1) / n))
    edges = list(range(0, top + width + 1, width))
    return {"bins": edges, "counts": _hist(values, edges)}


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def inspect_dataset(root: str | Path, *, max_samples: int = 100_000, plot: str | None = None) -> dict:
    """Statistics of the dataset at `root` (JSON-able); writes the plots to `plot` (a PNG path), or to
    root/inspect.png when writable (else ./inspect.png) when `plot` is None; "" disables the PNG."""
    # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
    from streaming.base.format import reader_from_json

    root = Path(root)
    kind, dirs, layout = _datasets(root)
    shards = [(label, d, s) for label, d in dirs for s in json.loads((d / "index.json").read_text())["shards"]]
    n_total = sum(s["samples"] for _, _, s in shards)
    if n_total == 0:
        raise ValueError(f"{root}: the dataset holds no samples")
    disk = sum((s.get("raw_data") or {}).get("bytes", 0) for _, _, s in shards)
    stride = max(1, math.ceil(n_total / max(1, max_samples)))

    col_bytes: Counter = Counter()
    words, chars, tokens, aspects = [], [], [], []
    read = 0
    offset = 0  # global sample number of the shard's first sample: the stride runs across shards
    for label, d, shard in shards:
        reader = reader_from_json(str(d), None, shard)
        first = (-offset) % stride
        for i in range(first, shard["samples"], stride):
            sample = reader.get_item(i)
            read += 1
            for k, v in sample.items():
                col_bytes[k] += _column_bytes(v)
            cap = sample.get("caption")
            if isinstance(cap, str):
                words.append(len(cap.split()))
                chars.append(len(cap))
            if "t5_len" in sample:
                tokens.append(int(sample["t5_len"]))
            if isinstance(sample.get("width"), int) and isinstance(sample.get("height"), int) and sample["height"]:
                aspects.append(sample["width"] / sample["height"])
        offset += shard["samples"]

    stats: dict = {
        "dir": str(root),
        "kind": kind,
        "samples": n_total,
        "shards": len(shards),
        "bytes_on_disk": disk,
        "bytes_per_sample_on_disk": round(disk / n_total, 1),
        "inspected_samples": read,
        "bytes_per_sample_by_column": {k: round(v / read, 1) for k, v in sorted(col_bytes.items(), key=lambda x: -x[1])},
        "caption_words": _summary(words),
        "caption_chars": _summary(chars),
    }
    if layout is not None:
        stats["resolution"] = layout["resolution"]
        stats["buckets"] = {f"{b['width']}x{b['height']}": b["samples"] for b in layout["buckets"]}
        if "precompute" in layout:
            stats["precompute"] = layout["precompute"]
    if tokens:
        stats["t5_tokens"] = _summary(tokens)
    if aspects:
        stats["aspect_ratio"] = _summary(aspects)
    stats["caption_words_histogram"] = _bins(words)
    if tokens:
        stats["t5_tokens_histogram"] = _bins(tokens)

    if plot != "":
        stats["plot"] = str(_plot(stats, words, tokens, aspects, root, plot))
    return stats


def _plot(stats: dict, words: list, tokens: list, aspects: list, root: Path, path: str | None) -> Path:
    # deferred: matplotlib costs ~0.4 s, only the PNG needs it, and `dedistill --help` imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the headless backend is chosen

    if path is None:
        path = str(root / "inspect.png") if os.access(root, os.W_OK) else "inspect.png"
    panels = [("caption length (words)", words, None)]
    if tokens:
        panels.append(("T5 tokens (unpadded)", tokens, None))
    if "buckets" in stats:
        panels.append(("samples per bucket", None, stats["buckets"]))
    elif aspects:
        panels.append(("aspect ratio (w/h)", aspects, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    axes = np.atleast_1d(axes)
    for ax, (title, values, bars) in zip(axes, panels):
        if bars is not None:
            ax.bar(range(len(bars)), list(bars.values()), color="tab:blue")
            ax.set_xticks(range(len(bars)), list(bars), rotation=60, fontsize=7)
        else:
            ax.hist(values, bins=30, color="tab:blue")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{stats['dir']}  ({stats['samples']} samples, {stats['kind']})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _bar(count: int, top: int, width: int = 40) -> str:
    return "#" * (round(width * count / top) if top else 0)


def render_text(stats: dict) -> str:
    lines = [
        f"dataset   {stats['dir']} ({stats['kind']})",
        f"samples   {stats['samples']:,} in {stats['shards']} shards, {_human(stats['bytes_on_disk'])} on disk "
        f"({_human(stats['bytes_per_sample_on_disk'])}/sample)",
    ]
    if "precompute" in stats:
        p = stats["precompute"]
        lines.append(f"precompute latents={p['latents']} dtype={p['dtype']} max_text_tokens={p['max_text_tokens']}")
    if "buckets" in stats:
        top = max(stats["buckets"].values())
        lines.append(f"buckets   (about {stats['resolution']}x{stats['resolution']} pixels each)")
        for name, n in stats["buckets"].items():
            lines.append(f"  {name:>9} {n:>9,} {100 * n / stats['samples']:5.1f}% {_bar(n, top)}")
    if "aspect_ratio" in stats:
        a = stats["aspect_ratio"]
        lines.append(f"aspect    w/h min {a['min']:.2f}  p50 {a['p50']:.2f}  max {a['max']:.2f}")
    lines.append(f"bytes per sample by column (mean of {stats['inspected_samples']:,} samples)")
    for col, b in stats["bytes_per_sample_by_column"].items():
        lines.append(f"  {col:<12} {_human(b):>10}")
    for key, title in (("caption_words", "caption words"), ("t5_tokens", "T5 tokens")):
        if stats.get(key):
            s = stats[key]
            lines.append(f"{title:<14} min {s['min']:.0f}  mean {s['mean']:.1f}  p50 {s['p50']:.0f}  "
                         f"p95 {s['p95']:.0f}  max {s['max']:.0f}")
            hist = stats[f"{key}_histogram"]
            top = max(hist["counts"]) if hist["counts"] else 0
            for lo, hi, n in zip(hist["bins"], hist["bins"][1:], hist["counts"]):
                label = f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
                lines.append(f"  {label:>9} {n:>8,} {_bar(n, top)}")
    if stats.get("plot"):
        lines.append(f"plot      {stats['plot']}")
    return "\n".join(lines)
