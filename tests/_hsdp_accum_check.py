"""Test helper (run under torchrun with 4 gloo ranks by tests/integration/test_hsdp_accum.py): HSDP on a 2 x 2
mesh (2 "nodes" of 2 ranks) with gradient accumulation, once as torch's default does it (every micro-batch
all-reduces across nodes) and once with `backend.prepare_micro_batch` (only the last does), counting FSDP2's collectives per optimizer step.

Each rank writes $OUT/rank<R>.json: the collective counts per variant (calls and bytes, split by the group they ran
on: "shard" = this rank's node, "replicate" = across nodes) and, per tensor, the largest difference between the two
variants' gradients (step 1) and parameters (after all steps), with the largest magnitude for scale.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dataset_tools.tiny_model import TINY_SIZES
from diffusers import FluxTransformer2DModel
from train.config import ObjectiveConfig, OptimConfig, ParallelConfig
from train.trainer import step_generator
from train.optim import build_optimizer
from train.parallel import StepConfig, build_backend
from train.parallelize import DistInfo
from train.step import Encoders, forward_backward_step

STEPS, ACCUM, NODES = 2, 3, 2

counts: dict[str, int] = {}


def _count(name: str, tensor_arg: str):
    original = getattr(dist, name)

    def wrapped(*args, **kwargs):
        t = kwargs[tensor_arg] if tensor_arg in kwargs else args[0 if tensor_arg in ("output", "tensor") else 1]
        group = kwargs.get("group")
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        # on the 2 x 2 mesh a node is ranks {0,1} or {2,3}: a group inside one node is the shard group
        where = "shard" if len({r // (dist.get_world_size() // NODES) for r in ranks}) == 1 else "replicate"
        if t.numel() > 1:  # the scalars (grad norm) are not gradient traffic
            key = f"{name}/{where}"
            counts[key + "/calls"] = counts.get(key + "/calls", 0) + 1
            counts[key + "/bytes"] = counts.get(key + "/bytes", 0) + t.numel() * t.element_size()
        return original(*args, **kwargs)

    setattr(dist, name, wrapped)


# FSDP2 calls these through the `dist` module at call time (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py)
_count("all_gather_single", "output")
_count("reduce_scatter_single", "input")
_count("all_reduce", "tensor")


def batch_for(rank: int, step: int, micro: int, model) -> dict:
    """A precomputed batch as the loader's collate builds it, different on every rank and micro-batch."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    c, d_t5, d_clip = model.config.in_channels // 4, model.config.joint_attention_dim, model.config.pooled_projection_dim
    return {
        "caption": ["a", "b"], "latent_mean": torch.randn(2, c, 8, 8, generator=g),
        "latent_std": torch.rand(2, c, 8, 8, generator=g), "t5": torch.randn(2, 5, d_t5, generator=g),
        "t5_mask": torch.ones(2, 5, dtype=torch.bool), "pooled": torch.randn(2, d_clip, generator=g),
        "empty_t5": torch.zeros(1, 1, d_t5), "empty_mask": torch.ones(1, 1, dtype=torch.bool),
        "empty_pooled": torch.zeros(1, d_clip), "max_text_tokens": 8,
    }


def run(variant: str, info: DistInfo) -> tuple[dict, dict, dict]:
    torch.manual_seed(0)  # the same initial weights on every rank and in both variants
    model = FluxTransformer2DModel(**TINY_SIZES["tiny"]["transformer"]).float()
    backend = build_backend(
        model, ParallelConfig(hsdp=True, dist_backend="gloo"), info=info, compute_dtype=torch.float32,
        step=StepConfig(micro_batch_size=2, grad_accum=ACCUM, grad_clip=1.0, activation_checkpointing=False),
        make_optimizer=lambda params: build_optimizer(params, OptimConfig(lr=1e-3)),
    )
    assert backend.name == "fsdp2-hsdp(2x2)", backend.name
    frozen = Encoders(vae=None, text=None, dtype=torch.float32, device=info.device)
    obj = ObjectiveConfig(max_text_tokens=8)
    per_step, grads = [], {}
    for step in range(STEPS):
        counts.clear()
        for micro in range(ACCUM):
            if variant == "once":
                backend.prepare_micro_batch(micro, ACCUM)  # the loop's line
            forward_backward_step(backend.model, batch_for(info.rank, step, micro, backend.module), frozen, obj,
                                  generator=step_generator(0, info.rank, step, micro), loss_scale=1.0 / ACCUM)
        per_step.append(dict(counts))
        if step == 0:
            grads = {n: p.grad.to_local().clone() for n, p in backend.named if p.grad is not None}
        backend.step(loss_finite=True)
    params = {n: p.detach().to_local().clone() for n, p in backend.named}
    return per_step, grads, params


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    # torchrun starts all 4 ranks on this machine; the mesh treats ranks {0,1} and {2,3} as two nodes
    info = DistInfo(rank, world, rank % (world // NODES), world // NODES, torch.device("cpu"))
    every_counts, every_grads, every_params = run("every", info)
    once_counts, once_grads, once_params = run("once", info)

    def diffs(a: dict, b: dict) -> dict:
        assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
        return {n: {"max_diff": (a[n] - b[n]).abs().max().item(), "max_abs": a[n].abs().max().item(),
                    "bitwise": torch.equal(a[n], b[n])} for n in a}

    out = {"every": every_counts, "once": once_counts, "grads": diffs(every_grads, once_grads),
           "params": diffs(every_params, once_params)}
    Path(os.environ["OUT"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
