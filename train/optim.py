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


def step_if(optimizer: torch.optim.Optimizer, applied: torch.Tensor) -> None:
    """`optimizer.step()` where the 0-dim bool `applied` is True; where False, parameters and optimizer state (moments
    and step count) stay bitwise as they were.

    Fused AdamW decides on the device: `found_inf` is the flag torch.amp.GradScaler hands it, and its kernel then
    returns before touching anything (and takes its step count back), so a skipped step costs no host sync. The
    foreach and single-tensor kernels have no such flag: the host reads `applied` (a sync on a GPU, free on CPU).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~applied).to(torch.float32)
        optimizer.step()
    elif bool(applied):
        optimizer.step()


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (elementwise maths on it is the same maths), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of the trainable parameters, sharded exactly like them (DTensors under FSDP2)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], cfg: EMAConfig):
        self.cfg = cfg
        self.params = dict(named_params)
        self.shadow = {n: p.detach().clone().float() for n, p in named_params}

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | None = None) -> None:
        """shadow ← shadow + (1 − decay)·(p − shadow) every `ema.every` steps; a no-op where the 0-dim bool `applied`
        (the optimizer step's, on the device) is False, decided on the device: the weight becomes 0."""
        if step % self.cfg.every:
            return
        w = 1 - self.cfg.decay
        if applied is not None:
            w = applied.to(torch.float32) * w  # a 0-dim weight: lerp_ gives bitwise what the float weight gives
        for n, p in self.params.items():
            _local(self.shadow[n]).lerp_(_local(p.detach()).float(), w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)
