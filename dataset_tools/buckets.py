"""Aspect-ratio buckets and the bucketed dataset layout shared by `dedistill data bucket` and `data precompute`.

Buckets (FLUX/SDXL style): sizes W x H with W*H <= R*R, sides multiples of `step` (itself a multiple of 16, as the
8x VAE and 2x2 packing need), aspect ratio at most `max_aspect`. A sample goes to the bucket whose aspect ratio is
nearest its own in log space (after EXIF rotation); it is then scaled to cover the bucket (bicubic) and centre
cropped, once (`train.data.resize_cover_crop`). `square` is the one-bucket case: R x R, the trainer's default crop.

Layout (why: mosaicml streaming's `batching_method="per_stream"` takes every global batch from one stream, so one
stream per bucket gives single-bucket batches with streaming's own deterministic shuffling and resumption):

    OUT/settings.json                 what produced the directory (checked on re-runs)
    OUT/b<id:03d>/part_<k:05d>/       the samples of source shard k that fall in bucket id (MDS shards + index.json)
    OUT/b<id:03d>/index.json          merged over the parts: one stream per bucket
    OUT/parts/part_<k:05d>/report.json  source shard k is done (written last), with its counts; skipped.jsonl
    OUT/buckets.json                  the bucket table and per-bucket sample counts (written when all parts are done)
    OUT/report.json                   converted/skipped totals, as `data convert` writes

A *part* is one source shard, so the work splits into `--num-shards` disjoint slices (source shard k goes to slice
k % n) and a re-run skips finished parts: kill it at any moment and run the same command again.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from dataset_tools.convert import check_image, merge_index_files
from dataset_tools.report import Skip, SkipLog, merge_reports
from train.outputs import as_stored, check_same_settings, write_json_atomic

LAYOUT_VERSION = 1


def default_step(resolution: int) -> int:
    """The bucket step when none is given: R/16 rounded down to a multiple of 16, at least 16."""
    return max(16, resolution // 16 // 16 * 16)


def default_step_help() -> str:
    """`--bucket-step`'s help, computed from `default_step` so it cannot drift from it."""
    examples = ", ".join(f"{default_step(r)} at R={r}" for r in (256, 512, 1024, 2048))
    return f"R/16 rounded down to a multiple of 16, at least 16: {examples}"


@dataclass(kw_only=True)
class BucketSpec:
    resolution: int = 512
    """Target side R: every bucket holds at most R*R pixels."""
    step: int | None = None
    """Bucket sides are multiples of this (a multiple of 16). None: `default_step(resolution)`."""
    max_aspect: float = 2.5
    """Widest aspect ratio (long side / short side) a bucket may have."""
    square: bool = False
    """One bucket, R x R (scale the short side to R, centre crop): the trainer's default without buckets."""

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"--resolution: must be a positive multiple of 16, got {self.resolution}")
        if self.step is None:
            self.step = default_step(self.resolution)
        if self.step <= 0 or self.step % 16:
            raise ValueError(f"--bucket-step: must be a positive multiple of 16, got {self.step}")
        if self.max_aspect < 1.0:
            raise ValueError(f"--max-aspect: must be >= 1, got {self.max_aspect}")

    def table(self) -> list[tuple[int, int]]:
        return make_buckets(self)


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """(width, height) of every bucket, sorted by aspect ratio (tallest first); symmetric under transposition."""
    r = spec.resolution
    if spec.square:
        return [(r, r)]
    area, step = r * r, spec.step
    sizes = {(r // step * step,) * 2}
    for h in range(step, r + 1, step):  # landscape buckets (w >= h), mirrored below
        w = area // h // step * step
        if w >= h and w / h <= spec.max_aspect + 1e-9:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(width: int, height: int, table: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (log space); ties go to the first."""
    target = math.log(width / height)
    return min(range(len(table)), key=lambda i: (abs(math.log(table[i][0] / table[i][1]) - target), i))


# ------------------------------------------------------------------------------------------------- source shards


def read_index(src: Path) -> list[dict]:
    index = src / "index.json"
    if not index.is_file():
        raise ValueError(f"--src: '{src}' has no index.json (expected MDS shards from `dedistill data convert`)")
    shards = json.loads(index.read_text())["shards"]
    if not shards:
        raise ValueError(f"--src: '{src}' holds no shards")
    return shards


def iter_source_shard(src: Path, shard: dict) -> Iterator[dict]:
    """The samples of one MDS shard of a local dataset, in order."""
    # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
    from streaming.base.format import reader_from_json

    raw = shard.get("raw_data") or {}
    if not (src / raw.get("basename", "\0")).is_file():
        raise ValueError(f"--src: shard file '{src / raw.get('basename', '?')}' is missing (compressed shards are "
                         f"not supported here; write them with compression=None)")
    reader = reader_from_json(str(src), None, shard)
    for i in range(reader.samples):
        yield reader.get_item(i)


def source_columns(shards: list[dict]) -> dict[str, str]:
    first = shards[0]
    return dict(zip(first["column_names"], first["column_encodings"]))


def bucket_dir(out: Path, bucket: int) -> Path:
    return out / f"b{bucket:03d}"


class BucketWriters:
    """One MDSWriter per bucket, opened on first use, for one part: OUT/b<id>/part_<k>/."""

    def __init__(self, out: Path, part: int, columns: dict[str, str], size_limit: int = 1 << 26):
        self.out, self.part, self.columns, self.size_limit = out, part, columns, size_limit
        self.writers: dict[int, object] = {}
        self.counts: dict[int, int] = {}

    def write(self, bucket: int, row: dict) -> None:
        # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
        from streaming import MDSWriter

        w = self.writers.get(bucket)
        if w is None:
            w = self.writers[bucket] = MDSWriter(out=str(bucket_dir(self.out, bucket) / f"part_{self.part:05d}"),
                                                 columns=self.columns, size_limit=self.size_limit)
        w.write(row)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def close(self) -> dict[int, int]:
        for w in self.writers.values():
            w.finish()
        return dict(sorted(self.counts.items()))


# ----------------------------------------------------------------------------------------------- the parts driver


def is_bucketed_output(root: Path) -> bool:
    return (Path(root) / "settings.json").is_file() and (Path(root) / "parts").is_dir()


def _part_marker(out: Path, k: int) -> Path:
    return out / "parts" / f"part_{k:05d}"


def _check_settings(out: Path, settings: dict) -> None:
    settings = as_stored(settings)
    path = out / "settings.json"
    if path.is_file():
        check_same_settings(f"--out: '{out}' was written", json.loads(path.read_text()), settings,
                            remedy="use another --out or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


def run_parts(
    src: str | Path, out: str | Path, *, settings: dict, shard_index: int, num_shards: int,
    handle_part: Callable[[Iterator[dict], BucketWriters, SkipLog, Callable[[int], None]], None],
    columns: dict[str, str], progress_bar: bool = True, desc: str = "",
) -> dict:
    """Run `handle_part(samples, writers, log, progress)` for every unfinished source shard of this slice; when
    every part of every slice is done, finalize (indexes, buckets.json, report.json). Returns a summary."""
    src, out = Path(src), Path(out)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index: must be in [0, --num-shards={num_shards}), got {shard_index}")
    if out.resolve() == src.resolve():
        raise ValueError("--out: must differ from --src")
    shards = read_index(src)
    settings = {**settings, "layout_version": LAYOUT_VERSION, "src": str(src.resolve()),
                "src_shards": len(shards)}
    _check_settings(out, settings)
    mine = [k for k in range(len(shards)) if k % num_shards == shard_index]
    bar = None
    if progress_bar:
        total = sum(shards[k]["samples"] for k in mine)
        bar = tqdm(total=total, desc=desc or out.name, unit=" samples", file=sys.stderr, dynamic_ncols=True)
    for k in mine:
        marker = _part_marker(out, k)
        if (marker / "report.json").is_file():
            if bar is not None:
                bar.update(shards[k]["samples"])
            continue
        # An interrupted attempt (or none): clear whatever it left, then do the whole part.
        shutil.rmtree(marker, ignore_errors=True)
        for d in out.glob(f"b*/part_{k:05d}"):
            shutil.rmtree(d)
        marker.mkdir(parents=True)
        t0 = time.perf_counter()
        log = SkipLog(marker / "skipped.jsonl")
        writers = BucketWriters(out, k, columns)
        handle_part(iter_source_shard(src, shards[k]), writers, log, bar.update if bar else (lambda n: None))
        counts = writers.close()
        log.close()
        write_json_atomic(marker / "report.json", {**log.summary(), "buckets": {str(b): n for b, n in counts.items()},
                                                   "elapsed_s": round(time.perf_counter() - t0, 3)})
    if bar is not None:
        bar.close()
    done = sum((_part_marker(out, k) / "report.json").is_file() for k in range(len(shards)))
    info = {"parts_done": done, "parts_total": len(shards), "finalized": False}
    if done == len(shards):
        info.update(finalize(out), finalized=True)
    return info


def finalize(out: str | Path) -> dict:
    """Merge every bucket's parts into b<id>/index.json and write buckets.json and report.json. Idempotent."""
    out = Path(out)
    settings = json.loads((out / "settings.json").read_text())
    n = settings["src_shards"]
    parts = [_part_marker(out, k) for k in range(n)]
    missing = [p.name for p in parts if not (p / "report.json").is_file()]
    if missing:
        raise ValueError(f"{out}: parts {', '.join(missing[:5])} are not done; run the remaining slices first")
    table = [tuple(s) for s in settings["buckets"]]
    counts = [0] * len(table)
    for p in parts:
        for b, c in json.loads((p / "report.json").read_text())["buckets"].items():
            counts[int(b)] += c
    for b, c in enumerate(counts):
        if c:
            indexes = sorted(bucket_dir(out, b).glob("part_*/index.json"))
            merge_index_files(indexes, bucket_dir(out, b))
    layout = {
        "layout_version": LAYOUT_VERSION,
        "kind": settings["kind"],
        "resolution": settings["spec"]["resolution"],
        "spec": settings["spec"],
        "buckets": [{"id": b, "dir": bucket_dir(out, b).name, "width": w, "height": h, "samples": counts[b]}
                    for b, (w, h) in enumerate(table)],
        "samples": sum(counts),
    }
    if settings["kind"] == "precomputed":
        layout["precompute"] = settings["precompute"]
    write_json_atomic(out / "buckets.json", layout)
    merge_reports(out, parts, extra={"source": settings["src"], "kind": settings["kind"]})
    return {"samples": sum(counts), "counts": {b: c for b, c in enumerate(counts) if c}}


# ------------------------------------------------------------------------------------------------ data bucket


def image_size(sample: dict, image_key: str) -> tuple[int, int]:
    """(width, height) after EXIF rotation: the width/height columns when present, else the image header."""
    if isinstance(sample.get("width"), int) and isinstance(sample.get("height"), int):
        return sample["width"], sample["height"]
    _, w, h = check_image(sample[image_key], min_size=0)
    return w, h


def bucket_dataset(
    src: str | Path, out: str | Path, *, spec: BucketSpec, shard_index: int = 0, num_shards: int = 1,
    image_key: str = "image", progress_bar: bool = True,
) -> dict:
    """Re-shard raw MDS samples by aspect bucket (bytes copied, nothing decoded) for training with data.buckets."""
    src = Path(src)
    shards = read_index(src)
    columns = source_columns(shards)
    if image_key not in columns:
        raise ValueError(f"--image-key: '{image_key}' is not a column of '{src}' (columns: {', '.join(columns)})")
    columns = {**columns, "bucket": "int"}
    table = spec.table()

    def handle_part(samples, writers: BucketWriters, log: SkipLog, progress) -> None:
        for s in samples:
            try:
                w, h = image_size(s, image_key)
            except Skip as e:
                log.skip(e.reason, key=str(s.get("key", "")), file=str(src), detail=e.detail)
            else:
                b = assign_bucket(w, h, table)
                writers.write(b, {**s, "bucket": b})
                log.converted += 1
            progress(1)

    settings = {"kind": "raw", "spec": asdict(spec), "buckets": table, "image_key": image_key}
    return run_parts(src, out, settings=settings, shard_index=shard_index, num_shards=num_shards,
                     handle_part=handle_part, columns=columns, progress_bar=progress_bar, desc="bucket")


def describe(table: list[tuple[int, int]]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in table)


if __name__ == "__main__":  # pragma: no cover - a quick look at a table: python -m dataset_tools.buckets 1024
    r = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    print(describe(make_buckets(BucketSpec(resolution=r))))
