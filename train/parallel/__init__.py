"""Training backends behind one small interface (`parallel.backend`): FSDP2 (default) and DeepSpeed ZeRO-2/3.

The loop never touches FSDP or DeepSpeed. It gets a `Backend` and uses only:

    backend.model                   what `forward_backward_step` calls (an FSDP2 module or a DeepSpeed engine);
                                    `loss.backward()` inside the step works for both
    backend.module                  the plain transformer underneath (sampling, counting)
    backend.optimizer               the torch optimizer our LR scheduler drives
    backend.prepare_micro_batch(i, n)  before micro-batch i of n: which gradient collectives its backward runs
    backend.step(loss_finite=...)   clip + optimizer step (skipped on a non-finite grad norm, decided on the device
                                    where the optimizer can: no host sync) + zero grads
    backend.checkpoint_state()      {"model": ..., "optim": ...} in the one DCP layout both backends share
    backend.load_checkpoint_state() the inverse
    backend.ema_tensors()           what an EMA tracks, and ema_to/from_checkpoint to put it in the same layout
    backend.close()

Checkpoint layout (identical for both backends, so `train.inference`, export and evals never ask which one wrote
it): `model.<fqn>` = the fp32 trainable parameters, `optim.state.<fqn>.{step,exp_avg,exp_avg_sq}`,
`optim.param_groups`, `ema.<fqn>` — the names `torch.distributed.checkpoint.state_dict` gives under FSDP2. FSDP2
saves them as DTensors (sharded writes); DeepSpeed gathers each ZeRO-partitioned tensor to its full shape first.
"""

from __future__ import annotations

from typing import Callable

import torch

from train.config import ParallelConfig
from train.parallel.backend import Backend, StepConfig, StepResult
from train.parallel.deepspeed import DeepSpeedBackend  # imports deepspeed itself only when one is built
from train.parallel.fsdp2 import FSDP2Backend
from train.parallelize import DistInfo

__all__ = ["Backend", "StepConfig", "StepResult", "build_backend"]


def build_backend(
    transformer: torch.nn.Module,
    cfg: ParallelConfig,
    *,
    info: DistInfo,
    compute_dtype: torch.dtype,
    step: StepConfig,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    materialize: Callable[[torch.nn.Module, torch.device], None] | None = None,
    replicated: frozenset[str] = frozenset(),
) -> Backend:
    """Wrap a transformer (adapter applied, fp32 trainable parameters) in the configured backend.

    `make_optimizer` receives the parameters to optimise in the backend's own form (DTensors for FSDP2, plain
    parameters for DeepSpeed, which then partitions the optimizer state itself). `materialize(module, device)`,
    FSDP2 only, is for a transformer built on `meta`: it is called once the parameters are sharded (still on meta),
    allocates and fills each rank's shards (train/parallel/load.py), and runs before the optimizer is built.
    `replicated` (FSDP2 only): modules whose parameters stay whole on every rank (the quantized frozen base).
    """
    if cfg.backend == "fsdp2":
        return FSDP2Backend(transformer, cfg, info=info, compute_dtype=compute_dtype, step=step,
                            make_optimizer=make_optimizer, materialize=materialize, replicated=replicated)
    if materialize is not None or replicated:
        raise ValueError(f"parallel.backend: {cfg.backend!r} does not load sharded (only fsdp2 does)")
    if cfg.backend == "deepspeed":
        return DeepSpeedBackend(transformer, cfg, info=info, compute_dtype=compute_dtype, step=step,
                                make_optimizer=make_optimizer)
    raise ValueError(f"parallel.backend: {cfg.backend!r} is not one of fsdp2, deepspeed")
