"""Fréchet Inception Distance, computed as pytorch-fid computes it.

Images -> FID Inception pool features (evals/inception.py) -> mean and covariance -> Fréchet distance with
scipy.linalg.sqrtm. Reference statistics come from an image folder, an MDS dataset (an image-bytes column) or a
pytorch-fid `.npz` (keys `mu`, `sigma`), and are cached as `.npz` keyed by the source path, the weights file's hash,
the image count and the preprocessing, so a suite computes them once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from train.data import resize_center_crop
from train.images import open_rgb, to_rgb
from train.outputs import atomic_write

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2·sqrt(S1·S2)), with pytorch-fid's handling of a singular product."""
    from scipy import linalg  # deferred: a few tenths of a second, and `dedistill --help` imports this module

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"fid: statistics of different feature sizes ({mu1.shape} vs {mu2.shape}); same fid.dims?")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # fewer images than dims make the product singular: expected, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error gives a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @staticmethod
    def of(features: np.ndarray) -> "Stats":
        if len(features) < 2:
            raise ValueError(f"fid: needs at least 2 images for a covariance, got {len(features)}")
        return Stats(features.mean(0), np.cov(features, rowvar=False), len(features))

    def save(self, path: Path, **meta) -> None:
        """pytorch-fid's npz layout (mu, sigma) plus n and a JSON description of what was measured."""
        atomic_write(path, lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, meta=json.dumps(meta)),
                     suffix=".npz")  # a concurrent reader sees the old file or the whole new one

    @staticmethod
    def load(path: Path) -> "Stats":
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"fid: {path} has no 'mu'/'sigma' arrays (expected pytorch-fid statistics)")
            return Stats(f["mu"], f["sigma"], int(f["n"]) if "n" in f else -1)


def fid_from_stats(a: Stats, b: Stats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------------------------------- image sources


def source_kind(path: str | Path, *, key: str = "fid.reference") -> str:
    """'npz' | 'mds' | 'folder' (a ValueError naming `key` for anything else)."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"{key}: file not found: {path}")
        return "npz"
    if not path.is_dir():
        raise ValueError(f"{key}: not found: {path} (expected an image folder, an MDS dir or a .npz)")
    if (path / "index.json").is_file():
        return "mds"
    return "folder"


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted (pytorch-fid's selection; extensions case-insensitive)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_mds(path: str | Path):
    """Random access to a local MDS dataset (no distributed sampling, no download)."""
    from streaming import LocalDataset  # deferred: streaming takes seconds to import; MDS inputs alone need it

    return LocalDataset(local=str(path))


def mds_image(sample: dict, image_key: str, *, key: str) -> Image.Image:
    if image_key not in sample:
        raise ValueError(f"{key}: MDS samples have no column '{image_key}' (columns: {', '.join(sample)})")
    value = sample[image_key]
    if isinstance(value, Image.Image):
        return to_rgb(value)
    return open_rgb(value)


def count_images(path: Path, *, key: str = "fid.reference") -> int:
    kind = source_kind(path, key=key)
    if kind == "mds":
        return len(open_mds(path))
    if kind == "folder":
        return len(list_images(path))
    raise ValueError(f"{key}: {path} holds statistics, not images")


def iter_images(
    path: Path, *, limit: int = 0, image_key: str = "image", key: str = "fid.reference",
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[Image.Image]:
    """The first `limit` images (0 = all) of a folder (sorted by name) or an MDS dataset (in index order), as RGB.

    An image that does not decode (corrupt, truncated, a decompression bomb) is skipped and appended to `skipped`
    as (name, reason), as `data convert` counts its bad samples; `say_skipped` prints them in one line."""
    skipped = [] if skipped is None else skipped
    kind = source_kind(path, key=key)
    n = count_images(path, key=key)
    n = min(n, limit) if limit > 0 else n
    if kind == "folder":
        items = ((p.name, lambda p=p: open_rgb(p)) for p in list_images(path)[:n])  # EXIF-upright, as everywhere
    else:
        ds = open_mds(path)
        items = ((f"#{i}", lambda i=i: mds_image(ds[i], image_key, key=key)) for i in range(n))
    for name, load in items:
        try:
            img = load()
        except Exception as e:  # Pillow raises OSError, SyntaxError, DecompressionBombError, ... on bad bytes
            if isinstance(e, ValueError) and str(e).startswith(f"{key}: "):  # about the source (a missing column)
                raise
            skipped.append((name, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        yield img


def say_skipped(skipped: list[tuple[str, str]], source: str | Path) -> None:
    """One line on stderr naming how many images of `source` were skipped, and the first one."""
    if skipped:
        name, reason = skipped[0]
        print(f"[dedistill] fid: skipped {len(skipped)} unreadable image(s) of {source} (first: {name}: {reason})",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- features

_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def stats_of_images(
    model, images, *, dims: int, batch_size: int = 32, resize_to: int = 0, progress: str = "", total: int | None = None
) -> Stats:
    """Stream PIL images (any iterable) through Inception in batches; `resize_to` > 0 first centre-crops and resizes
    each image to that square size (the trainer's preprocessing)."""
    # deferred: evals.inception imports torchvision (~1.3 s per process); only a run that computes FID pays it
    from evals.inception import inception_features

    feats, batch = [], []
    bar = None
    if progress:
        bar = tqdm(desc=progress, total=total, unit="img", dynamic_ncols=True)
    for im in images:
        if resize_to:
            im = resize_center_crop(im, resize_to)
        batch.append(im)
        if len(batch) == batch_size:
            feats.append(inception_features(model, batch, dims=dims, batch_size=batch_size))
            if bar is not None:
                bar.update(len(batch))
            batch = []
    if batch:
        feats.append(inception_features(model, batch, dims=dims, batch_size=batch_size))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return Stats.of(np.concatenate(feats) if feats else np.zeros((0, dims)))


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "dedistill" / "fid_stats"


def reference_stats(
    source: str | Path,
    *,
    model,
    weights: str | Path,
    dims: int = 2048,
    count: int = 0,
    resize_to: int = 0,
    image_key: str = "image",
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    key: str = "fid.reference",
) -> Stats:
    """Statistics of a reference source, computed once and cached (a `.npz` source is used as is)."""
    source = Path(source).resolve()
    kind = source_kind(source, key=key)
    if kind == "npz":
        return Stats.load(source)
    available = count_images(source, key=key)
    n = min(available, count) if count > 0 else available
    if n < 2:
        raise ValueError(f"{key}: {source} has {available} images; FID needs at least 2")
    ident = {
        "source": str(source), "weights_sha256": file_sha256(Path(weights)), "count": n, "dims": dims,
        "resize_to": resize_to, "image_key": image_key if kind == "mds" else None,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{source.name}-{n}-d{dims}-{digest}.npz"
    if path.is_file():
        return Stats.load(path)
    skipped: list[tuple[str, str]] = []
    images = iter_images(source, limit=n, image_key=image_key, key=key, skipped=skipped)
    stats = stats_of_images(model, images, dims=dims, batch_size=batch_size, resize_to=resize_to,
                            progress=f"fid reference ({source.name})", total=n)
    say_skipped(skipped, source)
    cache.mkdir(parents=True, exist_ok=True)
    stats.save(path, **ident)
    return stats


# --------------------------------------------------------------------------------------------------------------- CLI


def register(sub) -> None:
    s = sub.add_parser(
        "fid", help="FID between two image folders, MDS dirs or .npz statistics (pytorch-fid's numbers)",
        description="Prints 'FID:  <value>' like pytorch-fid. Both inputs use the same network and preprocessing.",
    )
    s.add_argument("path", nargs=2, help="image folder, MDS dataset dir, or .npz statistics (mu, sigma)")
    s.add_argument("--weights", required=True, help="FID Inception weights (.safetensors, pytorch-fid key names)")
    s.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048])
    s.add_argument("--batch-size", type=int, default=50)
    s.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda when available)")
    s.add_argument("--image-key", default="image", help="image column of MDS inputs")
    s.add_argument("--save-stats", action="store_true",
                   help="write the statistics of the first path to the second (a .npz), as pytorch-fid does")
    s.set_defaults(func=cmd_fid)


def cmd_fid(a) -> None:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from evals.inception import load_inception  # deferred: torchvision's import, see stats_of_images

    model = load_inception(a.weights, device=device, key="--weights")

    def stats_of(p: str, which: str) -> Stats:
        kind = source_kind(p, key=which)
        if kind == "npz":
            return Stats.load(Path(p))
        skipped: list[tuple[str, str]] = []
        stats = stats_of_images(model, iter_images(Path(p), image_key=a.image_key, key=which, skipped=skipped),
                                dims=a.dims, batch_size=a.batch_size)
        say_skipped(skipped, p)
        return stats

    first = stats_of(a.path[0], "IMAGES_A")
    if a.save_stats:
        out = Path(a.path[1])
        if out.suffix != ".npz":
            raise ValueError(f"--save-stats: the second path must end in .npz, got {out}")
        first.save(out, source=str(Path(a.path[0]).resolve()), dims=a.dims)
        print(out)
        return
    print("FID: ", fid_from_stats(first, stats_of(a.path[1], "IMAGES_B")))
