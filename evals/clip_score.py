"""CLIP score: 100 × the mean cosine between CLIP image and caption embeddings, clamped at 0 (as torchmetrics does:
the clamp applies to the mean, not to each pair).

The CLIP model is a local Hugging Face directory (`CLIPModel` weights in safetensors, tokenizer, image processor),
e.g. `openai/clip-vit-large-patch14` downloaded once; see docs/evals.md. Captions longer than the text tower's context
(77 tokens for OpenAI's CLIP) are truncated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.images import to_rgb


def clip_score_from_cosines(cosines: np.ndarray | list[float]) -> float:
    """max(100 · mean(cos), 0) over image-caption pairs."""
    cosines = np.asarray(cosines, dtype=np.float64)
    if cosines.size == 0:
        raise ValueError("clip score of zero images")
    return max(100.0 * float(cosines.mean()), 0.0)


class CLIPScorer:
    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", key: str = "clip.model"):
        # deferred: transformers takes seconds to import; the eval suite imports this module for every suite
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{key}: model dir not found: {path}")
        if not (path / "config.json").is_file():
            raise ValueError(f"{key}: {path} has no config.json (expected a Hugging Face CLIPModel dir)")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{key}: {path} has no .safetensors weights (pickled .bin weights are refused)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        # The slow (PIL) image processor: the reference preprocessing, and what torchmetrics got for years.
        self.processor = CLIPProcessor.from_pretrained(str(path), use_fast=False)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, images: list) -> torch.Tensor:
        """PIL images -> (N, D) unit vectors."""
        pixels = self.processor.image_processor(images=[to_rgb(im) for im in images], return_tensors="pt")
        feats = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return torch.nn.functional.normalize(_projected(feats).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (N, D) unit vectors."""
        tok = self.processor.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        feats = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return torch.nn.functional.normalize(_projected(feats).float(), dim=-1)

    def cosines(self, images: list, captions: list[str], *, batch_size: int = 64) -> np.ndarray:
        """Per-pair cosine similarity between image i and caption i: (N,) float64."""
        if len(images) != len(captions):
            raise ValueError(f"clip score: {len(images)} images but {len(captions)} captions")
        out = []
        for start in range(0, len(images), batch_size):
            img = self.image_embeds(images[start : start + batch_size])
            txt = self.text_embeds(captions[start : start + batch_size])
            out.append((img * txt).sum(-1).double().cpu())  # (B,)
        return torch.cat(out).numpy() if out else np.zeros(0)

    def score(self, images: list, captions: list[str], *, batch_size: int = 64) -> float:
        return clip_score_from_cosines(self.cosines(images, captions, batch_size=batch_size))


def _projected(feats) -> torch.Tensor:
    """get_*_features' projected embeddings: a tensor in transformers 4, the output's pooler_output (replaced by the
    projection) in transformers 5, the GPU machine's."""
    return feats if isinstance(feats, torch.Tensor) else feats.pooler_output
