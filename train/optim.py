"""AdamW, warmup + cosine/constant learning-rate schedule, and an EMA of the trainable parameters."""

from __future__ import annotations

import math

import torch

from train.config import EMAConfig, OptimConfig


def adamw_implementation(params: list[torch.nn.Parameter], implementation: str) -> str:
    """`optim.implementation` resolved: auto is fused when every parameter is on a CUDA device (LoRA on all 57
    blocks has ~1,600 parameter tensors, and the per-parameter path launches a dozen tiny kernels for each), and the
    single-tensor path otherwise (CPU, and FSDP2 CPU offload: the path our CPU resume tests hold bitwise)."""
    if implementation != "auto":
        return implementation
    on_gpu = all(p.device.type == "cuda" for p in params)  # a DTensor's .device is its local shard's
    return "fused" if on_gpu else "single_tensor"


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("model.adapter: no trainable parameters (check model.adapter.kind / target_modules)")
    impl = adamw_implementation(params, cfg.implementation)
    kernel = {"single_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel
    )


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))


class EMA:
    """Exponential moving average of the trainable parameters, sharded exactly like them (DTensors under FSDP2)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], cfg: EMAConfig):
        self.cfg = cfg
        self.params = dict(named_params)
        self.shadow = {n: p.detach().clone().float() for n, p in named_params}

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.cfg.every:
            return
        d = self.cfg.decay
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)
