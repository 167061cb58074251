"""`dedistill data inspect`: counts, buckets, bytes per column and caption lengths, checked against the data."""

import json

import pytest
from PIL import Image

from mds_read import read_mds

from dataset_tools.buckets import BucketSpec, bucket_dataset
from dataset_tools.inspect_mds import inspect_dataset, render_text


def _all_samples(path):
    return read_mds(path)


def test_inspect_raw(tiny_data_dir, tmp_path):
    stats = inspect_dataset(tiny_data_dir, plot=str(tmp_path / "plot.png"))
    samples = _all_samples(tiny_data_dir)
    assert stats["kind"] == "raw" and stats["samples"] == len(samples) == 128 and stats["inspected_samples"] == 128
    index = json.loads((tiny_data_dir / "index.json").read_text())
    assert stats["shards"] == len(index["shards"])
    assert stats["bytes_per_sample_by_column"]["image"] == round(sum(len(s["image"]) for s in samples) / 128, 1)
    words = [len(s["caption"].split()) for s in samples]
    assert stats["caption_words"]["max"] == max(words) and stats["caption_words"]["min"] == min(words)
    hist = stats["caption_words_histogram"]
    assert sum(hist["counts"]) == 128
    lo, hi = hist["bins"][1], hist["bins"][2]
    assert hist["counts"][1] == sum(lo <= w < hi for w in words)
    assert Image.open(stats["plot"]).size[0] > 300
    text = render_text(stats)
    assert "128 in 4 shards" in text and "image" in text and "caption words" in text

    # A strided subset reads fewer samples but still counts all of them.
    part = inspect_dataset(tiny_data_dir, max_samples=30, plot="")
    assert part["samples"] == 128 and part["inspected_samples"] == 26 and "plot" not in part  # every 5th


def test_inspect_bucketed_and_cli(tmp_path, capsys):
    from launch.cli import main
    from test_buckets import make_aspect_mds

    raw, _ = make_aspect_mds(tmp_path, n=24)
    out = tmp_path / "bucketed"
    bucket_dataset(raw, out, spec=BucketSpec(resolution=64), progress_bar=False)
    layout = json.loads((out / "buckets.json").read_text())
    stats = inspect_dataset(out, plot=str(tmp_path / "b.png"))
    assert stats["buckets"] == {f"{b['width']}x{b['height']}": b["samples"] for b in layout["buckets"]}
    assert sum(stats["buckets"].values()) == stats["samples"] == 24
    assert stats["aspect_ratio"]["max"] == 128 / 64 and stats["aspect_ratio"]["min"] == 64 / 112

    main(["data", "inspect", str(out), "--json", "--plot", str(tmp_path / "c.png")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["buckets"] == stats["buckets"]
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(tmp_path)])
    assert "not an MDS dataset" in capsys.readouterr().err
