"""Every parallelism decision lives here: process group, device, activation checkpointing and FSDP2 sharding.

One code path from 1 CPU process to N GPUs: a lone process still gets a (world size 1) process group and is still
wrapped with `fully_shard`, so the checkpoints, the state dicts and the optimizer see the same DTensors everywhere.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from train.config import ParallelConfig
from train.family import family_of_model


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_timeout_s = 1800.0  # the process group's, for messages (set by init_distributed)


def _launcher_ranks() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun sets them; a world of one without them."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)))


def process_dist() -> DistInfo:
    """This process's place in the job without joining a group (for code that may run before or outside
    `init_distributed`, e.g. a data loader built in a test). The device is the CPU: only the ranks are meant."""
    return DistInfo(*_launcher_ranks(), torch.device("cpu"))


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """Join the torchrun process group (or make a world of one when started directly)."""
    if "RANK" not in os.environ:  # started as a plain process: a world of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world, local_rank, local_world = _launcher_ranks()

    use_cuda = torch.cuda.is_available() and cfg.dist_backend != "gloo"
    if cfg.dist_backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.dist_backend: nccl needs CUDA; use gloo (or auto) on CPU")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    global _timeout_s
    _timeout_s = cfg.timeout_s
    if not dist.is_initialized():
        # The timeout bounds every collective: gloo fails the waiting call; NCCL's watchdog aborts the process
        # (TORCH_NCCL_ASYNC_ERROR_HANDLING, slurm/train.sbatch) with the op in its message.
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=device if use_cuda else None,
        )
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and rank == 0:  # torchrun restarted the group after a worker died (parallel.max_restarts)
        print(f"[dedistill] torchrun restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}: a "
              f"worker was lost; resuming from the newest complete checkpoint", flush=True)
    return DistInfo(rank, world, local_rank, local_world, device)


class CollectiveError(RuntimeError):
    """A collective of ours failed or timed out; the message names it (gloo's names only its socket operation)."""


@contextmanager
def named_collective(op: str):
    """Re-raise a failure inside the block as a CollectiveError naming `op`, how long it waited and the timeout.

    A rank that stalls (or dies) leaves the others waiting in their next collective until `parallel.timeout_s`."""
    t0 = time.monotonic()
    try:
        yield
    except RuntimeError as e:  # DistBackendError and gloo's timeout/connection errors are RuntimeErrors
        if isinstance(e, CollectiveError) or not dist.is_initialized():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"{op} failed on rank {dist.get_rank()} after {time.monotonic() - t0:.1f} s "
            f"(parallel.timeout_s={_timeout_s:g}): another rank stalled or died; {first}"
        ) from e


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(op: str = "barrier") -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        with named_collective(op):
            dist.barrier()


def all_reduce_mean(value: torch.Tensor, op: str = "all_reduce (mean)") -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        with named_collective(op):
            dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def _blocks(model) -> list[torch.nn.Module]:
    """The units FSDP2 shards, AC checkpoints and compile compiles: the family's blocks (train/family.py)."""
    return family_of_model(model).blocks(model)


def _sac_policy():
    """Op-level selective AC: keep what is expensive to recompute (matmuls, attention), recompute the rest."""
    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_mm",
    ):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: torch.nn.Module, policy: str) -> list[int]:
    """Checkpoint transformer blocks in place, per `parallel.ac_policy`; returns the indices checkpointed.

    The block's own `forward` is wrapped (an instance attribute), not the module: parameter names stay exactly the
    diffusers names, so checkpoints, exports and state dicts do not depend on the policy. Blocks are counted over the
    double-stream then the single-stream list (57 for FLUX.1 and Chroma).
    """
    every = int(policy.removeprefix("every_")) if policy.startswith("every_") else 1
    context_fn = functools.partial(create_selective_checkpoint_contexts, _sac_policy()) if policy == "ops" else None
    chosen = []
    for i, block in enumerate(_blocks(model)):
        if i % every:
            continue
        inner = block.forward  # the bound method, captured before it is shadowed

        def forward(*args, _inner=inner, **kwargs):
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = forward
        chosen.append(i)
    return chosen


def apply_compile(model: torch.nn.Module, *, backend: str = "inductor") -> None:
    """`torch.compile` every block in place (`Module.compile`: no `_orig_mod.` prefix in parameter names).

    Blocks of one class share compiled code (dynamo treats parameters as inputs), so FLUX compiles two graphs, not 57.
    """
    for block in _blocks(model):
        block.compile(backend=backend)


def parallelize_transformer(
    model: torch.nn.Module,
    cfg: ParallelConfig,
    *,
    info: DistInfo,
    compute_dtype: torch.dtype,
    activation_checkpointing: bool,
    replicated: frozenset[str] = frozenset(),
) -> torch.nn.Module:
    """torchtitan's order: activation checkpointing, then per-block `torch.compile`, then FSDP2 `fully_shard` on every
    block, then on the root. The parameters of the `replicated` modules (the quantized frozen base, train/quant.py)
    are FSDP2's `ignored_params`: whole on every rank, never gathered or reduced."""
    # deferred: torch.distributed.fsdp costs ~0.5 s at import; train.data imports this module for its ranks alone
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cfg.backend != "fsdp2":
        raise ValueError(f"parallel.backend: '{cfg.backend}' does not shard through parallelize_transformer "
                         f"(FSDP2's); its backend in train/parallel/ sets the model up")
    if activation_checkpointing:
        apply_activation_checkpointing(model, cfg.ac_policy)
    if cfg.compile_blocks:
        apply_compile(model)

    if cfg.hsdp and info.world_size > info.local_world_size:
        mesh = init_device_mesh(
            info.device.type,
            (info.world_size // info.local_world_size, info.local_world_size),
            mesh_dim_names=("replicate", "shard"),
        )
    else:
        mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    mp = MixedPrecisionPolicy(
        param_dtype=compute_dtype,
        reduce_dtype=torch.float32 if cfg.reduce_dtype == "fp32" else torch.bfloat16,
    )
    kwargs = dict(mesh=mesh, mp_policy=mp)
    if replicated:
        kwargs["ignored_params"] = {p for name in replicated for p in model.get_submodule(name).parameters()}
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # diffusers' single-stream blocks return slices of one tensor; FSDP2 warns about views, but neither FLUX nor
    # Chroma updates them in place (checked in diffusers 0.39), so the warning is noise in every log.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in _blocks(model):
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    # Modulation every block reads, outside the blocks (FLUX.2: 566M at [dev] size): a unit of its own, gathered for
    # its one forward at the start of the step and again in the backward, not held all step with the root.
    for name in family_of_model(model).shared_modules:
        fully_shard(model.get_submodule(name), reshard_after_forward=True, **kwargs)
    # The root keeps its small embed/proj layers; no reshard after forward since backward needs them first.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def shard_text_encoder(t5: torch.nn.Module, info: DistInfo, *, blocks: str = "encoder.block") -> torch.nn.Module:
    """FSDP2 over the frozen text model (`model.text_encoder_placement: fsdp`, as torchtitan shards its T5): each
    rank keeps 1/world of it and all-gathers one layer at a time while encoding. `blocks` is the family row's
    `text_blocks`: T5's encoder blocks, or the decoder layers of FLUX.2's Mistral3 / Qwen3 (24B at [dev] size, which
    fits no card beside a training whole). Every rank must encode the same number of batches, which the step does
    (one encode per micro-batch, the cached empty prompt once)."""
    from torch.distributed.fsdp import fully_shard  # deferred: see parallelize_transformer

    mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    for block in t5.get_submodule(blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(t5, mesh=mesh)
    # FSDP2 keeps the root's own parameters (T5's 32k x 4096 embedding) gathered after forward, for the backward
    # that a frozen encoder never runs: reshard them after each encode.
    t5.register_forward_hook(lambda module, args, output: module.reshard())
    return t5
