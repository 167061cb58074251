"""FSDP2 backend: `fully_shard` per block then root (train/parallelize.py), optionally HSDP on a 2-D mesh.

Parameters, gradients and optimizer state are DTensors; DCP writes each rank's shards directly (no gather).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from train.adapters import count_parameters, trainable_named_parameters
from train.config import ParallelConfig
from train.optim import step_if
from train.parallel.backend import StepConfig, StepResult
from train.parallelize import DistInfo, parallelize_transformer


class FSDP2Backend:
    name = "fsdp2"

    def __init__(
        self,
        transformer: torch.nn.Module,
        cfg: ParallelConfig,
        *,
        info: DistInfo,
        compute_dtype: torch.dtype,
        step: StepConfig,
        make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        materialize: Callable[[torch.nn.Module, torch.device], None] | None = None,
        replicated: frozenset[str] = frozenset(),
    ):
        self.model = self.module = parallelize_transformer(
            transformer, cfg, info=info, compute_dtype=compute_dtype,
            activation_checkpointing=step.activation_checkpointing, replicated=replicated,
        )
        if materialize is not None:  # built on meta: each rank allocates and reads only its own shards
            # CPU offload keeps the sharded parameters in host memory; FSDP2 moves them per use.
            materialize(self.model, torch.device("cpu") if cfg.cpu_offload else info.device)
        self.hsdp = cfg.hsdp and info.world_size > info.local_world_size  # the 2-D mesh parallelize_transformer builds
        if self.hsdp:
            self.name = f"fsdp2-hsdp({info.world_size // info.local_world_size}x{info.local_world_size})"
        self.named = trainable_named_parameters(self.model)
        self.optimizer = make_optimizer([p for _, p in self.named])
        self.max_norm = step.grad_clip if step.grad_clip > 0 else math.inf

    def prepare_micro_batch(self, index: int, count: int) -> None:
        """HSDP: every micro-batch's backward reduce-scatters inside the node; only the last one all-reduces across
        nodes, so the slow inter-node link carries the gradients once per optimizer step, whatever `grad_accum` is.

        `set_requires_all_reduce(False)`, not `set_requires_gradient_sync(False)`: the first keeps the reduce-scatter
        (FSDP2 adds each micro-batch's reduced shard into a partial sum in the reduce dtype, shard-sized, and adds that
        to the last micro-batch's shard before the one all-reduce); the second skips the reduce-scatter too and keeps
        every block's unsharded gradient until the last micro-batch, the whole model's gradient on each rank (48 GB in
        fp32 for a 12B full fine-tune). `set_is_last_backward` stays at its default (True): FSDP2 then waits on each
        backward's reductions, which the partial sum needs anyway. On a 1-D mesh there is no all-reduce to skip, and
        the reduce-scatter per micro-batch is what keeps the gradients sharded: nothing to do.
        """
        if self.hsdp:
            self.model.set_requires_all_reduce(index == count - 1)  # the last restores FSDP2's default for any caller

    def step(self, *, loss_finite: torch.Tensor | bool) -> StepResult:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # The global grad norm is identical on every rank, so every rank skips together (no extra collective).
        applied = torch.isfinite(grad_norm)  # 0-dim bool, on the device
        if isinstance(loss_finite, torch.Tensor):
            applied = applied & loss_finite
        elif not loss_finite:
            applied = torch.zeros_like(applied)
        step_if(self.optimizer, applied)  # fused AdamW: skipped on the device, no sync
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=grad_norm.detach(), applied=applied)

    def checkpoint_state(self) -> dict:
        # Frozen base weights are not saved: they come from model.path again (a 12B copy per checkpoint is waste).
        opts = StateDictOptions(ignore_frozen_params=True)
        return {
            "model": get_model_state_dict(self.model, options=opts),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=opts),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=opts)

    def ema_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.named  # DTensors: the EMA shadow is sharded exactly like the parameters

    def ema_to_checkpoint(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(shadow)

    def ema_from_checkpoint(self, full: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor]) -> None:
        for n, t in full.items():
            shadow[n].copy_(t)

    def count_parameters(self) -> tuple[int, int]:
        return count_parameters(self.model)

    def close(self) -> None:
        pass
