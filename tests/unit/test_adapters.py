"""peft adapters on a tiny FLUX transformer: targets, trainability, no-op init, frozen base, merge."""

import pytest
import torch

from train.adapters import (
    adapted_module_names,
    apply_adapter,
    count_parameters,
    merge_adapter,
    target_module_names,
    trainable_named_parameters,
)
from train.config import AdapterConfig
from tiny_nets import tiny_transformer

DOUBLE_SUFFIXES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
SINGLE_SUFFIXES = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
# With the default target_modules, blocks=[1], single_blocks=[0]:
EXPECTED = sorted(
    [f"transformer_blocks.1.{s}" for s in DOUBLE_SUFFIXES] + [f"single_transformer_blocks.0.{s}" for s in SINGLE_SUFFIXES]
)


def inputs(seed=1, batch=2, text_len=5, hw=4):
    g = torch.Generator().manual_seed(seed)
    n = hw * hw
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(hw).repeat_interleave(hw).float()
    img_ids[:, 2] = torch.arange(hw).repeat(hw).float()
    return dict(
        hidden_states=torch.randn(batch, n, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


def forward(model, x):
    return model(**x)[0]


def adapter_cfg(kind, **kw):
    return AdapterConfig(kind=kind, blocks=[1], single_blocks=[0], **kw)


KINDS = [
    pytest.param(dict(kind="lora", rank=4, alpha=8.0), id="lora"),
    pytest.param(dict(kind="lokr", rank=4, alpha=8.0), id="lokr"),
    pytest.param(dict(kind="lokr", rank=4, alpha=8.0, lokr_factor=2, lokr_full_matrix=True), id="lokr-full"),
]


def perturb_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_named_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kw", KINDS)
def test_only_adapter_params_train_and_targets_are_exact(kw):
    model = apply_adapter(tiny_transformer(), adapter_cfg(**kw))
    assert adapted_module_names(model) == EXPECTED
    trainable = trainable_named_parameters(model)
    prefix = "lora_" if kw["kind"] == "lora" else "lokr_"
    assert trainable and all(f".{prefix}" in n for n, _ in trainable)
    # every adapter parameter trains, and each lives under an expected module
    adapter_params = [n for n, _ in model.named_parameters() if f".{prefix}" in n]
    assert sorted(adapter_params) == sorted(n for n, _ in trainable)
    assert {n.split(f".{prefix}")[0] for n, _ in trainable} == set(EXPECTED)
    n_train, n_total = count_parameters(model)
    assert n_train == sum(p.numel() for _, p in trainable) and 0 < n_train < n_total


def test_lokr_full_matrix_keeps_w2_full():
    model = apply_adapter(tiny_transformer(), adapter_cfg("lokr", rank=2, alpha=2.0, lokr_factor=2,
                                                         lokr_full_matrix=True))
    layer = model.get_submodule("single_transformer_blocks.0.proj_out")  # weight (32, 160)
    assert "default" in layer.lokr_w2 and "default" not in layer.lokr_w2_a
    assert tuple(layer.lokr_w2["default"].shape) == (16, 80)  # factor 2: (2·16) × (2·80)
    assert tuple(layer.lokr_w1["default"].shape) == (2, 2)
    assert layer.scaling["default"] == pytest.approx(2.0 / 2)  # alpha / rank of the config, not of the raised r
    low = apply_adapter(tiny_transformer(), adapter_cfg("lokr", rank=2, alpha=2.0, lokr_factor=2))
    low_layer = low.get_submodule("single_transformer_blocks.0.proj_out")
    assert "default" not in low_layer.lokr_w2 and tuple(low_layer.lokr_w2_a["default"].shape) == (16, 2)


@pytest.mark.parametrize("kw", KINDS)
def test_init_is_noop_and_sgd_step_changes_only_adapters(kw):
    base = tiny_transformer()
    x = inputs()
    with torch.no_grad():
        ref = forward(base, x)
    model = apply_adapter(tiny_transformer(), adapter_cfg(**kw))
    with torch.no_grad():
        out0 = forward(model, x)
    torch.testing.assert_close(out0, ref, atol=1e-6, rtol=0)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = dict(trainable_named_parameters(model))
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(2):  # LoRA's B / LoKr's w1 start at zero: the first step moves only them, the second all
        loss = (forward(model, x) - torch.randn_like(ref, generator=torch.Generator().manual_seed(0))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
            assert p.grad is None, n
    with torch.no_grad():
        assert not torch.allclose(forward(model, x), ref, atol=1e-6)


@pytest.mark.parametrize("kw", KINDS)
def test_merge_equals_adapted_output(kw):
    model = apply_adapter(tiny_transformer(), adapter_cfg(**kw))
    perturb_adapters(model)
    x = inputs()
    with torch.no_grad():
        adapted = forward(model, x)
        base = forward(tiny_transformer(), x)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapter does something
    merged = merge_adapter(model)
    assert adapted_module_names(merged) == []
    assert sorted(merged.state_dict()) == sorted(tiny_transformer().state_dict())  # plain diffusers names again
    assert type(merged.get_submodule("transformer_blocks.1.attn.to_q")) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(forward(merged, x), adapted, atol=1e-5, rtol=0)


def test_full_trains_everything():
    model = apply_adapter(tiny_transformer().requires_grad_(False), AdapterConfig(kind="full"))
    n_train, n_total = count_parameters(model)
    assert n_train == n_total > 0
    assert len(trainable_named_parameters(model)) == len(list(model.parameters()))
    assert adapted_module_names(model) == []


def test_all_blocks_by_default():
    model = apply_adapter(tiny_transformer(), AdapterConfig(kind="lora", rank=2, target_modules=["to_q", "proj_mlp"]))
    assert adapted_module_names(model) == [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.proj_mlp",
        "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
    ]


def test_suffix_matches_whole_name_components_only():
    # "q_proj" is a textual suffix of "add_q_proj" but not a module-name suffix: it must not match.
    with pytest.raises(ValueError, match="model.adapter.target_modules.*'q_proj'"):
        target_module_names(tiny_transformer(), AdapterConfig(kind="lora", target_modules=["to_q", "q_proj"]))


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(target_modules=["to_q", "to_nothing"]), "model.adapter.target_modules"),
        (dict(target_modules=["norm1"]), "model.adapter.target_modules"),  # not an nn.Linear
        (dict(blocks=[0, 2]), "model.adapter.blocks"),
        (dict(blocks=[-1]), "model.adapter.blocks"),
        (dict(single_blocks=[5]), "model.adapter.single_blocks"),
        (dict(blocks=[], single_blocks=[]), "model.adapter.blocks"),
    ],
)
@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_bad_config_names_the_key(kw, key, kind):
    model = tiny_transformer()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        apply_adapter(model, AdapterConfig(kind=kind, **kw))
    assert adapted_module_names(model) == []  # nothing injected before the error
