"""Training input: MosaicML Streaming MDS shards (local directory or object store) -> (pixels, caption) batches.

Each rank streams its own partition; the loader's state goes into every checkpoint so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from train.config import DataConfig


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to `size` (bicubic), then crop the centre square: one documented way, done once."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1], the VAE's input range."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_image(data: bytes, size: int) -> torch.Tensor:
    return image_to_tensor(resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), size))


def _check_source(cfg: DataConfig) -> None:
    if not cfg.local:
        raise ValueError("data.local: must be set (the shard directory, or a local cache when data.remote is set)")
    if cfg.remote is None and not (Path(cfg.local) / "index.json").is_file():
        raise ValueError(f"data.local: '{cfg.local}' has no index.json (expected MDS shards; see dedistill data convert)")


def build_dataset(cfg: DataConfig, *, batch_size: int):
    """A StreamingDataset that yields {"pixels": (3, R, R), "caption": str}."""
    from streaming import StreamingDataset

    _check_source(cfg)

    class _ImageCaptionDataset(StreamingDataset):
        def __getitem__(self, idx: int) -> dict[str, Any]:
            sample = super().__getitem__(idx)
            try:
                pixels = decode_image(sample[cfg.image_key], cfg.resolution)
            except KeyError:
                raise ValueError(f"data.image_key: shards have no column '{cfg.image_key}'") from None
            caption = sample.get(cfg.caption_key)
            if caption is None:
                raise ValueError(f"data.caption_key: shards have no column '{cfg.caption_key}'")
            return {"pixels": pixels, "caption": caption}

    return _ImageCaptionDataset(
        remote=cfg.remote,
        local=cfg.local,
        batch_size=batch_size,
        shuffle=cfg.shuffle,
        shuffle_algo=cfg.shuffle_algo,
        shuffle_seed=cfg.shuffle_seed,
        shuffle_block_size=cfg.shuffle_block_size,
        predownload=cfg.predownload,
    )


def build_loader(cfg: DataConfig, *, batch_size: int):
    """StreamingDataLoader: a torch DataLoader whose state_dict() records the position in the stream."""
    from streaming import StreamingDataLoader

    dataset = build_dataset(cfg, batch_size=batch_size)
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
    )


def forever(loader) -> Iterator[dict[str, Any]]:
    """Iterate epoch after epoch; the streaming loader itself advances its epoch counter."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("data.local: the dataset yields no full batch for this world size and batch size")
