"""The divergence guard: K consecutive non-finite steps end in a rewind to a checkpoint, or stop the run.

A non-finite loss or gradient norm always skips its optimizer step on the device (train/optim.py `step_if`), so the
parameters never become NaN; what the guard catches is a run that keeps producing them — weights gone bad in a way
that is still finite, or a stretch of poisoned data. The loop feeds it each step's outcome in step order when it
reads the device (every `train.sync_every` steps, and at logging and checkpoint steps), so detection waits for the
next such read: the K-th non-finite step is acted on at most `sync_every - 1` steps after it happened.

Rewind (`guard.on_divergence: rewind`): reload the newest complete checkpoint saved *before the first step of the
streak* (model, optimizer, scheduler, EMA, step count), delete the checkpoints after it (they belong to the steps
being abandoned) and go on with the data loader where it is. The skipped data window is therefore exactly the
batches drawn after that checkpoint up to the detection step: (detected - checkpoint step) × grad_accum batches per
rank. The loader's position is a function of the batches drawn, so a process that crashes after a rewind and before
its next checkpoint resumes from the same checkpoint, replays the same steps, detects at the same step and rewinds
the same way: the run stays deterministic. Stop (or a rewind with no checkpoint before the streak, or past
`guard.max_rewinds`): `DivergenceError`, one line naming the steps and the checkpoint to resume from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.config import GuardConfig


class DivergenceError(ValueError):
    """The run diverged and the guard stopped it (the CLI prints it as one `dedistill: error:` line)."""


@dataclass(frozen=True)
class Streak:
    first: int
    """The first non-finite step of the streak (steps count from 1: the step number after it ran)."""
    last: int
    """The step at which the streak reached `guard.max_nonfinite_steps`."""

    def describe(self) -> str:
        return f"{self.last - self.first + 1} consecutive non-finite steps ({self.first}-{self.last})"


class DivergenceGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.run = 0
        self.first = 0
        self.rewinds = 0

    def observe(self, step: int, applied: bool) -> Streak | None:
        """One step's outcome, in step order: the streak when it has just reached K non-finite steps, else None."""
        if applied:
            self.run = 0
            return None
        if self.run == 0:
            self.first = step
        self.run += 1
        k = self.cfg.max_nonfinite_steps
        return Streak(self.first, step) if k and self.run == k else None

    def reset(self) -> None:
        self.run = 0

    @staticmethod
    def rewind_target(checkpoints: list[tuple[int, Path]], streak: Streak) -> tuple[int, Path] | None:
        """The newest complete checkpoint saved before the streak's first step (None when there is none)."""
        before = [(s, p) for s, p in checkpoints if s < streak.first]
        return before[-1] if before else None

    def decide(self, streak: Streak, target: tuple[int, Path] | None, *, detected_at: int) -> str:
        """"rewind", or raises DivergenceError with the one-line reason."""
        where = f"the newest checkpoint before them is {target[1]}" if target else "no checkpoint precedes them"
        head = f"guard: {streak.describe()}, detected at step {detected_at}"
        if self.cfg.on_divergence == "stop":
            raise DivergenceError(f"{head}; stopped (guard.on_divergence=stop); {where}")
        if target is None:
            raise DivergenceError(f"{head}; cannot rewind: {where} (lower checkpoint.every_steps)")
        if self.rewinds >= self.cfg.max_rewinds:
            raise DivergenceError(f"{head}; stopped after {self.rewinds} rewinds (guard.max_rewinds); {where}")
        self.rewinds += 1
        return "rewind"
