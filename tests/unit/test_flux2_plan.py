# tier: unit
"""FLUX.2 at real size on the meta device: the shipped transformer configs give the published parameter counts, the
plan builds the FLUX.2 family (not FLUX.1) from them, and the presets parse."""

import pytest

from launch.describe import describe
from train.config import load_config
from train.family import FAMILIES, family_of_dir
from train.model import build_transformer_meta
from tools.plan import REPO, Cluster, make_plan, transformer_config

MODELS = REPO / "configs" / "models"
# (dir, family, parameters, shared modulation parameters): diffusers' convert_flux2_to_diffusers.py sizes
SIZES = [("flux2-dev", "flux2", 32_223_281_152, 566_231_040),
         ("flux2-klein-9b", "flux2-klein", 9_078_581_248, 251_658_240),
         ("flux2-klein-4b", "flux2-klein", 3_875_544_576, 141_557_760)]


@pytest.mark.parametrize("name, family, params, modulation", SIZES)
def test_shipped_configs_count_the_published_sizes(name, family, params, modulation):
    assert family_of_dir(MODELS / name) is FAMILIES[family]
    cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [f"model.path={MODELS / name}"])
    config, _ = transformer_config(cfg)
    m = build_transformer_meta(config, guidance="keep")  # the checkpoint as published, guidance embedder included
    assert type(m).__name__ == "Flux2Transformer2DModel"
    assert sum(p.numel() for p in m.parameters()) == params
    shared = sum(p.numel() for s in FAMILIES[family].shared_modules for p in m.get_submodule(s).parameters())
    assert shared == modulation
    assert all(not n.endswith(".bias") for n, _ in m.named_parameters())  # no parameter has a bias


def dev_embedder_params() -> int:
    """FLUX.2 [dev]'s guidance embedder, which `model.guidance: bypass` (the default) leaves out of what trains."""
    cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [f"model.path={MODELS / 'flux2-dev'}"])
    keep = build_transformer_meta(transformer_config(cfg)[0], guidance="keep")
    return sum(p.numel() for p in keep.time_guidance_embed.guidance_embedder.parameters())


def test_dev_preset_plans_32b_on_two_nodes():
    cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [])
    plan = make_plan(cfg, Cluster(nodes=2, gpus_per_node=8), precomputed=True)
    assert 0 < dev_embedder_params() < 1e8
    assert plan.inv.n_total == SIZES[0][2] - dev_embedder_params()  # 32.18B: "32.2B" at the plan's precision
    assert plan.verdict.startswith("fits")


def test_klein_preset_targets_exist():
    """The klein LoRA preset's target_modules name FLUX.2's Linears (an unknown suffix would raise)."""
    cfg = load_config(REPO / "configs" / "flux2-klein-base-lora.yaml", [])
    plan = make_plan(cfg, Cluster(nodes=1, gpus_per_node=1), precomputed=True)
    assert 0 < plan.inv.n_trainable < plan.inv.n_total / 100


@pytest.mark.parametrize("preset, params", [("flux2-dev-undistill", SIZES[0][2]),
                                            ("flux2-klein-base-lora", SIZES[1][2])])
def test_describe_states_the_flux2_size(preset, params):
    if preset == "flux2-dev-undistill":  # bypassed: the trained model has no guidance embedder
        params -= dev_embedder_params()
    params = f"{params:,}"
    text = describe(load_config(REPO / "configs" / f"{preset}.yaml", []))
    assert f"parameters: {params} in the transformer" in text
    assert "FLUX.1-schnell" not in text
