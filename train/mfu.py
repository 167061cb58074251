"""Model FLOPs utilisation (MFU) of the FLUX training step, one convention for the trainer's TensorBoard scalar and
for bench/train_step.py (docs/performance.md explains it with a worked example).

    T             = image tokens + text tokens the transformer actually processes (text after the batch's trim)
    FLOPs/sample  = c·P_tok·T + 12·L·T²·h
    P_tok         = per-token matmul parameters of the transformer blocks: 6.455e9 for FLUX.1
    c             = 6 for a full fine-tune (forward 2 + backward 4), 4 with an adapter (frozen weights need no weight
                    gradient, so the backward costs 2, like the forward)
    12·L·T²·h     = attention: QKᵀ and A·V are 2·T²·h FLOPs each in the forward, twice that in the backward, L blocks
    MFU           = achieved FLOP/s / the device's dense bf16 peak (989 TFLOP/s for an H100 SXM)

P_tok is not the parameter count (11.9B). A double-stream block holds separate image and text weights (12h² each) but
every token meets only its own stream's 12h²; a single-stream block applies 12h² (QKV 3h², MLP-in 4h², out 5h²) to
every token; so P_tok = 57 · 12 · 3072² = 684 h². The AdaLN modulation linears run once per *sample* on the time
embedding, and the embedders and final projection are ~0.2 %: neither is counted. Recomputation by activation
checkpointing is not counted either: MFU measures useful model FLOPs, not what the hardware executed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FLUX1_P_TOK = 6.455e9
"""Per-token matmul parameters of FLUX.1 (684·3072² = 6.455e9); tests/unit/test_mfu.py recounts it from
diffusers."""

PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s without sparsity); first match wins.
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
]


@dataclass(frozen=True, kw_only=True)
class FlopsModel:
    """The three numbers the MFU formula needs from an architecture."""

    p_tok: float
    """Per-token matmul parameters of the blocks (see the module docstring)."""
    layers: int
    """Transformer blocks, double + single (57 for FLUX.1)."""
    hidden: int
    """Attention width h = heads × head_dim (3072 for FLUX.1)."""

    def per_sample(self, tokens: int, *, full: bool) -> float:
        """Training FLOPs of one sample of `tokens` (image + processed text) tokens: forward + backward."""
        c = 6 if full else 4
        return c * self.p_tok * tokens + 12 * self.layers * tokens * tokens * self.hidden

    def per_step(self, *, image_tokens: int, text_tokens: int, batch: int, full: bool) -> float:
        """FLOPs of one micro-batch whose samples all run `image_tokens + text_tokens` tokens (a trimmed batch)."""
        return batch * self.per_sample(image_tokens + text_tokens, full=full)


FLUX1 = FlopsModel(p_tok=FLUX1_P_TOK, layers=57, hidden=3072)


def _is_modulation(name: str) -> bool:
    # AdaLayerNormZero(Single).linear: `norm1.linear`, `norm1_context.linear`, `norm.linear` — once per sample.
    parts = name.split(".")
    return len(parts) >= 2 and parts[0].startswith("norm") and parts[1] == "linear"


def _block_linear_params(block: nn.Module) -> int:
    """Matmul weights of one block's token path: every nn.Linear except the AdaLN modulation and adapter layers.

    peft keeps the frozen weight as `<name>.base_layer` (counted); its own `lora_A`/`lora_B` Linears are the adapter
    (negligible and not part of the convention, skipped). FSDP2 DTensors report their global numel.
    """
    total = 0
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear) or _is_modulation(name):
            continue
        if any(part.startswith(("lora_", "lokr_")) for part in name.split(".")):
            continue
        total += module.weight.numel()
    return total


def per_token_matmul_params(transformer: nn.Module) -> int:
    """P_tok counted from a diffusers FluxTransformer2DModel (plain, peft-adapted or FSDP-sharded; meta is fine).

    Double blocks hold both streams' weights and a token meets one of them, so their count is halved.
    """
    double = sum(_block_linear_params(b) for b in transformer.transformer_blocks)
    single = sum(_block_linear_params(b) for b in transformer.single_transformer_blocks)
    assert double % 2 == 0, "double-stream blocks should hold two equal streams"
    return double // 2 + single


def flops_model(transformer: nn.Module) -> FlopsModel:
    """The FlopsModel of any FLUX-architecture transformer (tiny test models included)."""
    cfg = transformer.config
    return FlopsModel(
        p_tok=float(per_token_matmul_params(transformer)),
        layers=len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks),
        hidden=cfg.num_attention_heads * cfg.attention_head_dim,
    )


def peak_flops(device: torch.device | str, *, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device`, or None where unknown (CPUs, unlisted GPUs): then no MFU is reported."""
    if override_tflops is not None:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Fraction of peak (0..1) for `flops` done in `seconds`; None without a known peak."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
