"""`dedistill data convert|merge|bucket|precompute|inspect`: registered into launch/cli.py's parser.

Library code raises ValueError for bad input; launch/cli.py prints it as one line `dedistill: error: ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dataset_tools import buckets, convert
from dataset_tools.buckets import BucketSpec, bucket_dataset, default_step_help
from dataset_tools.inspect_mds import inspect_dataset, render_text


def _bytes(text: str, key: str = "--shard-size") -> int:
    # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
    from streaming.base.util import bytes_to_int

    try:
        return bytes_to_int(text)
    except ValueError:
        raise ValueError(f"{key}: '{text}' is not a size (e.g. 64mb, 1gb, 67108864)") from None


def cmd_convert(a) -> None:
    opts = convert.ConvertOptions(
        kind=a.kind, min_size=a.min_size, check=a.check, shard_size=_bytes(a.shard_size),
        caption_field=a.caption_field, path_field=a.path_field, key_field=a.key_field,
        max_bytes=_bytes(a.max_bytes, "--max-bytes"), max_pixels=a.max_pixels, max_side=a.max_side,
    )
    r = convert.convert(a.source, a.out, opts=opts, workers=a.workers, shard_index=a.shard_index,
                        num_shards=a.num_shards, progress_bar=not a.no_progress)
    for note in r["notes"]:
        print(note)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped_by_reason"].items())) or "none"
    print(f"converted {r['converted']}, skipped {r['skipped']} ({reasons}) in {r['elapsed_s']:.1f} s "
          f"({r['samples_per_s']:.0f} samples/s)")
    if r["merged"]:
        print(f"{a.out}/index.json and {a.out}/report.json written")
    else:
        print(f"slice {a.shard_index}/{a.num_shards} done; once all slices are: dedistill data merge {a.out}")


def cmd_merge(a) -> None:
    root = Path(a.dir)
    if buckets.is_bucketed_output(root):
        info = buckets.finalize(root)
        print(f"{root}: {info['samples']} samples in {len(info['counts'])} buckets")
    else:
        rep = convert.merge(root)
        print(f"{root}: {rep['converted']} samples, {rep['skipped']} skipped; index.json and report.json written")


def cmd_bucket(a) -> None:
    spec = BucketSpec(resolution=a.resolution, step=a.bucket_step, max_aspect=a.max_aspect, square=a.square)
    info = bucket_dataset(a.src, a.out, spec=spec, shard_index=a.shard_index, num_shards=a.num_shards,
                          image_key=a.image_key, progress_bar=not a.no_progress)
    _print_layout(a.out, info)


def cmd_precompute(a) -> None:
    # deferred: precompute imports torch and the model code (seconds); `dedistill --help` imports this module
    from dataset_tools.precompute import PrecomputeOptions, precompute

    spec = BucketSpec(resolution=a.resolution, step=a.bucket_step, max_aspect=a.max_aspect, square=a.square)
    opts = PrecomputeOptions(latents=a.latents, dtype=a.dtype, max_text_tokens=a.max_text_tokens,
                             batch_size=a.batch_size, device=a.device, model_dtype=a.model_dtype,
                             caption_key=a.caption_key, image_key=a.image_key, keep_image=a.keep_image)
    info = precompute(a.model, a.src, a.out, spec=spec, opts=opts, shard_index=a.shard_index,
                      num_shards=a.num_shards, progress_bar=not a.no_progress)
    _print_layout(a.out, info)


def _print_layout(out, info: dict) -> None:
    if info.get("finalized"):
        print(f"{out}: {info['samples']} samples in {len(info['counts'])} buckets; buckets.json and report.json "
              f"written")
    else:
        print(f"{out}: {info['parts_done']}/{info['parts_total']} parts done; the last slice to finish (or "
              f"`dedistill data merge {out}`) writes the indexes")


def cmd_inspect(a) -> None:
    stats = inspect_dataset(a.dir, max_samples=a.max_samples, plot=a.plot)
    if a.json:
        print(json.dumps(stats, indent=2))
    else:
        print(render_text(stats))


def _slicing(s) -> None:
    s.add_argument("--shard-index", type=int, default=0, help="which slice this process converts (SLURM array id)")
    s.add_argument("--num-shards", type=int, default=1, help="how many disjoint slices the work is split into")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _bucket_args(s, *, default_resolution: int | None) -> None:
    s.add_argument("--resolution", type=int, required=default_resolution is None, default=default_resolution,
                   help="target side R: buckets hold about R*R pixels")
    s.add_argument("--bucket-step", type=int, default=None,
                   help=f"bucket sides are multiples of this (a multiple of 16; default: {default_step_help()})")
    s.add_argument("--max-aspect", type=float, default=2.5, help="widest bucket aspect ratio (long/short side)")
    s.add_argument("--square", action="store_true", help="one square bucket: scale + centre crop to R x R")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset tools: convert, merge, bucket, precompute, inspect")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    s = sub.add_parser("convert", help="image folder / webdataset tars / jsonl|parquet manifest -> MDS shards")
    s.add_argument("--source", required=True, help="image folder, .tar file or folder of .tar files, or manifest")
    s.add_argument("--out", required=True, help="output MDS directory")
    s.add_argument("--kind", default="auto", choices=["auto", "folder", "webdataset", "manifest"])
    s.add_argument("--workers", type=int, default=1, help="processes (each writes its own part directory)")
    s.add_argument("--min-size", type=int, default=64, help="skip images whose short side is smaller")
    s.add_argument("--check", default="fast", choices=["fast", "full"],
                   help="fast: header + truncation check; full: decode every pixel (slower, see docs/data.md)")
    s.add_argument("--shard-size", default="64mb", help="MDS shard size limit (e.g. 64mb)")
    s.add_argument("--caption-field", default="caption", help="caption key in .json sidecars / manifest rows")
    s.add_argument("--path-field", default="path", help="manifests: image path column")
    s.add_argument("--key-field", default="key", help="manifests: sample key column (default: the path)")
    s.add_argument("--max-bytes", default="64mb",
                   help="skip any file, tar member or manifest line larger than this, unread (e.g. 64mb)")
    s.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="skip images whose header claims more pixels than this, undecoded")
    s.add_argument("--max-side", type=int, default=4096,
                   help="store larger images downscaled to this long side (0: keep every original)")
    _slicing(s)
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("merge", help="join the per-part indexes and reports (after all slices finished)")
    s.add_argument("dir")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("bucket", help="re-shard raw MDS shards by aspect bucket (no decoding), for data.buckets")
    s.add_argument("--src", required=True, help="MDS directory from `dedistill data convert`")
    s.add_argument("--out", required=True)
    s.add_argument("--image-key", default="image")
    _bucket_args(s, default_resolution=None)
    _slicing(s)
    s.set_defaults(func=cmd_bucket)

    s = sub.add_parser("precompute", help="VAE latents, unpadded T5 states, CLIP pooled, aspect buckets")
    s.add_argument("--model", required=True, help="diffusers-format FLUX directory")
    s.add_argument("--src", required=True, help="MDS directory from `dedistill data convert`")
    s.add_argument("--out", required=True)
    _bucket_args(s, default_resolution=512)
    s.add_argument("--latents", default="dist", choices=["dist", "mean"],
                   help="dist: the VAE posterior's mean and std (a fresh latent sample every epoch); mean: mean only")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="storage dtype of latents and text states (auto: the encoders' dtype)")
    s.add_argument("--max-text-tokens", type=int, default=512, help="T5 truncation (= objective.max_text_tokens)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    s.add_argument("--model-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    s.add_argument("--caption-key", default="caption")
    s.add_argument("--image-key", default="image")
    s.add_argument("--keep-image", action="store_true", help="also copy the encoded image bytes")
    _slicing(s)
    s.set_defaults(func=cmd_precompute)

    s = sub.add_parser("inspect", help="sample count, buckets, bytes per column, caption lengths (text + PNG)")
    s.add_argument("dir")
    s.add_argument("--max-samples", type=int, default=100_000, help="caption statistics from at most this many")
    s.add_argument("--plot", default=None, help="PNG path for the plots (default: DIR/inspect.png if writable)")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=cmd_inspect)
