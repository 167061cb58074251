"""`model.base_quant` (train/quant.py): the frozen base Linears in int8 / float8 under LoRA and LoKr."""

from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_runs
from train.config import load_config

pytest.importorskip("torchao")

from train.quant import QuantizedLinear, is_quantized, quant_target_names, quantize_base, quantize_linear  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Per-step loss of a quantized run relative to the same run over the unquantized base, on the tiny model in bf16
# (measured: int8 5e-4, float8 1.1e-3 at most over 6 steps). Float8 e4m3 keeps 3 mantissa bits against int8's ~7.
LOSS_RTOL = {"int8": 5e-3, "float8": 1e-2}


@pytest.mark.parametrize("overrides, match", [
    (["model.base_quant=int8", "model.adapter.kind=full"], r"model\.base_quant: int8 .*model\.adapter\.kind=full"),
    (["model.base_quant=float8", "parallel.backend=deepspeed"], r"model\.base_quant: float8 needs parallel\.backend"),
    (["model.base_quant=int8", "parallel.cpu_offload=true"], r"model\.base_quant: .*parallel\.cpu_offload"),
    (["model.base_quant=int4"], r"model\.base_quant"),
])
def test_bad_combinations_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)


@pytest.mark.parametrize("kind, rtol", [("int8", 1e-2), ("float8", 5e-2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_keeps_nothing_for_backward(kind, rtol, dtype):
    """Output and input gradient close to the full-precision Linear's, and autograd saves no tensor: torchao's own
    F.linear would keep a dequantized copy of the weight (the whole base again over a forward)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to(dtype).requires_grad_(False)
    x = torch.randn(8, 256, dtype=dtype, requires_grad=True)
    y0 = lin(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    quantize_linear(lin, kind)
    assert type(lin) is QuantizedLinear and is_quantized(lin.weight) and lin.weight.qdata.element_size() == 1
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert saved == []
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert y.dtype == dtype and g.dtype == dtype
    assert (y - y0).float().norm() / y0.float().norm() < rtol
    assert (g - g0).float().norm() / g0.float().norm() < rtol


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_peft_layers_wrap_the_quantized_base(tiny_model_dir, kind):
    """Every frozen block Linear is quantized (peft's base_layer and the untargeted ones), the root's are not; the
    adapted model's output stays close and the gradient reaches every adapter weight, none of the base."""
    from train.adapters import adapted_module_names, apply_adapter
    from train.config import AdapterConfig
    from train.model import load_transformer

    torch.manual_seed(0)
    model = load_transformer(tiny_model_dir, dtype=torch.float32)
    apply_adapter(model, AdapterConfig(kind=kind, rank=4, alpha=4.0, init_weights=False))  # a non-zero update
    inputs = dict(hidden_states=torch.randn(2, 16, model.config.in_channels),
                  encoder_hidden_states=torch.randn(2, 8, model.config.joint_attention_dim),
                  pooled_projections=torch.randn(2, model.config.pooled_projection_dim), timestep=torch.rand(2),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    ref = model(**inputs)[0]
    names = quantize_base(model, "int8")
    adapted = adapted_module_names(model)
    assert {f"{n}.base_layer" for n in adapted} <= set(names) and len(names) > len(adapted)  # + untargeted Linears
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            assert is_quantized(m.weight) == in_block, name
    for name in adapted:
        assert type(model.get_submodule(name).base_layer) is QuantizedLinear
    out = model(**inputs)[0]
    assert (out - ref).norm() / ref.norm() < 1e-2
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    assert all(model.get_submodule(n).weight.grad is None for n in names)


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_training_loss_stays_within_tolerance_of_bf16(tiny_model_dir, tiny_data_dir, tmp_path, kind):
    """The trainer (FSDP2, world of one) on the tiny model in bf16: each step's loss within LOSS_RTOL of the same
    run over the bf16 base, and the frozen base really held quantized."""
    def run(q):
        cfg = load_config(tiny_runs.CONFIG, tiny_runs.overrides(tiny_model_dir, tiny_data_dir, tmp_path / q, steps=4)
                          + [f"model.base_quant={q}", "model.dtype=bf16", "eval.every_steps=0", "ema.decay=0"])
        return [h["loss"] for h in tiny_runs.train_in_process(cfg).history]

    ref, got = run("none"), run(kind)
    assert len(ref) == len(got) == 4
    for a, b in zip(ref, got):
        assert abs(b - a) <= LOSS_RTOL[kind] * abs(a), (ref, got)
    assert ref != got  # the quantized run did run over a different base


def test_plan_counts_the_quantized_base_and_lora_24gb_fits():
    """At FLUX.1 size: int8 holds the block Linears in ~half their bf16 bytes (whole on each rank), and the shipped
    lora-24gb preset fits one 24 GB card; the same preset over a bf16 base does not."""
    from tools.plan import GiB, Cluster, make_plan

    cfg = load_config(REPO / "configs" / "lora-24gb.yaml")
    one = Cluster(gpus_per_node=1, gpu_mem_gib=24.0)
    p = make_plan(cfg, one, precomputed=False)
    assert cfg.model.base_quant == "int8" and p.verdict == "fits", p.verdict
    rows = p.memory.rows
    quant = rows["frozen base Linears int8 (replicated)"]
    assert 10.5 * GiB < quant < 11.5 * GiB  # ~11.8B weights at 1 byte + a scale per row
    assert rows["frozen base weights (sharded)"] < 0.2 * GiB  # what stays bf16: the root and the norms
    bf16 = make_plan(load_config(REPO / "configs" / "lora-24gb.yaml", ["model.base_quant=none"]), one, precomputed=False)
    assert bf16.verdict.startswith("does not fit")
    assert bf16.memory.rows["frozen base weights (sharded)"] > 1.9 * quant
    # on 8 GPUs the bf16 base shards (1/8 each) while the int8 one stays whole: the plan says so
    eight = Cluster(gpus_per_node=8, gpu_mem_gib=24.0)
    assert make_plan(cfg, eight, precomputed=False).memory.rows["frozen base Linears int8 (replicated)"] == quant
