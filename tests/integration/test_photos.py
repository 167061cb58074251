"""Real photographs (tests/fixtures/photos, via conftest's photo_dir / photo_jsonl / photo_wds) in every odd mode a
user's folder holds, through every stage that reads images.

1. `train.images.open_rgb`, the one decoder, against references computed independently here: 16-bit equals its
   8-bit source, transparent pixels become white, CMYK and EXIF-rotated JPEGs come out upright and in colour.
2. Every stage decodes the same way: convert records the displayed size, the raw training loader, precompute, FID's
   image reading and inspect all see exactly `open_rgb`'s pixels / sizes.
3. The CLI as a user types it, on the photos: convert (folder, jsonl, WebDataset) with defaults -> bucket ->
   precompute -> a 2-step train -> sample -> inspect -> export, with no deprecation or DCP warnings on the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTO_FILES, PHOTOS
from train.images import open_rgb

REPO = Path(__file__).resolve().parents[2]


def rgb(path) -> np.ndarray:
    return np.asarray(open_rgb(Path(path)), dtype=np.int16)


def source(name: str) -> np.ndarray:
    """The 8-bit RGB photo a fixture file was written from."""
    return np.asarray(Image.open(PHOTOS / PHOTO_FILES[name][0]).convert("RGB"), dtype=np.int16)


def test_every_odd_mode_becomes_upright_rgb(photo_dir):
    modes = {}
    for name in PHOTO_FILES:
        with Image.open(photo_dir / name) as im:
            modes[name] = im.mode
        img = open_rgb(photo_dir / name)
        assert img.mode == "RGB"
        assert open_rgb((photo_dir / name).read_bytes()).tobytes() == img.tobytes()  # bytes or path: same
    # the fixture really holds the odd modes (PIL opens 16-bit grayscale PNGs as I;16)
    assert {modes["camera_l.png"], modes["astronaut_p.png"], modes["astronaut_rgba.png"], modes["coffee_cmyk.jpg"]} == {
        "L", "P", "RGBA", "CMYK"}
    assert modes["camera_16bit.png"] in ("I;16", "I")

    # 16-bit: exactly its 8-bit source (x257 then the top 8 bits). PIL's convert("RGB") would clip it to white.
    assert np.array_equal(rgb(photo_dir / "camera_16bit.png"), rgb(photo_dir / "camera_l.png"))
    assert rgb(photo_dir / "camera_16bit.png").mean() < 200
    # RGBA: opaque pixels keep their colour, transparent ones become white
    a = rgb(photo_dir / "astronaut_rgba.png")
    assert np.array_equal(a[:, 0], source("astronaut_rgba.png")[:, 0]) and (a[:, -1] == 255).all()
    # palette: the transparent index becomes white, the rest are the photo's colours (within quantisation)
    with Image.open(photo_dir / "astronaut_p.png") as pal:
        clear = np.asarray(pal) == pal.info["transparency"]
        assert pal.size == (172, 172)
    p = rgb(photo_dir / "astronaut_p.png")
    small = np.asarray(Image.open(PHOTOS / "astronaut.jpg").convert("RGB").resize((172, 172), Image.LANCZOS), np.int16)
    assert clear.any() and (p[clear] == 255).all() and np.abs(p - small)[~clear].mean() < 12
    # CMYK: the photo's colours (within JPEG error)
    assert np.abs(rgb(photo_dir / "coffee_cmyk.jpg") - source("coffee_cmyk.jpg")).mean() < 4
    # EXIF orientation 6: stored 200x300, displayed upright 300x200 like its source
    with Image.open(photo_dir / "coffee_exif.jpg") as stored:
        assert stored.size == (200, 300)
    upright = rgb(photo_dir / "coffee_exif.jpg")
    assert upright.shape == source("coffee_exif.jpg").shape and np.abs(upright - source("coffee_exif.jpg")).mean() < 4


def _convert(src, out):
    from dataset_tools.convert import convert

    convert(src, out, progress_bar=False)
    from evals.fid import open_mds

    ds = open_mds(out)
    return {ds[i]["key"]: ds[i] for i in range(len(ds))}


def test_every_stage_decodes_like_open_rgb(photo_dir, photo_jsonl, photo_wds, tiny_model_dir, tmp_path):
    """convert, the raw loader, precompute, FID reading and inspect: one decoder, so the same pixels and sizes."""
    from dataset_tools.buckets import BucketSpec
    from dataset_tools.inspect_mds import inspect_dataset
    from dataset_tools.precompute import PrecomputeOptions, precompute
    from evals.fid import iter_images
    from train.config import DataConfig
    from train.data import build_loader, image_to_tensor, resize_center_crop

    expected = {name.rsplit(".", 1)[0]: open_rgb(photo_dir / name) for name in PHOTO_FILES}

    # convert: the original bytes, and the size every later stage will see (EXIF applied), for all three sources
    by_source = {"folder": _convert(photo_dir, tmp_path / "mds"), "jsonl": _convert(photo_jsonl, tmp_path / "mds_j"),
                 "wds": _convert(photo_wds, tmp_path / "mds_w")}
    for kind, samples in by_source.items():
        assert len(samples) == len(PHOTO_FILES), kind
        for key, s in samples.items():
            stem = Path(key).name.rsplit(".", 1)[0]
            assert (s["width"], s["height"]) == expected[stem].size, (kind, key)
            assert open_rgb(s["image"]).tobytes() == expected[stem].tobytes(), (kind, key)
    samples = by_source["folder"]
    assert (samples["coffee_exif"]["width"], samples["coffee_exif"]["height"]) == (300, 200)

    # the raw training loader (square crop at R=64): exactly the crop of open_rgb's image
    want = {s["caption"]: image_to_tensor(resize_center_crop(expected[k], 64)) for k, s in samples.items()}
    loader = build_loader(DataConfig(local=str(tmp_path / "mds"), resolution=64, shuffle=False), batch_size=1)
    seen = 0
    for batch in loader:
        for caption, pixels in zip(batch["caption"], batch["pixels"]):
            assert torch.equal(pixels, want[caption]), caption
            seen += 1
    assert seen == len(PHOTO_FILES)

    # FID's image reading, from the folder and from the MDS dir: open_rgb's pixels
    folder_imgs = list(iter_images(photo_dir))
    names = sorted(p.name for p in photo_dir.iterdir() if p.suffix in (".jpg", ".png"))
    assert [im.tobytes() for im in folder_imgs] == [expected[n.rsplit(".", 1)[0]].tobytes() for n in names]
    from evals.fid import open_mds

    ds = open_mds(tmp_path / "mds")
    for i, im in enumerate(iter_images(tmp_path / "mds")):
        assert im.tobytes() == expected[ds[i]["key"]].tobytes()

    # precompute: sizes as displayed, and the 16-bit photo encodes exactly like its 8-bit twin
    info = precompute(tiny_model_dir, tmp_path / "mds", tmp_path / "pre", spec=BucketSpec(resolution=64, square=True),
                      opts=PrecomputeOptions(batch_size=4, device="cpu"), progress_bar=False)
    assert info["samples"] == len(PHOTO_FILES)
    pre = {}
    for d in sorted(p for p in (tmp_path / "pre").glob("b[0-9]*") if p.is_dir()):
        part = open_mds(d)
        pre.update({part[i]["key"]: part[i] for i in range(len(part))})
    assert {k: (s["width"], s["height"]) for k, s in pre.items()} == {k: im.size for k, im in expected.items()}
    np.testing.assert_array_equal(np.asarray(pre["camera_16bit"]["latent_mean"]),
                                  np.asarray(pre["camera_l"]["latent_mean"]))

    # inspect: aspect ratios from the recorded (displayed) sizes
    stats = inspect_dataset(tmp_path / "mds", plot=str(tmp_path / "inspect.png"))
    aspects = [im.size[0] / im.size[1] for im in expected.values()]
    assert stats["samples"] == len(PHOTO_FILES)
    assert stats["aspect_ratio"]["min"] == pytest.approx(min(aspects)) and stats["aspect_ratio"]["max"] == pytest.approx(
        max(aspects))


NOISE = ("is deprecated", "torch.distributed is disabled", "kept in float32", "UserWarning", "Traceback")


def _cli(*args) -> subprocess.CompletedProcess:
    """`python -m launch ARGS`, a fresh process as a user's shell starts it (warn-once caches start empty)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    assert not [n for n in NOISE if n in r.stderr], r.stderr[-3000:]
    return r


def _main(capsys, *args) -> str:
    """The same CLI in this process (no interpreter start-up); returns what it printed."""
    from launch.cli import main

    env = dict(os.environ)
    try:
        main([str(a) for a in args])
    finally:  # `train` exports RANK/WORLD_SIZE/...: later tests must not see them
        os.environ.clear()
        os.environ.update(env)
    return capsys.readouterr().out


@pytest.mark.slow
def test_photos_through_the_cli_with_its_defaults(photo_dir, photo_jsonl, photo_wds, tiny_model_dir, tmp_path,
                                                  capsys):
    """What a new user types, on real photos, with no optional flag beyond what the tiny model needs (resolution 64,
    its 64 T5 tokens, 2 steps). Fresh processes for convert (as typed, progress bar on), sample and export, whose
    stderr must hold no warning; the other commands run in-process through the same parser."""
    n = len(PHOTO_FILES)
    r = _cli("data", "convert", "--source", photo_dir, "--out", tmp_path / "mds")  # --workers 1, progress bar on
    assert r.stdout.startswith(f"converted {n}, skipped 0"), r.stdout
    for name, src in (("mds_j", photo_jsonl), ("mds_w", photo_wds)):
        out = _main(capsys, "data", "convert", "--source", src, "--out", tmp_path / name)
        assert out.startswith(f"converted {n}, skipped 0"), out
    assert f"{n} samples in" in _main(capsys, "data", "bucket", "--src", tmp_path / "mds", "--out",
                                      tmp_path / "bucketed", "--resolution", "64")
    assert f"{n} samples in" in _main(capsys, "data", "precompute", "--model", tiny_model_dir, "--src",
                                      tmp_path / "mds", "--out", tmp_path / "pre", "--resolution", "64",
                                      "--max-text-tokens", "64")  # = configs/tiny-cpu.yaml's objective.max_text_tokens
    inspected = _main(capsys, "data", "inspect", tmp_path / "pre", "--json")
    assert json.loads(inspected)["samples"] == n

    # FID between the folder and its MDS conversion: both decoded by train.images.open_rgb, so the same images
    weights = tiny_model_dir / "eval" / "inception.safetensors"
    fid = _main(capsys, "fid", photo_dir, tmp_path / "mds", "--weights", weights, "--dims", "64")
    assert abs(float(fid.split("FID:")[1])) < 1e-3, fid

    run = tmp_path / "run"
    out = _main(capsys, "train", "configs/tiny-cpu.yaml", f"model.path={tiny_model_dir}",
                f"data.local={tmp_path / 'pre'}", "data.buckets=true", f"run_dir={run}", "train.max_steps=2",
                "train.batch_size=1", "checkpoint.every_steps=2", "sample.at_end=false")
    assert "done: step 2" in out
    _cli("sample", "--model", run, "--prompt", "a cup of coffee on a saucer", "--steps", "2", "--resolution", "64",
         "--out", tmp_path / "cup.png")
    assert Image.open(tmp_path / "cup.png").size == (64, 64)
    _cli("export", "--checkpoint", run, "--out", tmp_path / "export")  # --format diffusers --dtype bf16
    from safetensors import safe_open

    (weights_file,) = (tmp_path / "export" / "transformer").glob("*.safetensors")
    with safe_open(str(weights_file), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (tmp_path / "export" / "model_index.json").is_file()
