"""Our peft LoKr against LyCORIS' own (lycoris-lora): same layers, same factor shapes, same parameter count, and —
given identical factor values — the same merged weight deltas, under LibreFLUX's settings and a low-rank one."""

from pathlib import Path

import pytest
import torch

from tiny_nets import tiny_transformer
from train.adapters import (
    adapter_groups,
    adapted_module_names,
    apply_adapter,
    count_parameters,
    merge_adapter,
)
from train.config import AdapterConfig, load_config
from train.lycoris_format import lycoris_name

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# LibreFLUX's per-layer choice: factor 1 (a full update) on the ff*/norm1* layers of chosen blocks (here block 1).
FACTOR1 = {"transformer_blocks.1.ff*": 1, "transformer_blocks.1.norm1*": 1}
NORM_TARGETS = ["norm1.linear", "norm1_context.linear", "norm.linear"]


@pytest.fixture(autouse=True)
def _restore_lycoris_presets():
    """apply_preset sets class attributes of LycorisNetwork: restore them so tests do not leak into each other."""
    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys if hasattr(LycorisNetwork, k)}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


def libreflux_adapter(**kw) -> AdapterConfig:
    """configs/libreflux.yaml's adapter, on block 1 and single block 0 of the tiny FLUX."""
    cfg = load_config(REPO / "configs" / "libreflux.yaml").model.adapter
    data = {**cfg.__dict__, "blocks": [1], "single_blocks": [0], **kw}
    return AdapterConfig(**data)


def build_lycoris(model, names, *, factor_pattern=None, **kw):
    LycorisNetwork.apply_preset({
        "target_module": [], "target_name": names, "use_fnmatch": True,
        "name_algo_map": {g: {"factor": f} for g, f in (factor_pattern or {}).items()},
    })
    net = create_lycoris(model, 1.0, algo="lokr", **kw)
    net.apply_to()
    return net


def set_identical_factors(ours, net, seed=0):
    """Random values for every factor, the same in both implementations."""
    g = torch.Generator().manual_seed(seed)
    theirs = {m.lora_name: m for m in net.loras}
    with torch.no_grad():
        for name in adapted_module_names(ours):
            layer, module = ours.get_submodule(name), theirs[lycoris_name(name)]
            for f in FACTORS:
                if "default" in getattr(layer, f):
                    p = getattr(layer, f)["default"]
                    v = torch.randn(p.shape, generator=g) * 0.2
                    p.copy_(v)
                    getattr(module, f).copy_(v)
                else:
                    assert getattr(module, f, None) is None or not isinstance(getattr(module, f), torch.nn.Parameter)


def deltas_ours(model, base):
    merged = merge_adapter(model).state_dict()
    return {k: merged[k] - base[k] for k in base}


def deltas_lycoris(net, base):
    """The weight delta LyCORIS' forward adds (`LokrModule._rebuild_forward`: get_weight, scaled once). Not
    `merge_to`: in lycoris-lora 4.1.3 that path (get_diff_weight) multiplies get_weight's already-scaled update by the
    scale again, so it differs from the trained update wherever scale != 1 (never for LibreFLUX's scale-1 layers)."""
    out = {k: torch.zeros_like(v) for k, v in base.items()}
    names = {lycoris_name(k[: -len(".weight")]): k for k in base if k.endswith(".weight")}
    with torch.no_grad():
        for m in net.loras:
            out[names[m.lora_name]] = m.get_weight(m.shape).float()
    return out


def inputs(seed=1, text_len=5, hw=4):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(hw * hw, 3)
    img_ids[:, 1] = torch.arange(hw).repeat_interleave(hw).float()
    img_ids[:, 2] = torch.arange(hw).repeat(hw).float()
    return dict(hidden_states=torch.randn(2, hw * hw, 16, generator=g),
                encoder_hidden_states=torch.randn(2, text_len, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.rand(2, generator=g),
                img_ids=img_ids, txt_ids=torch.zeros(text_len, 3), return_dict=False)


def compare(cfg: AdapterConfig, lycoris_kw: dict, factor_pattern=None):
    """(max abs delta difference, our trainable count, LyCORIS' parameter count, largest delta)."""
    base = tiny_transformer().state_dict()
    ours = apply_adapter(tiny_transformer(), cfg)
    names = adapted_module_names(ours)
    theirs_model = tiny_transformer()
    net = build_lycoris(theirs_model, names, factor_pattern=factor_pattern, **lycoris_kw)
    assert sorted(m.lora_name for m in net.loras) == sorted(lycoris_name(n) for n in names)
    for m in net.loras:  # same factor shapes, layer by layer
        layer = ours.get_submodule(names[[lycoris_name(n) for n in names].index(m.lora_name)])
        ours_shapes = {f: tuple(getattr(layer, f)["default"].shape) for f in FACTORS if "default" in getattr(layer, f)}
        theirs_shapes = {f: tuple(getattr(m, f).shape) for f in FACTORS if isinstance(getattr(m, f, None), torch.nn.Parameter)}
        assert ours_shapes == theirs_shapes, m.lora_name
    n_ours = count_parameters(ours)[0]
    n_theirs = sum(p.numel() for p in net.parameters() if p.requires_grad)
    set_identical_factors(ours, net)
    x = inputs()
    with torch.no_grad():  # the adapted forwards agree too, not only the weights
        out_diff = (ours(**x)[0] - theirs_model(**x)[0]).abs().max().item()
    assert out_diff <= 1e-5, out_diff
    a, b = deltas_ours(ours, base), deltas_lycoris(net, base)
    diff = max((a[k] - b[k]).abs().max().item() for k in base)
    biggest = max(b[k].abs().max().item() for k in base)
    return diff, n_ours, n_theirs, biggest


def test_libreflux_preset_equals_lycoris_libreflux_settings():
    # LibreFLUX: algo lokr, linear_dim 1e6, linear_alpha 1, factor 2, full_matrix true. The preset says rank 10000.
    diff, n_ours, n_theirs, biggest = compare(
        libreflux_adapter(), dict(linear_dim=1_000_000, linear_alpha=1.0, factor=2, full_matrix=True))
    assert n_ours == n_theirs
    assert biggest > 0.1  # scale 1: a real update (peft's alpha / r would have made it 1e-4 of this)
    assert diff <= 1e-6, diff


def test_low_rank_equals_lycoris():
    # rank 8, alpha 4, factor 2, no full matrix: the 16x16 w2 of the attention layers is full (8 >= 16 / 2), so
    # those layers are full x full (LyCORIS scale 1) while the larger ones are low-rank (scale alpha / rank = 0.5).
    cfg = AdapterConfig(kind="lokr", rank=8, alpha=4.0, lokr_factor=2, blocks=[1], single_blocks=[0])
    diff, n_ours, n_theirs, _ = compare(cfg, dict(linear_dim=8, linear_alpha=4.0, factor=2))
    assert n_ours == n_theirs and diff <= 1e-6, diff
    model = apply_adapter(tiny_transformer(), cfg)
    scales = {g.scale for g in adapter_groups(model, cfg)}
    assert scales == {1.0, 0.5}


def test_low_rank_decompose_both_equals_lycoris():
    cfg = AdapterConfig(kind="lokr", rank=2, alpha=3.0, lokr_factor=-1, lokr_decompose_both=True, blocks=[1],
                        single_blocks=[0])
    diff, n_ours, n_theirs, _ = compare(cfg, dict(linear_dim=2, linear_alpha=3.0, factor=-1, decompose_both=True))
    assert n_ours == n_theirs and diff <= 1e-6, diff


def test_per_layer_factor_1_equals_lycoris_name_algo_map():
    cfg = libreflux_adapter(target_modules=AdapterConfig().target_modules + NORM_TARGETS, lokr_factor_pattern=FACTOR1)
    diff, n_ours, n_theirs, _ = compare(
        cfg, dict(linear_dim=1_000_000, linear_alpha=1.0, factor=2, full_matrix=True), factor_pattern=FACTOR1)
    assert n_ours == n_theirs and diff <= 1e-6, diff
    model = apply_adapter(tiny_transformer(), cfg)
    ff = model.get_submodule("transformer_blocks.1.ff.net.0.proj")  # (128, 32): factor 1 = 1x1 ⊗ the full matrix
    assert tuple(ff.lokr_w1["default"].shape) == (1, 1) and tuple(ff.lokr_w2["default"].shape) == (128, 32)
    q = model.get_submodule("transformer_blocks.1.attn.to_q")
    assert tuple(q.lokr_w1["default"].shape) == (2, 2)


def test_peft_convention_is_the_old_scale():
    groups = adapter_groups(apply_adapter(tiny_transformer(), libreflux_adapter(scale_convention="peft")),
                            libreflux_adapter(scale_convention="peft"))
    assert [g.scale for g in groups] == pytest.approx([1e-4] * len(groups))  # alpha / r = 1 / 10000: the 10,000x weaker update
    groups = adapter_groups(apply_adapter(tiny_transformer(), libreflux_adapter()), libreflux_adapter())
    assert {g.scale for g in groups} == {1.0}


def test_factor_pattern_that_matches_nothing_names_the_key():
    with pytest.raises(ValueError, match="model.adapter.lokr_factor_pattern"):
        apply_adapter(tiny_transformer(), libreflux_adapter(lokr_factor_pattern={"transformer_blocks.7.*": 1}))
