"""The tiny procedural dataset: MDS shards that StreamingDataset reads back, attributes recoverable from pixels."""

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from mds_read import read_mds

from dataset_tools.tiny_data import (
    BACKGROUND_COLOURS, COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, WorldSpec, draw_sample, iter_samples,
    write_tiny_data,
)


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


def test_the_default_world_is_the_one_the_shipped_toy_was_made_in():
    """Seed 0's first samples, as every shipped artefact (the toy schnell, run E) drew them: a WorldSpec option must
    leave the default world's random draws alone. Python's Mersenne Twister with a string seed is the same on every
    machine, so these are not floats from another box."""
    first = [(c, a) for _, _, c, a in iter_samples(3, size=8, seed=0)]
    assert first == [
        ("an image of a large pink cross at the bottom left and a large orange square on a white background",
         {"objects": [{"shape": "cross", "colour": "pink", "position": "bottom left", "size": "large"},
                      {"shape": "square", "colour": "orange", "position": "bottom", "size": "large"}],
          "background": "white"}),
        ("a large yellow circle at the top left, a red triangle at the right and a large orange ring at the bottom "
         "right on a gray background",
         {"objects": [{"shape": "circle", "colour": "yellow", "position": "top left", "size": "large"},
                      {"shape": "triangle", "colour": "red", "position": "right", "size": "large"},
                      {"shape": "ring", "colour": "orange", "position": "bottom right", "size": "large"}],
          "background": "gray"}),
        ("a small purple star at the bottom and a small black circle",
         {"objects": [{"shape": "star", "colour": "purple", "position": "bottom", "size": "small"},
                      {"shape": "circle", "colour": "black", "position": "top", "size": "small"}],
          "background": "pink"}),
    ]
    counts = [len(a["objects"]) for _, _, _, a in iter_samples(2000, size=8, seed=0)]
    assert abs(counts.count(1) / 2000 - 0.5) < 0.04 and {2, 3} <= set(counts)


def test_split_palettes_one_object_world():
    """`palettes: split` gives each colour word one role (objects OBJECT_COLOURS, backgrounds BACKGROUND_COLOURS,
    together all of COLOURS); `objects: [1]` draws one object; `background_named: 1` names the background always.
    The pixels still show every attribute."""
    assert set(OBJECT_COLOURS).isdisjoint(BACKGROUND_COLOURS) and {*OBJECT_COLOURS, *BACKGROUND_COLOURS} == set(COLOURS)
    world = WorldSpec(objects=[1], palettes="split", background_named=1.0)
    seen_objects, seen_backgrounds = set(), set()
    for _, img, caption, attrs in iter_samples(300, size=64, seed=1, world=world):
        (obj,) = attrs["objects"]
        assert obj["colour"] in OBJECT_COLOURS and attrs["background"] in BACKGROUND_COLOURS
        assert caption.endswith(f" {attrs['background']} background")
        px = np.asarray(img)
        assert tuple(px[0, 0]) == COLOURS[attrs["background"]]
        col, row = POSITIONS[obj["position"]]
        centre = tuple(px[int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)])
        assert centre == (COLOURS[attrs["background"]] if obj["shape"] == "ring" else COLOURS[obj["colour"]])
        seen_objects.add(obj["colour"])
        seen_backgrounds.add(attrs["background"])
    assert seen_objects == set(OBJECT_COLOURS) and seen_backgrounds == set(BACKGROUND_COLOURS)
    never = WorldSpec(background_named=0.0, objects=[1, 2])
    assert not any("background" in c for _, _, c, _ in iter_samples(100, size=8, seed=0, world=never))


@pytest.mark.parametrize("over, message", [
    ({"palettes": "pastel"}, r"^world.palettes: 'pastel' is not one of shared, split$"),
    ({"objects": [0, 1]}, r"^world.objects: counts must be 1, 2 or 3 \(at least one\), got \[0, 1\]$"),
    ({"objects": []}, r"^world.objects: counts must be 1, 2 or 3"),
    ({"background_named": 1.5}, r"^world.background_named: must be in \[0, 1\], got 1.5$"),
])
def test_world_spec_refuses_bad_values(over, message):
    with pytest.raises(ValueError, match=message):
        WorldSpec(**over)
