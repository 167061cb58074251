"""The MFU convention (train/mfu.py, docs/performance.md): the formula, and P_tok recounted from diffusers' FLUX."""

import pytest
import torch

from train.mfu import FLUX1, FLUX1_P_TOK, FlopsModel, flops_model, mfu, peak_flops, per_token_matmul_params

FLUX1_ARCH = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


@pytest.mark.parametrize("tokens", [1, 1024 + 97, 4096 + 512])
def test_formula(tokens):
    """FLOPs/sample = c·P_tok·T + 12·L·T²·h, c = 6 full / 4 adapter, with FLUX.1's constants (train/mfu.py)."""
    p_tok, layers, h = 6.455e9, 57, 3072
    attention = 12 * layers * tokens**2 * h
    assert FLUX1.per_sample(tokens, full=True) == pytest.approx(6 * p_tok * tokens + attention, rel=1e-5)
    assert FLUX1.per_sample(tokens, full=False) == pytest.approx(4 * p_tok * tokens + attention, rel=1e-5)


def test_worked_example_in_docs():
    """docs/performance.md: 512², 97 text tokens, LoRA, batch 4, one step in 0.3 s on an H100 -> 42.6 % MFU."""
    step = FLUX1.per_step(image_tokens=1024, text_tokens=97, batch=4, full=False)
    assert step == pytest.approx(4 * (4 * FLUX1_P_TOK * 1121 + 12 * 57 * 1121**2 * 3072))
    assert step == pytest.approx(1.2634e14, rel=1e-4)
    assert mfu(step, 0.3, 989e12) == pytest.approx(0.4258, abs=1e-4)


def test_p_tok_counted_from_the_diffusers_architecture():
    """Count the per-token matmul weights of FluxTransformer2DModel's blocks on meta: the 6.455e9 of
    train/mfu.py's FLUX1_P_TOK."""
    from train.model import build_transformer_meta

    model = build_transformer_meta(FLUX1_ARCH)
    p_tok = per_token_matmul_params(model)
    assert p_tok == 57 * 12 * 3072**2  # 12h² per block and token: QKV+out 4h², MLP 8h² (single: 3+4+5 h²)
    assert p_tok == pytest.approx(6.455e9, rel=1e-3)
    # ...and it is far from the parameter count: the modulation and the second stream of the double blocks
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=1e-2)
    assert flops_model(model) == FlopsModel(p_tok=float(p_tok), layers=57, hidden=3072)


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_p_tok_ignores_adapters_and_modulation(kind):
    """peft wraps the frozen weight as `base_layer` (counted) and adds small adapter Linears (not counted), also on
    an adapted AdaLN modulation layer (`norm1.linear`, not counted either way)."""
    from diffusers import FluxTransformer2DModel

    from train.adapters import apply_adapter
    from train.config import AdapterConfig

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    h = 32
    before = per_token_matmul_params(model)
    assert before == (2 + 3) * 12 * h * h
    targets = AdapterConfig().target_modules + ["norm1.linear"]
    apply_adapter(model, AdapterConfig(kind=kind, rank=4, target_modules=targets))
    assert per_token_matmul_params(model) == before


def test_peak_table(monkeypatch):
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.5) == 2.5e12
    assert mfu(1e12, 1.0, None) is None
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA GeForce RTX 4090": None}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == peak, name
