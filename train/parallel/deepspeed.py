"""DeepSpeed ZeRO-2/3 backend. The DeepSpeed config is generated from ours; users never write one.

- Our torch AdamW is the client optimizer (ZeRO partitions its state; no DeepSpeedCPUAdam to compile), our LR
  scheduler drives its param groups, and our loop owns gradient accumulation
  (`managed_gradient_accumulation: false`: backward only accumulates, each `engine.step()` is a boundary). The
  step calls `loss.backward()` directly, which DeepSpeed supports for ZeRO optimizers.
- Mixed precision: DeepSpeed's bf16 mode when the compute dtype is bf16 (bf16 weights, fp32 master copy inside the
  ZeRO optimizer); fp32 otherwise (CPU, tests).
- Checkpoints use our DCP layout, not DeepSpeed's: each trainable parameter's fp32 master weight and Adam moments are
  gathered to full tensors with DeepSpeed's `safe_get_full_*` API and saved under the same keys FSDP2 uses; loading
  scatters them back with `safe_set_full_*`. The cost is a full (unsharded) copy of the trainable state on every
  rank while saving — small for LoRA/LoKr; for a full fine-tune of the 12B model prefer FSDP2, whose DCP writes
  stay sharded.
- ZeRO-3 partitions every parameter, frozen base weights included, and gathers them per module as it runs. peft's
  LoRA and LoKr layers work unmodified (marking them ZeRO-3 "leaf" modules breaks their backward: tested).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch
import torch.distributed as dist

from train.adapters import trainable_named_parameters
from train.config import ParallelConfig
from train.parallel.backend import StepConfig, StepResult
from train.parallelize import DistInfo, apply_activation_checkpointing


def deepspeed_config(cfg: ParallelConfig, step: StepConfig, *, compute_dtype: torch.dtype, world_size: int) -> dict:
    """The DeepSpeed JSON config, derived from ours (printed at start by rank 0 for the record)."""
    zero: dict = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,  # deterministic reduction order (bitwise resume); NCCL overlap matters little here
        "reduce_scatter": True,
    }
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    bf16 = compute_dtype == torch.bfloat16
    return {
        "train_micro_batch_size_per_gpu": step.micro_batch_size,
        "gradient_accumulation_steps": step.grad_accum,
        "train_batch_size": step.micro_batch_size * step.grad_accum * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": step.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32" if cfg.reduce_dtype == "fp32" else "bf16",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator at import; on a CPU-only machine say so instead of letting it guess.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed  # deferred: optional (the [deepspeed] extra), and it picks its accelerator at import
    except ImportError as e:
        raise ValueError(
            f"parallel.backend: deepspeed is not installed ({e}); pip install 'dedistill[deepspeed]' or use fsdp2"
        ) from None
    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel with g++ on first use (minutes on a
        # small machine) that only its inference all-reduce uses; training collectives go through torch.distributed.
        # (import_module: the attribute `deepspeed.comm.torch` is the torch package, shadowing the submodule)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(
        self,
        transformer: torch.nn.Module,
        cfg: ParallelConfig,
        *,
        info: DistInfo,
        compute_dtype: torch.dtype,
        step: StepConfig,
        make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    ):
        if cfg.hsdp:
            raise ValueError("parallel.hsdp: only with parallel.backend=fsdp2 (DeepSpeed shards over all ranks)")
        deepspeed = _import_deepspeed(info.device)
        if step.activation_checkpointing:
            # the FSDP2 path's block wrapper (names unchanged); config.py admits only ac_policy=full here
            apply_activation_checkpointing(transformer, cfg.ac_policy)
        self.stage = cfg.zero_stage
        self.names = [n for n, _ in trainable_named_parameters(transformer)]
        params = [p for _, p in trainable_named_parameters(transformer)]
        self.optimizer = make_optimizer(params)
        self.ds_config = deepspeed_config(cfg, step, compute_dtype=compute_dtype, world_size=info.world_size)
        transformer.to(info.device)
        engine, zero_optimizer, _, _ = deepspeed.initialize(
            model=transformer, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine = self.model = engine
        self.module = engine.module
        self.zero = zero_optimizer
        self.params = dict(zip(self.names, params))

    # ------------------------------------------------------------------------------------------------------ step

    def prepare_micro_batch(self, index: int, count: int) -> None:
        """Nothing to do: DeepSpeed has one flat data-parallel group (no replicate dimension; hsdp is refused above).
        ZeRO-2/3 reduce each micro-batch's gradients into this rank's partition during its backward (they partition
        gradients, so they cannot hold a full one until the boundary), which is the same traffic as FSDP2's
        reduce-scatter per micro-batch."""

    def step(self, *, loss_finite: torch.Tensor | bool) -> StepResult:
        # DeepSpeed clips (gradient_clipping) and skips the update itself when the global grad norm is not finite
        # (reading its overflow flag on the host: this backend's step syncs, whatever the loop does); a non-finite
        # loss always comes with non-finite gradients, so `loss_finite` needs no separate path.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = bool(self.engine.was_step_applied()) and bool(loss_finite)
        device = next(iter(self.params.values())).device  # where the EMA's lerp_ takes the flag as its weight
        return StepResult(grad_norm=torch.tensor(norm, device=device), applied=torch.tensor(applied, device=device))

    # ------------------------------------------------------------------------------------------- checkpoint state

    def _flat_partitions(self) -> list[torch.Tensor]:
        """ZeRO's flat fp32 partitions of this rank: the tensors our AdamW's state is keyed by."""
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _ensure_optimizer_state(self, keys: dict[str, torch.Tensor] | None = None) -> None:
        """ZeRO creates optimizer state lazily at the first step; a resumed run needs it before loading."""
        inner = self.zero.optimizer  # our AdamW, now holding ZeRO's flat fp32 partitions
        created = False
        for flat in self._flat_partitions():
            state = inner.state[flat]
            if state:
                continue
            created = True
            for key, like in (keys or {"exp_avg": None, "exp_avg_sq": None, "step": None}).items():
                if key == "step":
                    state["step"] = torch.zeros((), dtype=torch.float32)
                else:
                    state[key] = torch.zeros_like(flat)
        if created and self.stage < 3 and hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter's fragment of the flat state after the first step; do it now.
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()

    def _state_keys(self) -> list[str]:
        flat = self._flat_partitions()[0]
        return [k for k, v in self.zero.optimizer.state[flat].items() if torch.is_tensor(v) and v.shape == flat.shape]

    def checkpoint_state(self) -> dict:
        # deepspeed: optional, imported by _import_deepspeed before this backend exists
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        keys = self._state_keys()
        flat0 = self._flat_partitions()[0]
        step = self.zero.optimizer.state[flat0]["step"]
        model, state = {}, {}
        for n, p in self.params.items():
            model[n] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            state[n] = {k: safe_get_full_optimizer_state(p, k).detach().float().cpu().clone() for k in keys}
            state[n]["step"] = step.detach().float().cpu().clone()
        groups = []
        for g in self.zero.optimizer.param_groups:
            group = {k: v for k, v in g.items() if k != "params"}
            group["params"] = list(self.names)
            groups.append(group)
        return {"model": model, "optim": {"state": state, "param_groups": groups}}

    def load_checkpoint_state(self, state: dict) -> None:
        # deepspeed: optional, imported by _import_deepspeed before this backend exists
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved = state["optim"]["state"]
        first = saved[self.names[0]]
        self._ensure_optimizer_state({k: v for k, v in first.items()})
        keys = [k for k in first if k != "step"]
        for n, p in self.params.items():
            safe_set_full_fp32_param(p, state["model"][n].to(p.device))
            for k in keys:
                safe_set_full_optimizer_state(p, saved[n][k].to(p.device), k)
        for flat in self._flat_partitions():
            self.zero.optimizer.state[flat]["step"].copy_(first["step"])
        for g, sg in zip(self.zero.optimizer.param_groups, state["optim"]["param_groups"]):
            g.update({k: v for k, v in sg.items() if k != "params"})
        self._master_to_module()

    @torch.no_grad()
    def _master_to_module(self) -> None:
        """Copy the fp32 master weights into the (possibly bf16, possibly partitioned) module parameters."""
        if self.stage < 3:
            self.zero.update_lp_params()
        else:
            for i in range(len(self.zero.fp16_partitioned_groups_flat)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)

    # ------------------------------------------------------------------------------------------------------- EMA

    def ema_tensors(self) -> list[tuple[str, torch.Tensor]]:
        if self.stage < 3:
            return list(self.params.items())  # full (replicated) module parameters
        return [(n, p.ds_tensor) for n, p in self.params.items()]  # this rank's flat partition of each parameter

    def ema_to_checkpoint(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.stage < 3:
            return dict(shadow)
        out = {}
        world = dist.get_world_size()
        for n, p in self.params.items():
            part = shadow[n].contiguous()
            buf = torch.empty(world * part.numel(), dtype=part.dtype, device=part.device)
            dist.all_gather_into_tensor(buf, part)
            out[n] = buf[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    def ema_from_checkpoint(self, full: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor]) -> None:
        if self.stage < 3:
            for n, t in full.items():
                shadow[n].copy_(t)
            return
        rank = dist.get_rank()
        for n, t in full.items():
            part = shadow[n]
            flat = torch.zeros(part.numel() * dist.get_world_size(), dtype=part.dtype)
            flat[: t.numel()] = t.flatten()
            part.copy_(flat[rank * part.numel() : (rank + 1) * part.numel()])

    # ---------------------------------------------------------------------------------------------------- misc

    def count_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.module.parameters():
            n = getattr(p, "ds_numel", p.numel())
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def close(self) -> None:
        # Without this a ZeRO-3 process aborts at exit ("terminate called without an active exception").
        self.engine.destroy()
