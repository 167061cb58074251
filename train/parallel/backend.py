"""The interface every training backend implements (train/parallel/__init__.py says how the loop uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class StepResult:
    grad_norm: torch.Tensor
    """0-dim: the global grad norm before clipping (inf/nan when the step was skipped for it)."""
    applied: torch.Tensor
    """0-dim bool: False when the optimizer step was skipped (non-finite loss or gradient); every rank agrees. Both
    stay on the device: the loop reads them in batches, at its logging and check steps (`train.sync_every`)."""


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What a backend needs to know about the step (a narrow view of TrainConfig)."""

    micro_batch_size: int
    grad_accum: int
    grad_clip: float
    activation_checkpointing: bool


class Backend(Protocol):
    name: str
    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def prepare_micro_batch(self, index: int, count: int) -> None: ...

    def step(self, *, loss_finite: torch.Tensor | bool) -> StepResult: ...

    def checkpoint_state(self) -> dict: ...

    def load_checkpoint_state(self, state: dict) -> None: ...

    def ema_tensors(self) -> list[tuple[str, torch.Tensor]]: ...

    def ema_to_checkpoint(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def ema_from_checkpoint(self, full: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor]) -> None: ...

    def count_parameters(self) -> tuple[int, int]: ...

    def close(self) -> None: ...
