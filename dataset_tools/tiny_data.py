"""A tiny procedural captioned dataset: 1-3 coloured shapes on a plain background, captions that describe them.

Every attribute a caption can mention is recoverable from the pixels: objects sit in distinct cells of a 3x3 grid
(so they never overlap), object colours differ from each other and from the background, and the two sizes are far
apart. The first object is the main one; its colour, shape, position and size are always drawn, the caption may omit
some of them (so caption lengths, and therefore T5 padding, vary).

`WorldSpec` varies the world (object counts, which colours each role takes, how often captions name the
background); its defaults are the world above. `write_tiny_data` writes MDS shards (the training format) or a folder
of `{key}.png` + `{key}.txt` + `{key}.json` (the input format of `dedistill data convert`).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from train.outputs import atomic_output_dir

# Word lists: the caption vocabulary (the tiny model's tokenizers are trained on it, see dataset_tools/tiny_model.py).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (250, 150, 200),
    "cyan": (40, 220, 230),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (column, row) of the 3x3 grid cell
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}  # name -> shape radius as a fraction of the image side
PREFIXES: tuple[str, ...] = ("", "", "", "a picture of", "an image of", "a simple drawing of")
ADJECTIVES: tuple[str, ...] = ("bright", "plain", "simple")  # optional, before the colour; carry no attribute
FILLER_WORDS: tuple[str, ...] = ("a", "an", "at", "in", "on", "the", "and", "background", "of")

# `WorldSpec.palettes: split`: objects take these colours and backgrounds the others, so a colour word names one
# role. The split keeps every object colour distinct from every background colour at a glance (no yellow on white).
OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUND_COLOURS: tuple[str, ...] = ("white", "black", "pink", "cyan", "brown", "gray")

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: clean edges even at 64 px
PALETTES = ("shared", "split")


def check_object_counts(key: str, counts: list[int]) -> None:
    """A list of objects-per-image counts the world can draw (1-3, at least one), else a ValueError naming `key`."""
    if not counts or any(not 1 <= n <= 3 for n in counts):
        raise ValueError(f"{key}: counts must be 1, 2 or 3 (at least one), got {counts}")


@dataclass(kw_only=True)
class WorldSpec:
    """What the world draws. The defaults are the world of every build before issue 22 (same samples for a seed); the
    toy presets and the shipped toy schnell now draw `palettes: split, objects: [1]` (docs/proof.md).

    A caption names each colour word in one role only with `palettes: split`, and needs no binding of words across
    objects with `objects: [1]`: the two bindings docs/proof.md measured the random tiny T5 to miss."""

    objects: list[int] = field(default_factory=lambda: [1, 1, 2, 3])
    """Object counts, one drawn uniformly per sample (the default: one object half of the time, two or three else)."""
    palettes: str = "shared"
    """shared: objects and background take any distinct colours of COLOURS | split: objects OBJECT_COLOURS,
    backgrounds BACKGROUND_COLOURS."""
    background_named: float = 0.5
    """How often a caption names the background (always with 3 objects, as before)."""

    def __post_init__(self) -> None:
        if self.palettes not in PALETTES:
            raise ValueError(f"world.palettes: '{self.palettes}' is not one of {', '.join(PALETTES)}")
        check_object_counts("world.objects", self.objects)
        if not 0.0 <= self.background_named <= 1.0:
            raise ValueError(f"world.background_named: must be in [0, 1], got {self.background_named}")


DEFAULT_WORLD = WorldSpec()


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    words: set[str] = set(FILLER_WORDS) | set(SHAPES) | set(COLOURS) | set(SIZES) | set(ADJECTIVES)
    for phrase in (*POSITIONS, *PREFIXES):
        words.update(phrase.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------------------------ drawing


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        angles, radii = [-90, 30, 150], [r] * 3
    elif kind == "diamond":
        angles, radii = [-90, 0, 90, 180], [r] * 4
    elif kind == "star":
        angles, radii = [-90 + 36 * i for i in range(10)], [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    elif kind == "cross":
        t = r / 3  # arm half-width
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
               (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        return [(cx + x, cy + y) for x, y in pts]
    else:
        raise AssertionError(kind)
    return [(cx + q * math.cos(math.radians(a)), cy + q * math.sin(math.radians(a))) for a, q in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(0.35 * r)))
    elif kind == "square":
        s = 0.85 * r  # side 1.7r: about the area of the circle of radius r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=fill)


def _as_random(rng: random.Random | np.random.Generator) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    raise TypeError(f"rng: expected random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(r: random.Random, obj: dict, *, with_size: bool, with_position: bool) -> str:
    words = [obj["size"]] if with_size else []
    if r.random() < 0.15:
        words.append(r.choice(ADJECTIVES))
    words += [obj["colour"], obj["shape"]]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    if with_position:
        phrase += " in the center" if obj["position"] == "center" else f" at the {obj['position']}"
    return phrase


def draw_sample(rng: random.Random | np.random.Generator, size: int,
                world: WorldSpec = DEFAULT_WORLD) -> tuple[Image.Image, str, dict]:
    """One (RGB image of side `size`, caption, attributes) sample of `world`.

    attributes = {"objects": [{"shape", "colour", "position", "size"}, ...], "background": colour}; objects[0] is
    the main one (always mentioned first in the caption).
    """
    r = _as_random(rng)
    n = r.choice(world.objects)
    if world.palettes == "shared":
        colours = r.sample(sorted(COLOURS), n + 1)  # distinct: each object separable from the others and the background
    else:
        colours = [*r.sample(OBJECT_COLOURS, n), r.choice(BACKGROUND_COLOURS)]
    positions = r.sample(list(POSITIONS), n)  # distinct grid cells: objects never overlap
    objects = [
        {"shape": r.choice(SHAPES), "colour": colours[i], "position": positions[i], "size": r.choice(sorted(SIZES))}
        for i in range(n)
    ]
    background = colours[n]

    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[background])
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for obj in objects:
        col, row = POSITIONS[obj["position"]]
        _draw_shape(draw, obj["shape"], (col + 0.5) * cell, (row + 0.5) * cell, SIZES[obj["size"]] * big,
                    COLOURS[obj["colour"]])
    img = img.resize((size, size), Image.BOX)

    # Caption: the main object in full more often than not, the others shorter; background sometimes.
    phrases = [_object_phrase(r, objects[0], with_size=r.random() < 0.8, with_position=r.random() < 0.8)]
    phrases += [_object_phrase(r, o, with_size=r.random() < 0.5, with_position=r.random() < 0.6) for o in objects[1:]]
    caption = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if r.random() < world.background_named or n == 3:
        caption += f" on {_article(background)} {background} background"
    prefix = r.choice(PREFIXES)
    if prefix:
        caption = f"{prefix} {caption}"
    return img, caption, {"objects": objects, "background": background}


def iter_samples(n: int, *, size: int = 64, seed: int = 0,
                 world: WorldSpec = DEFAULT_WORLD) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """(key, image, caption, attributes) for samples 0..n-1; sample i depends only on (seed, i, world)."""
    for i in range(n):
        img, caption, attrs = draw_sample(random.Random(f"{seed}/{i}"), size, world)
        yield f"{i:06d}", img, caption, attrs


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------ writing


MDS_COLUMNS = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "key": "str", "attributes": "json"}
_FORMATS = ("mds", "folder")


def _shard_size_limit(n: int, size: int) -> int:
    """About 4 shards for any n (>= 2 for n >= 8), so multi-shard code paths run even on the tiny set."""
    approx_sample = 400 + size * size // 8  # flat-colour PNGs compress to well under 1 byte/pixel
    return max(1 << 12, n * approx_sample // 4)


def write_tiny_data(out_dir: str | Path, *, n: int = 256, size: int = 64, seed: int = 0, fmt: str = "mds",
                    world: WorldSpec = DEFAULT_WORLD) -> Path:
    """Write `n` procedural samples of side `size` as MDS shards (`fmt="mds"`) or an image folder (`fmt="folder"`).

    MDS columns: MDS_COLUMNS; `image` holds the PNG bytes as encoded (the data pipeline decodes them itself).
    Deterministic for a seed. Returns the output directory.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt: '{fmt}' is not one of {', '.join(_FORMATS)}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if size < 8:
        raise ValueError(f"size: must be >= 8, got {size}")
    out = Path(out_dir)
    with atomic_output_dir(out) as tmp:
        if fmt == "mds":
            # deferred: streaming takes seconds to import; the folder format does without it
            from streaming import MDSWriter

            with MDSWriter(out=str(tmp), columns=MDS_COLUMNS, size_limit=_shard_size_limit(n, size)) as w:
                for key, img, caption, attrs in iter_samples(n, size=size, seed=seed, world=world):
                    w.write({"image": png_bytes(img), "caption": caption, "width": img.width,
                             "height": img.height, "key": key, "attributes": attrs})
        else:
            for key, img, caption, attrs in iter_samples(n, size=size, seed=seed, world=world):
                (tmp / f"{key}.png").write_bytes(png_bytes(img))
                (tmp / f"{key}.txt").write_text(caption)
                (tmp / f"{key}.json").write_text(json.dumps(attrs, sort_keys=True) + "\n")
    return out
