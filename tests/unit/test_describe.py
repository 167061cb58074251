"""`dedistill describe`: every training preset at the real FLUX.1-schnell size, on the meta device (no weights).

Expected trainable counts are computed here from the layer shapes with LyCORIS' own `factorization` (LoKr) and
r·(in+out) (LoRA), not read back from our adapter code."""

import json
import re
from pathlib import Path

import pytest

import tiny_runs
import torch

from launch.describe import SHIPPED, describe, transformer_config
from train.config import AdapterConfig, load_config

REPO = Path(__file__).resolve().parents[2]
PRESETS = tiny_runs.config_files("job")
FLUX1_PARAMETERS = 11_891_178_560  # FLUX.1's published 11.9 B (12 B), counted by diffusers' own module tree


def _count(text: str, what: str) -> int:
    m = re.search(rf"([\d,]+) {what}", text)
    assert m, text[:2000]
    return int(m.group(1).replace(",", ""))


def _targeted_linears(cfg: AdapterConfig):
    from train.model import build_transformer_meta

    model = build_transformer_meta(json.loads(SHIPPED.read_text()))
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, attr):
            for sub, mod in block.named_modules():
                if isinstance(mod, torch.nn.Linear) and any(sub == s or sub.endswith("." + s) for s in cfg.target_modules):
                    yield mod


def expected_trainable(cfg: AdapterConfig) -> int:
    if cfg.kind == "full":  # less the frozen prefixes, counted on a plain diffusers build
        if not cfg.frozen:
            return FLUX1_PARAMETERS
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(SHIPPED.parent)))
        return FLUX1_PARAMETERS - sum(p.numel() for n, p in model.named_parameters()
                                      if any(n.startswith(f) for f in cfg.frozen))
    if cfg.kind == "lora":
        return sum(cfg.rank * (lin.in_features + lin.out_features) for lin in _targeted_linears(cfg))
    from lycoris.functional.general import factorization

    assert not cfg.lokr_decompose_both and not cfg.lokr_factor_pattern, "extend this reference for other LoKr forms"
    total = 0
    for lin in _targeted_linears(cfg):  # LyCORIS LokrModule: w1 full; w2 full or w2_a @ w2_b of rank r
        out_l, out_k = factorization(lin.out_features, cfg.lokr_factor)
        in_m, in_n = factorization(lin.in_features, cfg.lokr_factor)
        w2_full = cfg.lokr_full_matrix or cfg.rank >= max(out_k, in_n) / 2
        total += out_l * in_m + (out_k * in_n if w2_full else cfg.rank * (out_k + in_n))
    return total


def test_shipped_config_is_flux1_schnell():
    from diffusers import FluxTransformer2DModel

    c = FluxTransformer2DModel.load_config(str(SHIPPED.parent))
    assert (c["num_layers"], c["num_single_layers"], c["num_attention_heads"], c["attention_head_dim"]) == (19, 38, 24, 128)
    assert (c["joint_attention_dim"], c["pooled_projection_dim"], c["in_channels"], c["patch_size"]) == (4096, 768, 64, 1)
    assert list(c["axes_dims_rope"]) == [16, 56, 56] and c["guidance_embeds"] is False


FLUX1_PRESETS = [p for p in PRESETS if not p.name.startswith("flux2-")]  # FLUX.2's: tests/unit/test_flux2_plan.py


@pytest.mark.parametrize("path", FLUX1_PRESETS, ids=[p.name for p in FLUX1_PRESETS])
def test_describe_every_preset_at_flux1_size(path):
    pytest.importorskip("lycoris")
    cfg = load_config(path)
    text = describe(cfg)
    assert "FLUX.1-schnell" in text and "19 double-stream + 38 single-stream" in text
    assert _count(text, "in the transformer") == FLUX1_PARAMETERS
    assert _count(text, "trainable \\(") == expected_trainable(cfg.model.adapter)
    assert f"model.adapter.kind: \"{cfg.model.adapter.kind}\"" in text  # the settings section lists every key


def test_libreflux_describes_scale_1_and_its_trainable_count():
    text = describe(load_config(REPO / "configs" / "libreflux.yaml"))
    assert "effective scale 1 on 418 layers" in text
    assert _count(text, "trainable \\(") == 2_151_679_624
    peft = describe(load_config(REPO / "configs" / "libreflux.yaml", ["model.adapter.scale_convention=peft"]))
    assert "effective scale 0.0001 on 418 layers" in peft  # the old, 10,000x weaker update, still selectable


def test_describe_uses_a_real_model_dirs_config(tiny_model_dir):
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"model.path={tiny_model_dir}"])
    text = describe(cfg)
    assert str(Path(tiny_model_dir) / "transformer" / "config.json") in text
    assert "FLUX.1-schnell" not in text.splitlines()[0]


def test_describe_cli(capsys):
    from launch.cli import main

    main(["describe", "lora-1gpu", "model.adapter.rank=4"])
    out = capsys.readouterr().out
    assert "adapter: lora (rank 4" in out and "model.adapter.rank: 4" in out


def test_describe_names_a_bad_model_path(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        transformer_config(str(tmp_path))
