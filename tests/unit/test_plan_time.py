# tier: unit
"""`dedistill plan`'s communication time and memory margins (tools/plan.py), each against its formula's inputs.

- the HSDP all-reduce runs once per optimizer step whatever `train.grad_accum` is (the code's behaviour, counted on
  a 2 x 2 gloo mesh by tests/integration/test_hsdp_accum.py); all-gathers and reduce-scatters run per micro-batch;
- link rates are one way (NVLink's NCCL bus bandwidth, one NIC's line rate), stated in the output;
- an FSDP ring across nodes spreads its inter-node bytes over every NIC of a node;
- each phase hides only its own collectives;
- CUDA context + NCCL by communicator count, activation gradients, AdamW's temporary, and the stated margin.
"""

import json
import math
from pathlib import Path

import pytest

from dataset_tools.tiny_model import TINY_SIZES
from train.config import load_config
from tools.plan import (
    FLUX1_SCHNELL_CONFIG, GiB, NCCL_RUNTIME_BYTES, USABLE_FRACTION, Cluster, activation_grad_bytes, comm_per_step,
    format_plan, gpu_memory, inventory, make_plan, sharded_collective_s, step_timing, tokens_for,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(TINY_SIZES["tiny"]["transformer"])
TWO_NODES = Cluster(nodes=2, gpus_per_node=8)


def _cfg(*overrides):
    return load_config(REPO / "configs" / "full-fsdp-multinode.yaml", list(overrides))


@pytest.fixture(scope="module")
def inv():
    return inventory(CONFIG, _cfg())


def test_the_hsdp_all_reduce_runs_once_per_step_and_the_rest_per_micro_batch(inv):
    one = comm_per_step(inv, _cfg("parallel.hsdp=true", "train.grad_accum=1"), TWO_NODES)
    four = comm_per_step(inv, _cfg("parallel.hsdp=true", "train.grad_accum=4"), TWO_NODES)
    S, R = 8, 2
    shards = sum(u.shard_numel(u.trainable, S) for u in inv.units)
    assert (one.shard_group, one.replicas) == (S, R)
    assert four.all_reduce == one.all_reduce == 2 * (R - 1) / R * shards * 4  # fp32 reduce dtype, once
    assert four.reduce_scatter == pytest.approx(4 * one.reduce_scatter)
    assert four.all_gather == pytest.approx(4 * one.all_gather)
    units = len(inv.units)
    assert one.calls[2] == four.calls[2] == units  # one all-reduce per FSDP unit per step
    assert four.calls[1] == 4 * one.calls[1] == 4 * units
    # the time: the all-reduce's InfiniBand seconds do not grow with grad_accum
    t1 = step_timing(inv, _cfg("parallel.hsdp=true", "train.grad_accum=1"), TWO_NODES, tokens_for(_cfg()))
    t4 = step_timing(inv, _cfg("parallel.hsdp=true", "train.grad_accum=4"), TWO_NODES, tokens_for(_cfg()))
    ib = TWO_NODES.ib_gbits / 8 * 1e9
    ar_s = one.all_reduce / ib + units * 2 * (R - 1) * TWO_NODES.ring_step_us * 1e-6
    nv_s = lambda c: (c.all_gather + c.reduce_scatter) / (TWO_NODES.nvlink_gbs * 1e9)  # noqa: E731
    lat = lambda c: (c.calls[0] + c.calls[1]) * (S - 1) * TWO_NODES.ring_step_us * 1e-6  # noqa: E731
    assert t1.comm_s == pytest.approx(nv_s(one) + lat(one) + ar_s)
    assert t4.comm_s == pytest.approx(nv_s(four) + lat(four) + ar_s)


def test_link_rates_are_one_way_and_stated(inv):
    cl = Cluster()
    assert cl.nvlink_gbs < 450  # NCCL's bus bandwidth, below NVLink 4's 450 GB/s per direction (900 is both)
    plan = make_plan(_cfg(), TWO_NODES, precomputed=True, inv=inv)
    text = format_plan(plan)
    assert f"NVLink {cl.nvlink_gbs:g} GB/s one way" in text
    assert f"InfiniBand {cl.ib_gbits / 8:g} GB/s per NIC one way" in text
    assert "(modelled)" in text and "modelled, not measured on a GPU" in text


def test_an_fsdp_ring_across_nodes_uses_every_nic_of_a_node():
    nbytes = 93.5e9
    cl = Cluster(nodes=8, gpus_per_node=8)
    g, nv, ib = 8, cl.nvlink_gbs * 1e9, cl.ib_gbits / 8 * 1e9
    across = sharded_collective_s(nbytes, cl, intra_node=False)
    assert across == pytest.approx(max(nbytes * (g - 1) / g / nv, nbytes / (g * ib)))
    assert across < nbytes / ib / 4  # not one NIC's rate for every byte
    assert sharded_collective_s(nbytes, cl, intra_node=True) == pytest.approx(nbytes / nv)


def test_each_phase_hides_only_its_own_collectives(inv):
    # a slow NVLink: every phase is communication-bound, so the step is at least the sum of each phase's longer side
    cl = Cluster(nodes=1, gpus_per_node=8, nvlink_gbs=1.0)
    cfg = _cfg("parallel.hsdp=false")
    t = step_timing(inv, cfg, cl, tokens_for(cfg))
    assert t.step_s >= sum(max(comp, comm) for _, comp, comm in t.phases) * (1 - 1e-9)
    forward = next(p for p in t.phases if p[0] == "forward")
    assert forward[2] > forward[1]  # the forward's all-gather alone exceeds its compute


def test_memory_margins_follow_their_inputs(inv):
    tok = tokens_for(_cfg())
    fsdp = gpu_memory(inv, _cfg("parallel.hsdp=false"), TWO_NODES, tok, with_encoders=False).rows
    hsdp = gpu_memory(inv, _cfg("parallel.hsdp=true"), TWO_NODES, tok, with_encoders=False).rows
    assert fsdp["CUDA context + NCCL (1 communicator)"] == NCCL_RUNTIME_BYTES[1] == 1.6e9
    assert hsdp["CUDA context + NCCL (3 communicators)"] == NCCL_RUNTIME_BYTES[3] == 6.0e9
    # activation gradients: the widest block's MLP (all tokens in a single-stream block) in bf16, the LayerNorm
    # input's gradient in fp32, per sample
    h = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    batch = _cfg().train.batch_size
    expected = batch * (tok.total * (2 * h + 2 * 4 * h) * 2 + tok.total * h * 4)
    assert hsdp["activation gradients (one block's backward)"] == expected
    # AdamW: fused keeps no temporary; foreach one fp32 copy of every local shard
    foreach = gpu_memory(inv, _cfg("optim.implementation=foreach"), TWO_NODES, tok, with_encoders=False).rows
    shard = sum(u.shard_numel(u.trainable, 8) for u in inv.units)
    assert hsdp["AdamW fused step temporary fp32"] == 0
    assert foreach["AdamW foreach step temporary fp32"] == 4 * shard
    # gradients and activations peak at opposite ends of one backward, but accumulated gradients outlive it
    kept = hsdp["activations (kept for backward)"]
    assert hsdp["step and backward peaks not at once"] == -min(4 * shard, kept)
    accum = gpu_memory(inv, _cfg("train.grad_accum=2"), TWO_NODES, tok, with_encoders=False).rows
    assert accum["step and backward peaks not at once"] == 0
    text = format_plan(make_plan(_cfg(), TWO_NODES, precomputed=True, inv=inv))
    margin = (1 - USABLE_FRACTION) * TWO_NODES.gpu_mem_gib
    assert f"keeps {1 - USABLE_FRACTION:.0%} of the card ({margin:.1f} GiB)" in text


def test_activation_gradients_at_1024px_are_a_third_of_a_gigabyte_per_sample():
    """FLUX.1's widths (hidden 3072) at 1024 px with 512 text tokens, bf16: a hand estimate gives 0.3-0.5 GB."""
    class Flux:
        hidden = 3072
        config = json.loads(FLUX1_SCHNELL_CONFIG.read_text())

    per_sample = activation_grad_bytes(Flux, image=4096, text=512, batch=1, act_bytes=2, autocast=True)
    assert 0.3e9 < per_sample < 0.5e9
    assert per_sample == 4608 * 10 * 3072 * 2 + 4608 * 3072 * 4
    assert math.isclose(per_sample / GiB, 0.316, abs_tol=0.01)


def test_the_knob_states_the_grad_accum_cost(inv):
    over = ("train.activation_checkpointing=true", "parallel.hsdp=true", "train.grad_accum=1")
    at4 = make_plan(_cfg("train.batch_size=4", *over), TWO_NODES, precomputed=True, inv=inv).memory.total
    card = Cluster(nodes=2, gpus_per_node=8, gpu_mem_gib=at4 / USABLE_FRACTION / GiB * 1.0001)
    plan = make_plan(_cfg("train.batch_size=8", *over), card, precomputed=True, inv=inv)
    bs = int(plan.verdict.split("train.batch_size=")[1].split()[0])
    assert 4 <= bs < 8
    accum = math.ceil(8 / bs)
    assert f"train.grad_accum={accum} " in plan.verdict
    assert f"run {accum} times per step; the HSDP all-reduce once" in plan.verdict
