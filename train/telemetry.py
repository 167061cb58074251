"""What the trainer measures without stalling the device: each step's loss, grad norm and applied flag stay on the
device until a read step, when one device-to-host copy reads them all; throughput and MFU are measured over the same
window (the steps since the last read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from train.config import TrainConfig
from train.mfu import FlopsModel
from train.parallel import StepResult


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the host sees it after a read. `step` counts from 1 (the step number after it ran)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    applied: bool
    """False when the optimizer step was skipped (non-finite loss or gradient)."""


@dataclass(frozen=True)
class _OnDevice:
    step: int
    loss: torch.Tensor
    lr: float
    grad_norm: torch.Tensor
    applied: torch.Tensor


class Telemetry:
    def __init__(self, cfg: TrainConfig, *, checkpoint_every: int, flops: FlopsModel, peak: float | None,
                 global_batch: int, full: bool):
        self.cfg = cfg
        self.checkpoint_every = checkpoint_every
        self.flops_model, self.peak, self.global_batch, self.full = flops, peak, global_batch, full
        self.unread: list[_OnDevice] = []
        self.restart()

    def restart(self) -> None:
        """A new throughput window from now (after a read, a checkpoint or a rewind)."""
        self.t0 = time.perf_counter()
        self.steps = 0
        self.flops = 0.0

    def is_read_step(self, step: int) -> bool:
        """The steps at which the host reads the device; a function of the step only, so every rank agrees."""
        t = self.cfg
        return (step % t.sync_every == 0 or step % t.log_every == 0 or step % self.checkpoint_every == 0
                or step == t.max_steps)

    def micro_batch(self, image_tokens: int, text_tokens: int) -> None:
        """The model FLOPs of one micro-batch of `cfg.batch_size` samples (train/mfu.py)."""
        self.flops += self.flops_model.per_step(image_tokens=image_tokens, text_tokens=text_tokens,
                                                batch=self.cfg.batch_size, full=self.full)

    def step(self, step: int, loss: torch.Tensor, lr: float, result: StepResult) -> None:
        """Keep a step's device values for the next read; no host sync."""
        self.unread.append(_OnDevice(step, loss.detach(), lr, result.grad_norm, result.applied))
        self.steps += 1

    def read(self) -> list[StepRecord]:
        """Every unread step, in step order, at the cost of one device read."""
        if not self.unread:
            return []
        values = torch.stack([
            torch.stack([r.loss.float(), r.grad_norm.to(r.loss.device, torch.float32),
                         r.applied.to(r.loss.device, torch.float32)])
            for r in self.unread
        ]).tolist()  # (n, 3): the window's only host sync
        records = [StepRecord(r.step, loss, r.lr, norm, bool(applied))
                   for r, (loss, norm, applied) in zip(self.unread, values)]
        self.unread = []
        return records

    def throughput(self) -> dict[str, float]:
        """Per-step time, samples/s, TFLOP/s per device and MFU (with a known peak) over the window."""
        dt = (time.perf_counter() - self.t0) / self.steps
        per_step = self.flops / self.steps
        out = {
            "train/step_time_s": dt,
            "train/samples_per_s": self.global_batch / dt,
            "train/tflops_per_device": per_step / dt / 1e12,
        }
        if self.peak:
            out["train/mfu"] = per_step / dt / self.peak
        return out
