"""The FID Inception-v3 network (architecture only), as in pytorch-fid / TTUR's TensorFlow graph.

It differs from torchvision's Inception-v3 in four blocks: the average pools of Mixed_5b-d, Mixed_6b-e and Mixed_7b
exclude the zero padding (TensorFlow's behaviour), and Mixed_7c pools with a max instead of an average. FID numbers
are only comparable across papers with exactly this network and its 2015-12-05 weights.

Module names follow torchvision's `Inception3(num_classes=1008, aux_logits=False)`, so the state-dict keys equal
those of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`; docs/evals.md has the one-line conversion of that
file to safetensors. Weights load only from safetensors (no pickles from user files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from train.images import to_rgb

# pytorch-fid's `--dims`: which block's output (globally average-pooled) is the feature vector.
BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}


class FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # TensorFlow's average pool does not count the zero padding.
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [branch1x1, branch5x5, branch3x3dbl, branch_pool]


class FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [branch1x1, b7, b7d, branch_pool]


class _FIDInceptionE(InceptionE):
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch1x1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        return [branch1x1, b3, b3d, self.branch_pool(self._pool(x))]


class FIDInceptionE_1(_FIDInceptionE):
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionE_2(_FIDInceptionE):
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        # The FID graph max-pools here (most likely a bug in that graph, kept for comparability).
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionV3(nn.Module):
    """Input: (B, 3, H, W) in [0, 1]; output of `features`: (B, dims) pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        # Unused by FID; present so the key set equals the published weights file (1008 TF ImageNet classes).
        self.fc = nn.Linear(2048, 1008)

    def blocks(self) -> list[list[nn.Module]]:
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool],  # -> (B, 64, 73, 73)
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool],  # -> (B, 192, 35, 35)
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],  # -> (B, 768, 17, 17)
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],  # -> (B, 2048, 8, 8)
        ]

    @torch.no_grad()
    def features(self, x: torch.Tensor, dims: int = 2048) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] -> (B, dims), resized and normalised exactly as pytorch-fid does."""
        if dims not in BLOCK_INDEX_BY_DIM:
            raise ValueError(f"fid.dims: {dims} is not one of {', '.join(map(str, BLOCK_INDEX_BY_DIM))}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (0, 1) -> (-1, 1), the range the TF graph expects
        for block in self.blocks()[: BLOCK_INDEX_BY_DIM[dims] + 1]:
            for layer in block:
                x = layer(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # (B, dims)


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_inception(path: str | Path, *, device: torch.device | str = "cpu", key: str = "fid.inception_weights"):
    """FIDInceptionV3 with the weights of a safetensors file in pytorch-fid's key naming; eval mode, fp32."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{key}: file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{key}: expected a .safetensors file (convert the .pth once, see docs/evals.md): {path}")
    state = {k: v for k, v in load_file(str(path)).items() if not _is_bn_counter(k)}
    with torch.device("meta"):
        model = FIDInceptionV3()
    expected = {k for k in model.state_dict() if not _is_bn_counter(k)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{key}: {path} does not hold FID Inception weights in pytorch-fid's naming "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    for m in model.modules():  # BatchNorm's step counter is not in the published file; eval mode ignores it
        if isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked.is_meta:
            m.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    return model.to(device).eval().requires_grad_(False)


def pil_to_unit(img) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1] (torchvision's ToTensor, as pytorch-fid feeds the network)."""
    arr = np.asarray(to_rgb(img), dtype=np.float32) / 255.0  # any mode, as every stage reads images
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: list, *, dims: int = 2048, batch_size: int = 32) -> np.ndarray:
    """PIL images (any sizes) -> (N, dims) float64 features."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        sizes = {im.size for im in chunk}
        if len(sizes) == 1:
            x = torch.stack([pil_to_unit(im) for im in chunk]).to(device)
            out.append(model.features(x, dims).double().cpu())
        else:  # mixed sizes: the resize to 299 is per image anyway, so per-image batches give the same numbers
            out += [model.features(pil_to_unit(im)[None].to(device), dims).double().cpu() for im in chunk]
    if not out:
        return np.zeros((0, dims))
    return torch.cat(out).numpy()
