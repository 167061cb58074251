# tier: integration
"""HSDP with gradient accumulation: the gradients cross nodes once per optimizer step (`backend.prepare_micro_batch`).

One torchrun launch of 4 gloo ranks, meshed 2 x 2 (2 "nodes" of 2 ranks), trains a tiny FLUX full fine-tune for 2 steps
of 3 micro-batches twice: with torch's default (every micro-batch's backward all-reduces across nodes) and with the
loop's `prepare_micro_batch` (only the last one does). tests/_hsdp_accum_check.py counts FSDP2's collectives by the
group they run on.
"""

import json

import pytest

import tiny_runs

ACCUM = 3  # tests/_hsdp_accum_check.py's
SHARD = 2  # ranks per node


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp_accum")
    script = str(tiny_runs.REPO / "tests" / "_hsdp_accum_check.py")
    tiny_runs.run(tiny_runs.torchrun_cmd(nproc=4, script=script), env=tiny_runs.env(OUT=str(out)), timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def test_the_inter_node_all_reduce_runs_once_per_optimizer_step(result):
    for rank in result:
        for every, once in zip(rank["every"], rank["once"]):  # per optimizer step
            groups = every["reduce_scatter_single/shard/calls"] // ACCUM  # FSDP2 reduces per fully_shard unit
            assert groups >= 2 and every["reduce_scatter_single/shard/calls"] == groups * ACCUM
            # torch's default: one all-reduce across nodes per unit per micro-batch
            assert every["all_reduce/replicate/calls"] == groups * ACCUM
            # prepare_micro_batch: one per unit per step; the reduce-scatter inside the node stays per micro-batch
            assert once["all_reduce/replicate/calls"] == groups
            assert once["reduce_scatter_single/shard/calls"] == every["reduce_scatter_single/shard/calls"]
            assert once["all_gather_single/shard/calls"] == every["all_gather_single/shard/calls"]
            # the all-reduce carries this rank's shard of the gradient (the reduce-scatter's input / ranks per node),
            # once per step instead of once per micro-batch
            per_micro_rs = every["reduce_scatter_single/shard/bytes"] // ACCUM
            assert every["all_reduce/replicate/bytes"] == ACCUM * per_micro_rs // SHARD
            assert once["all_reduce/replicate/bytes"] == per_micro_rs // SHARD
            assert not any(k.endswith("/replicate/calls") and not k.startswith("all_reduce") for k in once)


def test_the_gradients_and_weights_equal_the_per_micro_batch_all_reduce(result):
    """Within fp32 reduction order, not bitwise: the default sums each micro-batch over the nodes and then the
    micro-batches (sum_m sum_r g), the accumulation sums the micro-batches inside the node first, in FSDP2's partial
    sum, and all-reduces that (sum_r sum_m g). fp32 addition is not associative, so a gradient may differ by a few
    units in the last place of its largest term (relative 2^-23 ≈ 1.2e-7 each). AdamW divides by sqrt(v) + eps, which
    turns such a difference in an element whose gradient is near zero into at most a small fraction of one step's
    update (lr per step)."""
    lr, steps = 1e-3, 2  # the helper's
    for rank in result:
        for name, d in rank["grads"].items():
            assert d["max_diff"] <= 8 * 2**-23 * d["max_abs"], (name, d)
        worst = max(d["max_diff"] for d in rank["params"].values())
        assert worst <= 1e-2 * lr * steps, worst
        # a lost or doubled micro-batch would move the gradients by a third or more, far outside these bounds
