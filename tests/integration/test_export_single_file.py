"""Single-file formats ComfyUI / Forge users load, proven with diffusers' own converters.

- `--format bfl`: diffusers' `FluxTransformer2DModel.from_single_file` (its BFL -> diffusers converter) turns our
  BFL-keyed file back into exactly the transformer we exported.
- `--format lora --lora-layout kohya`: diffusers' `load_lora_weights` (its kohya -> diffusers converter) reads the
  file and the transformer computes what it computes with our PEFT-layout file.

diffusers' converters hard-code FLUX.1's width in the single blocks (`inner_dim = 3072`, mlp 4x: linear1 is split
into 3072/3072/3072/12288 rows), so the full conversion is proven on a FLUX.1-wide transformer with one double and
one single block (the real sizes, few blocks: ~480M parameters), built from random weights. The tiny trained run then
checks the CLI end to end: its BFL file is `to_bfl` of its diffusers export, and its kohya LoRA (double blocks only,
the part diffusers can read at tiny width) loads in diffusers like its PEFT LoRA.
"""


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_runs
from launch.bfl_keys import to_bfl, to_kohya_lora

pytestmark = pytest.mark.slow

WIDE = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56))


def _wide(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(**WIDE).to(dtype).eval().requires_grad_(False)


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3, generator=g) * 4, txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )


def test_bfl_file_is_the_exact_inverse_of_diffusers_from_single_file(tmp_path):
    from diffusers import FluxTransformer2DModel

    model = _wide(torch.bfloat16)
    ours = model.state_dict()
    bfl = to_bfl(ours)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    assert "final_layer.adaLN_modulation.1.weight" in bfl and not any(k.startswith("transformer_blocks") for k in bfl)
    save_file(bfl, str(tmp_path / "flux.safetensors"))
    model.save_config(str(tmp_path / "cfg" / "transformer"))
    del model, bfl

    loaded = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(tmp_path / "cfg"),
                                                     subfolder="transformer", torch_dtype=torch.bfloat16,
                                                     local_files_only=True)
    theirs = loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


def _lora_on(model, rank=4, alpha=8.0):
    """Our LoRA adapter (every default target) with random A and B, as after training."""
    from train.adapters import ADAPTER_NAME, apply_adapter
    from train.config import AdapterConfig

    apply_adapter(model, AdapterConfig(kind="lora", rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _bare_pipeline(transformer):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def test_kohya_lora_loads_in_diffusers_like_the_peft_file(tmp_path):
    from launch.export import _save_lora
    from launch.export_single_file import KOHYA_FILE, save_kohya_lora

    adapted = _lora_on(_wide())
    x = _inputs(adapted)
    with torch.no_grad():
        truth = adapted(**x)[0]
    (tmp_path / "peft").mkdir()
    (tmp_path / "kohya").mkdir()
    _save_lora(adapted, tmp_path / "peft", torch.float32)
    save_kohya_lora(adapted, tmp_path / "kohya", torch.float32)
    del adapted
    with safe_open(str(tmp_path / "kohya" / KOHYA_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape == (12, 3072)
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").shape == (3 * 3072 + 12288, 16)
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_double_blocks_0_txt_attn_qkv.alpha" in keys and "lora_unet_single_blocks_0_linear2.alpha" in keys

    pipe = _bare_pipeline(_wide())
    with torch.no_grad():
        base = pipe.transformer(**x)[0]
    pipe.load_lora_weights(str(tmp_path / "peft"), adapter_name="peft")
    pipe.load_lora_weights(str(tmp_path / "kohya"), weight_name=KOHYA_FILE, adapter_name="kohya")
    outs = {}
    for name in ("peft", "kohya"):
        pipe.set_adapters(name)
        with torch.no_grad():
            outs[name] = pipe.transformer(**x)[0]
    assert (outs["peft"] - base).abs().max() > 1e-3, "the LoRA changed nothing"
    torch.testing.assert_close(outs["peft"], truth, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["kohya"], outs["peft"], atol=1e-5, rtol=1e-5)


def test_kohya_refuses_a_fused_module_with_mixed_scales():
    lora = {f"m.{q}.lora_{ab}.weight": torch.ones(2, 2) for q in ("to_q", "to_k") for ab in "AB"}
    lora = {k.replace("m.", "transformer_blocks.0.attn."): v for k, v in lora.items()}
    scales = {"transformer_blocks.0.attn.to_q": 1.0, "transformer_blocks.0.attn.to_k": 2.0}
    out = {f"transformer_blocks.0.attn.{m}": 2 for m in ("to_q", "to_k", "to_v")}
    with pytest.raises(ValueError, match="img_attn.qkv"):
        to_kohya_lora(lora, scales, out)


# ------------------------------------------------------------------------------------------- the CLI on a tiny run

DOUBLE_TARGETS = ("[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, ff.net.0.proj, "
                  "ff.net.2, ff_context.net.0.proj, ff_context.net.2]")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A 4-step LoRA run on the double blocks (diffusers reads kohya single-block LoRA only at FLUX.1 width)."""
    run_dir = tmp_path_factory.mktemp("single_file") / "run"
    tiny_runs.cli("train", tiny_runs.CONFIG, *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir, steps=4, **{
        "model.adapter.kind": "lora", "model.adapter.rank": 4, "model.adapter.alpha": 8.0,
        "model.adapter.single_blocks": "[]", "model.adapter.target_modules": DOUBLE_TARGETS, "optim.lr": 0.02,
        "ema.decay": 0.0}))
    return tiny_runs.ckpt(run_dir, 4)


def _export(ckpt, out, *args):
    tiny_runs.cli("export", "--checkpoint", ckpt, "--out", out, "--dtype", "fp32", *args)
    return out


def test_cli_bfl_file_is_the_diffusers_export_in_bfl_keys(lora_run, tmp_path):
    from launch.export_single_file import BFL_FILE
    from train.model import load_safetensors_dir

    bfl_dir = _export(lora_run, tmp_path / "bfl", "--format", "bfl")
    diffusers_dir = _export(lora_run, tmp_path / "diffusers", "--format", "diffusers")
    expected = to_bfl(load_safetensors_dir(diffusers_dir / "transformer", torch.float32))
    with safe_open(str(bfl_dir / BFL_FILE), "pt") as f:
        assert set(f.keys()) == set(expected) and "dynamic shift" in f.metadata()["dedistill_schedule"]
        for k in expected:
            assert torch.equal(f.get_tensor(k), expected[k]), k


def test_cli_kohya_lora_loads_in_diffusers_like_the_peft_lora(lora_run, tiny_model_dir, tmp_path):
    from diffusers import FluxPipeline

    from launch.export_single_file import KOHYA_FILE

    peft_dir = _export(lora_run, tmp_path / "peft", "--format", "lora")
    kohya_dir = _export(lora_run, tmp_path / "kohya", "--format", "lora", "--lora-layout", "kohya")
    with safe_open(str(kohya_dir / KOHYA_FILE), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert not any("single_blocks" in k for k in keys)

    pipe = FluxPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    x = _inputs(pipe.transformer)
    with torch.no_grad():
        base = pipe.transformer(**x)[0]
    pipe.load_lora_weights(str(peft_dir), adapter_name="peft")
    pipe.load_lora_weights(str(kohya_dir), weight_name=KOHYA_FILE, adapter_name="kohya")
    outs = {}
    for name in ("peft", "kohya"):
        pipe.set_adapters(name)
        with torch.no_grad():
            outs[name] = pipe.transformer(**x)[0]
    assert (outs["peft"] - base).abs().max() > 1e-3
    torch.testing.assert_close(outs["kohya"], outs["peft"], atol=1e-5, rtol=1e-5)
