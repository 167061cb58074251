"""The tiny procedural dataset: MDS shards that StreamingDataset reads back, attributes recoverable from pixels."""

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from dataset_tools.tiny_data import COLOURS, POSITIONS, SHAPES, SIZES, draw_sample, iter_samples, write_tiny_data


def read_mds(path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def test_mds_shards_read_back(tiny_data_dir, tiny_model_dir):
    from transformers import T5TokenizerFast

    index = json.loads((tiny_data_dir / "index.json").read_text())
    assert len(index["shards"]) >= 2  # multi-shard paths run even on the tiny set
    assert set(index["shards"][0]["column_names"]) == {"image", "caption", "width", "height", "key", "attributes"}

    samples = read_mds(tiny_data_dir)
    assert len(samples) == 128
    assert [s["key"] for s in samples] == [f"{i:06d}" for i in range(128)]
    for s in samples:
        assert s["image"][:8] == b"\x89PNG\r\n\x1a\n"  # the encoded bytes, as written
        img = Image.open(io.BytesIO(s["image"]))
        assert img.size == (64, 64) == (s["width"], s["height"]) and img.mode == "RGB"
        assert s["caption"].strip() and s["caption"] == s["caption"].lower()
        assert 1 <= len(s["attributes"]["objects"]) <= 3

    tok = T5TokenizerFast.from_pretrained(str(tiny_model_dir / "tokenizer_2"))
    lengths = [len(tok(s["caption"]).input_ids) for s in samples]
    assert len(set(lengths)) >= 3 and max(lengths) >= 2 * min(lengths)  # padding varies from batch to batch


def test_attributes_are_recoverable_from_pixels():
    """Corners show the background; each object's cell centre shows its colour (a ring's hole: the background)."""
    rng = random.Random(0)
    for _ in range(200):
        img, caption, attrs = draw_sample(rng, 64)
        px = np.asarray(img)
        bg = COLOURS[attrs["background"]]
        for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
            assert tuple(px[y, x]) == bg
        colours = [attrs["background"]]
        for obj in attrs["objects"]:
            assert obj["shape"] in SHAPES and obj["size"] in SIZES and obj["position"] in POSITIONS
            col, row = POSITIONS[obj["position"]]
            centre = tuple(px[int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)])
            assert centre == (bg if obj["shape"] == "ring" else COLOURS[obj["colour"]]), (caption, obj)
            colours.append(obj["colour"])
        assert len(set(colours)) == len(colours)  # objects and background all differ
        assert len({o["position"] for o in attrs["objects"]}) == len(attrs["objects"])  # no overlap
        # Every object is named by "<colour> <shape>", the main one first.
        where = [caption.find(f"{o['colour']} {o['shape']}") for o in attrs["objects"]]
        assert min(where) >= 0 and where[0] == min(where), caption


def test_caption_length_grows_with_object_count():
    words = {1: [], 2: [], 3: []}
    for _, _, caption, attrs in iter_samples(300, size=16):
        words[len(attrs["objects"])].append(len(caption.split()))
    assert all(words.values())
    assert np.mean(words[1]) < np.mean(words[2]) < np.mean(words[3])


def test_deterministic_for_a_seed(tmp_path):
    a = write_tiny_data(tmp_path / "a", n=40, seed=3)
    b = write_tiny_data(tmp_path / "b", n=40, seed=3)
    c = write_tiny_data(tmp_path / "c", n=40, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) >= 3
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "shard.00000.mds").read_bytes() != (c / "shard.00000.mds").read_bytes()

    # numpy Generators work too, and deterministically.
    x = draw_sample(np.random.default_rng(5), 32)
    y = draw_sample(np.random.default_rng(5), 32)
    assert x[1:] == y[1:] and np.array_equal(np.asarray(x[0]), np.asarray(y[0]))


def test_folder_format_matches_the_samples(tmp_path):
    out = write_tiny_data(tmp_path / "folder", n=12, size=32, seed=0, fmt="folder")
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.txt"))) == len(list(out.glob("*.json"))) == 12
    for key, img, caption, attrs in iter_samples(12, size=32, seed=0):
        assert (out / f"{key}.txt").read_text() == caption
        assert json.loads((out / f"{key}.json").read_text()) == attrs
        with Image.open(out / f"{key}.png") as on_disk:
            assert np.array_equal(np.asarray(on_disk.convert("RGB")), np.asarray(img))


def test_refusals(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        write_tiny_data(out, n=4)
    with pytest.raises(ValueError, match="fmt"):
        write_tiny_data(tmp_path / "other", n=4, fmt="tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
