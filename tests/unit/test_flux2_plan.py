# tier: unit
"""FLUX.2 at real size on the meta device: the shipped transformer configs give the published parameter counts, the
plan builds the FLUX.2 family (not FLUX.1) from them, and the presets parse."""

import pytest

from launch.describe import describe
from train.config import load_config
from train.family import FAMILIES, family_of_dir
from train.model import build_transformer_meta
from tools.plan import REPO, Cluster, format_plan, frozen_parts, make_plan, transformer_config

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


def _decoder_params(*, vocab: int, hidden: int, layers: int, inter: int, heads: int = 32, kv_heads: int = 8,
                    head_dim: int = 128, qk_norm: bool, tied: bool) -> int:
    """A Mistral / Qwen3 decoder counted by hand: q, k, v, o, the gated MLP and two RMSNorms per layer (Qwen3 adds
    per-head q/k norms), the embedding, the final norm and an untied lm_head."""
    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    layer = attn + 3 * hidden * inter + 2 * hidden + (2 * head_dim if qk_norm else 0)
    return vocab * hidden * (1 if tied else 2) + layers * layer + hidden


def _pixtral_params(*, hidden: int = 1024, layers: int = 24, inter: int = 4096, patch: int = 14, text: int = 5120
                    ) -> int:
    """Mistral3's vision tower (Pixtral: patch conv, ln_pre, layers without biases) and its projector (RMSNorm, the
    2x2 patch merger, two Linears to the text width, no biases), counted by hand."""
    tower = 3 * patch * patch * hidden + hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    return tower + hidden + 4 * hidden * hidden + hidden * text + text * text


# The text models FLUX.2 reads (configs/models/*/text_encoder/config.json) as the trainer loads them, up to one layer
# past the deepest stacked one (train/text.py): Mistral-Small-3.x 24B's 31 of 40 layers, vision tower included (the
# checkpoint ships it and from_pretrained loads it); Qwen3-8B's and Qwen3-4B's 28 of 36 (4B: tied embeddings).
TEXT_MODELS = [
    ("flux2-dev", "Mistral3ForConditionalGeneration",
     _decoder_params(vocab=131072, hidden=5120, layers=31, inter=32768, qk_norm=False, tied=False) + _pixtral_params()),
    ("flux2-klein-9b", "Qwen3ForCausalLM",
     _decoder_params(vocab=151936, hidden=4096, layers=28, inter=12288, qk_norm=True, tied=False)),
    ("flux2-klein-4b", "Qwen3ForCausalLM",
     _decoder_params(vocab=151936, hidden=2560, layers=28, inter=9728, qk_norm=True, tied=True)),
]
FULL_DEPTH = {"flux2-dev": 40, "flux2-klein-9b": 36, "flux2-klein-4b": 36}


@pytest.mark.parametrize("name, arch, params", TEXT_MODELS)
def test_plan_sizes_the_flux2_text_model(name, arch, params):
    """The planner counts the family's own text model (not FLUX.1's T5 + CLIP) from the shipped configs, equal to a
    count by hand of the published architectures (24.01B, 8.19B, 4.02B at full depth) less the layers it skips."""
    import json

    cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [f"model.path={MODELS / name}"])
    shipped = json.loads((MODELS / name / "text_encoder" / "config.json").read_text())
    assert shipped.get("text_config", shipped)["num_hidden_layers"] == FULL_DEPTH[name]
    frozen = frozen_parts(cfg)
    counts = frozen.params
    assert counts["t5"] == params and counts["clip"] == 0
    assert frozen.text_model == arch
    assert 80e6 < counts["vae"] < 90e6  # AutoencoderKLFlux2: 84M


def test_raw_data_dev_plan_places_the_24b_text_model():
    """With raw data the 24B Mistral3 (19B of it loaded) sits in each GPU's memory whole (the verdict then says to
    precompute), or
    sharded 1/world by `model.text_encoder_placement=fsdp`, or in host RAM (cpu)."""
    cluster = Cluster(nodes=2, gpus_per_node=8)
    text = TEXT_MODELS[0][2]
    vae = frozen_parts(load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [])).params["vae"]
    row = "frozen encoders (text model, CLIP, VAE)"
    rows = {}
    for placement in ("device", "fsdp", "cpu"):
        cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [f"model.text_encoder_placement={placement}"])
        plan = make_plan(cfg, cluster, precomputed=False)
        rows[placement] = plan.memory.rows[row]
        if placement == "device":
            assert plan.verdict.startswith("does not fit") and "precompute" in plan.verdict
            assert "Mistral3ForConditionalGeneration, 19.010B parameters loaded" in format_plan(plan)
    assert rows == {"device": (text + vae) * 2, "fsdp": (-(-text // 16) + vae) * 2, "cpu": vae * 2}
    assert make_plan(load_config(REPO / "configs" / "flux2-dev-undistill.yaml", []), cluster,
                     precomputed=True).memory.rows[row] == 0


def test_shared_modulation_is_planned_as_its_own_units():
    """FSDP2 makes each FLUX.2 modulation a unit of its own (gathered for its forward and again for its backward), so
    the plan holds it out of the root, which stays gathered all step: the root holds the embedders only."""
    cfg = load_config(REPO / "configs" / "flux2-dev-undistill.yaml", [])
    inv = make_plan(cfg, Cluster(nodes=2, gpus_per_node=8), precomputed=True).inv
    assert [u.name for u in inv.shared] == [f"shared.{n}" for n in FAMILIES["flux2"].shared_modules]
    assert sum(u.n_trainable for u in inv.shared) == SIZES[0][3]
    root = inv.units[-1]
    assert root.name == "root" and root.n_trainable < SIZES[0][3] / 2  # embedders, norm_out, proj_out: 211M
    assert len(inv.blocks) == 8 + 48
    assert inv.n_total == SIZES[0][2] - dev_embedder_params()  # nothing counted twice or lost
