"""The speed options bench/train_step.py benchmarks (train/parallelize.py): activation-checkpointing policies and
per-block compile must leave the numbers exactly as they were (the bench itself: tests/integration/
test_bench_train_step_cli.py)."""

import copy
import os
from pathlib import Path

import pytest
import torch

from test_masking import inputs, tiny_transformer
from train.flux import predict_velocity

REPO = Path(__file__).resolve().parents[2]


def test_full_fine_tune_row_is_skipped_when_host_ram_cannot_hold_the_offloaded_state(monkeypatch):
    """12B fp32 params + grads + AdamW = ~177 GiB pinned on the host: a 128 GiB machine skips the row (the OOM
    killer would take the whole benchmark), a 512 GiB one runs it; adapters and CPU runs are never skipped."""
    from bench.train_step import SIZES, Options, _cannot_fit

    page = 4096
    for gib, skipped in ((128, True), (512, False)):
        monkeypatch.setattr(os, "sysconf", lambda key, gib=gib: page if key == "SC_PAGE_SIZE" else gib * 2**30 // page)
        why = _cannot_fit("full", SIZES["full"], torch.device("cuda"), Options())
        assert (why is not None) == skipped, why
        if skipped:
            assert "177 GiB" in why and "128 GiB" in why
    assert _cannot_fit("lora", SIZES["full"], torch.device("cuda"), Options()) is None
    assert _cannot_fit("full", SIZES["full"], torch.device("cpu"), Options()) is None


def _grads(model, batch=2):
    x, t, _, padded, ids = inputs(batch=batch)
    model.zero_grad(set_to_none=True)
    out = predict_velocity(model, x, t, padded, ids, masked=True)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy,chosen", [("full", [0, 1, 2, 3]), ("ops", [0, 1, 2, 3]), ("every_2", [0, 2]),
                                           ("every_3", [0, 3])])
def test_activation_checkpointing_policies_are_exact(policy, chosen):
    """Recomputation must not change a bit of the output or of any gradient, and no parameter may be renamed."""
    from train.parallelize import apply_activation_checkpointing

    base = tiny_transformer()
    ref_out, ref = _grads(base)
    model = copy.deepcopy(base)
    assert apply_activation_checkpointing(model, policy) == chosen
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    out, grads = _grads(model)
    assert torch.equal(out, ref_out)
    for name, g in ref.items():
        assert torch.equal(grads[name], g), name


def test_config_validates_ac_policy():
    from train.config import ParallelConfig

    for ok in ("full", "ops", "every_1", "every_12"):
        ParallelConfig(ac_policy=ok)
    for bad in ("selective", "every_0", "every_", "ops,full"):
        with pytest.raises(ValueError, match="parallel.ac_policy"):
            ParallelConfig(ac_policy=bad)
    with pytest.raises(ValueError, match="parallel.compile_blocks"):
        ParallelConfig(backend="deepspeed", compile_blocks=True)


def test_parallelize_order_ac_then_compile_then_fsdp(monkeypatch):
    """torchtitan's order on a world of one (gloo): op-level AC inside each block, each block compiled, then
    fully_shard. The compiled, checkpointed, sharded model must give the eager model's output and gradients.
    (dynamo's "eager" backend keeps the test fast on CPU; on a GPU inductor compiles the same graphs.)"""
    import functools

    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.distributed.fsdp import FSDPModule

    import train.parallelize as par
    from train.config import ParallelConfig

    monkeypatch.setattr(par, "apply_compile", functools.partial(par.apply_compile, backend="eager"))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(par._free_port())}.items():
        monkeypatch.setenv(k, v)
    info = par.init_distributed(ParallelConfig(dist_backend="gloo"))
    try:
        base = tiny_transformer()
        ref_out, ref = _grads(base)
        model = par.parallelize_transformer(
            copy.deepcopy(base), ParallelConfig(ac_policy="ops", compile_blocks=True), info=info,
            compute_dtype=torch.float32, activation_checkpointing=True,
        )
        for block in par._blocks(model):
            assert isinstance(block, FSDPModule) and block._compiled_call_impl is not None
            assert "forward" in vars(block)  # the checkpointing wrapper sits inside what was compiled
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
        torch._dynamo.reset()
        counters.clear()
        out, grads = _grads(model)
        assert counters["stats"]["unique_graphs"] >= 2  # the double- and the single-stream block really compiled
        assert not counters["unimplemented"]
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name].full_tensor(), g, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()
