"""Aspect-ratio buckets: the table, the one resize, `dedistill data bucket`, and single-bucket batches in training."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_tools.buckets import BucketSpec, assign_bucket, bucket_dataset, make_buckets
from dataset_tools.convert import ConvertOptions, convert
from dataset_tools.tiny_data import draw_sample
from train.config import DataConfig
from train.data import build_loader, resize_cover_crop

# Sizes of the aspect test set; at R=64 (buckets 48x80, 64x64, 80x48) they fall in all three buckets.
ASPECT_SIZES = [(96, 64), (64, 96), (80, 80), (112, 64), (64, 112), (72, 64), (64, 72), (128, 64)]


def write_aspect_folder(root: Path, n: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """n tiny-data drawings (so the tiny model's tokenizers know every caption word) at several aspect ratios."""
    root.mkdir(parents=True)
    sizes = {}
    for i in range(n):
        img, caption, _ = draw_sample(random.Random(f"{seed}/{i}"), 64)
        w, h = ASPECT_SIZES[i % len(ASPECT_SIZES)]
        img.resize((w, h), Image.BICUBIC).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(caption)
        sizes[f"{i:04d}"] = (w, h)
    return sizes


def make_aspect_mds(tmp: Path, n: int = 48) -> tuple[Path, dict]:
    sizes = write_aspect_folder(tmp / "folder", n)
    convert(tmp / "folder", tmp / "raw", opts=ConvertOptions(min_size=32, shard_size=1 << 14), workers=1,
            progress_bar=False)
    return tmp / "raw", sizes


@pytest.mark.parametrize("resolution", [64, 256, 512, 1024])
def test_bucket_table(resolution):
    spec = BucketSpec(resolution=resolution)
    table = make_buckets(spec)
    assert (resolution, resolution) in table
    assert len(set(table)) == len(table) and len(table) % 2 == 1  # symmetric pairs around the square
    for w, h in table:
        assert w % 16 == 0 and h % 16 == 0 and w % spec.step == 0 and h % spec.step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= spec.max_aspect + 1e-9
        assert (h, w) in table
        # Each landscape bucket is the largest multiple of the step under the area for its height.
        if w >= h:
            assert (w + spec.step) * h > resolution * resolution
    aspects = [w / h for w, h in table]
    assert aspects == sorted(aspects)
    assert make_buckets(BucketSpec(resolution=resolution, square=True)) == [(resolution, resolution)]


def test_bucket_table_1024_and_assignment():
    table = make_buckets(BucketSpec(resolution=1024))
    assert table[len(table) // 2] == (1024, 1024)
    assert (1344, 768) in table and (768, 1344) in table and (1600, 640) in table
    assert table[assign_bucket(1920, 1080, table)] == (1344, 768)  # 16:9 -> 1.75 is nearest
    assert table[assign_bucket(1080, 1920, table)] == (768, 1344)
    assert table[assign_bucket(500, 500, table)] == (1024, 1024)
    assert table[assign_bucket(10000, 100, table)] == (1600, 640)  # beyond the widest: the widest
    for w, h in [(640, 480), (333, 777), (1200, 800)]:
        i = assign_bucket(w, h, table)
        d = abs(math.log(table[i][0] / table[i][1]) - math.log(w / h))
        assert all(d <= abs(math.log(bw / bh) - math.log(w / h)) + 1e-12 for bw, bh in table)
    with pytest.raises(ValueError, match="--resolution"):
        BucketSpec(resolution=100)
    with pytest.raises(ValueError, match="--bucket-step"):
        BucketSpec(resolution=512, step=24)


def test_resize_cover_crop_scales_once_and_keeps_the_centre():
    # 200x100 image: left third blue, middle red, right third green -> a 64x64 crop shows mostly red.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :66] = (0, 0, 255)
    arr[:, 66:134] = (255, 0, 0)
    arr[:, 134:] = (0, 255, 0)
    img = Image.fromarray(arr)
    out = resize_cover_crop(img, 64, 64)
    assert out.size == (64, 64)
    px = np.asarray(out)
    assert tuple(px[32, 32]) == (255, 0, 0) and px[:, 0, 2].mean() > 200  # centre red, left edge still blue
    wide = resize_cover_crop(img, 80, 48)
    assert wide.size == (80, 48)
    assert resize_cover_crop(Image.fromarray(arr[:, :160]), 80, 64).size == (80, 64)  # exact aspect: no crop


def test_bucket_dataset_and_single_bucket_batches(tmp_path):
    raw, sizes = make_aspect_mds(tmp_path)
    spec = BucketSpec(resolution=64)
    table = spec.table()
    out = tmp_path / "bucketed"
    # Two slices, as two SLURM tasks would run them; the second one finalizes.
    first = bucket_dataset(raw, out, spec=spec, shard_index=0, num_shards=2, progress_bar=False)
    assert not first["finalized"] and not (out / "buckets.json").exists()
    second = bucket_dataset(raw, out, spec=spec, shard_index=1, num_shards=2, progress_bar=False)
    assert second["finalized"]
    layout = json.loads((out / "buckets.json").read_text())
    expected = [0] * len(table)
    for w, h in sizes.values():
        expected[assign_bucket(w, h, table)] += 1
    assert [b["samples"] for b in layout["buckets"]] == expected and all(expected)
    assert layout["kind"] == "raw" and layout["resolution"] == 64

    batch_size = 4
    cfg = DataConfig(local=str(out), resolution=64, buckets=True, shuffle_seed=3)
    loader = build_loader(cfg, batch_size=batch_size)
    seen, shapes = [], set()
    for batch in loader:
        assert batch["pixels"].shape[0] == batch_size
        h, w = batch["pixels"].shape[2:]
        assert (w, h) in table
        shapes.add((w, h))
        for cap in batch["caption"]:
            seen.append(cap)
    assert shapes == set(table)  # every bucket trains
    assert len(seen) == sum(c // batch_size * batch_size for c in expected)  # only partial batches dropped
    # The same data without buckets: square centre crops, mixed aspect ratios in one batch.
    square = build_loader(DataConfig(local=str(out), resolution=64, buckets=False), batch_size=batch_size)
    assert next(iter(square))["pixels"].shape == (batch_size, 3, 64, 64)


def test_bucket_settings_are_checked(tmp_path, tiny_data_dir):
    with pytest.raises(ValueError, match="data.buckets: .* is not bucketed"):
        build_loader(DataConfig(local=str(tiny_data_dir), resolution=64, buckets=True), batch_size=2)
    raw, _ = make_aspect_mds(tmp_path, n=16)
    out = tmp_path / "b"
    bucket_dataset(raw, out, spec=BucketSpec(resolution=64), progress_bar=False)
    with pytest.raises(ValueError, match="data.resolution: 128, but .* for 64"):
        build_loader(DataConfig(local=str(out), resolution=128, buckets=True), batch_size=2)
    with pytest.raises(ValueError, match="data.buckets: no bucket holds a full global batch"):
        build_loader(DataConfig(local=str(out), resolution=64, buckets=True), batch_size=64)
    with pytest.raises(ValueError, match="settings .*spec.* differ"):
        bucket_dataset(raw, out, spec=BucketSpec(resolution=64, max_aspect=1.5), progress_bar=False)
    torch.manual_seed(0)  # (keeps torch imported for the fixtures' sake; no randomness used)


def test_bucket_step_help_says_what_the_code_does(capsys):
    """`dedistill data bucket --help` and docs/data.md state the default step; both must match BucketSpec."""
    import re

    from launch.cli import main

    with pytest.raises(SystemExit):
        main(["data", "bucket", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    claims = re.findall(r"(\d+) at R=(\d+)", text)
    assert len(claims) >= 3, text
    for step, r in claims:
        assert BucketSpec(resolution=int(r)).step == int(step), (r, step)
    assert BucketSpec(resolution=512).step == 32
    docs = " ".join((Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text().split())
    stated = re.search(r"default R/16 rounded to 16, so (\d+) at R=(\d+), (\d+) at (\d+), (\d+) at (\d+)", docs)
    assert stated, "docs/data.md no longer states the default bucket step"
    values = [int(v) for v in stated.groups()]
    for step, r in zip(values[::2], values[1::2]):
        assert BucketSpec(resolution=r).step == step
