"""The one way an encoded image becomes RGB pixels: `data convert` (the size it records), the raw training loader,
`data precompute`, FID's image reading and `data inspect` (through the sizes convert recorded) all use it, so a
photo looks the same to every stage.

- **EXIF orientation** is applied first, whatever the format (JPEG, PNG's eXIf chunk, WebP), so width and height
  are the displayed ones.
- **16-bit** images (PNG `I;16`, `I`) keep their top 8 bits. PIL's own `convert("RGB")` clips them at 255, which
  turns almost every 16-bit photo white.
- **Transparency** (RGBA, LA, PA, and palette or L/RGB images with a transparent colour) is composited over a white
  background: the transparent pixels of a cut-out hold arbitrary colours (often black) that are not the picture.
- Everything else (L, 1, P, CMYK incl. Adobe's inverted CMYK JPEGs, YCbCr, LAB, ...) goes through PIL's
  `convert("RGB")`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""
BACKGROUND = (255, 255, 255)
"""What transparent pixels become."""


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); a broken EXIF block counts as 1 (the pixels are still usable)."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, without decoding the pixels."""
    w, h = img.size
    return (h, w) if orientation(img) in TRANSPOSED else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """A PIL image of any mode as 8-bit RGB (see the module docstring for the rules). No EXIF handling here."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PIL opens 16-bit grayscale PNGs as I;16 or I): keep the top 8 bits
        arr = np.asarray(img).astype(np.int64)
        img = Image.fromarray((arr.clip(0, 65535) >> 8).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")  # a transparent palette index / colour becomes alpha 0
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: bytes | bytearray | str | Path) -> Image.Image:
    """Open encoded bytes or a file and apply its EXIF orientation (any format); pixels decoded."""
    img = Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source)
    img.load()
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    return img


def open_rgb(source: bytes | bytearray | str | Path) -> Image.Image:
    """Encoded bytes or an image file -> upright 8-bit RGB: the function every stage decodes images with."""
    return to_rgb(open_image(source))
