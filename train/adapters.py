"""Which parameters train: a peft LoRA / LoKr adapter injected into the FLUX transformer, or all of it.

Adapters are injected with `peft.inject_adapter_in_model`, which swaps the targeted `nn.Linear`s for peft layers in
place and keeps the diffusers class: per-block FSDP wrapping and `FluxPipeline` work unchanged. Targets are an
explicit list of full module names (`transformer_blocks.3.attn.to_q`), built here from `AdapterConfig`, so what
gets adapted never depends on peft's suffix-matching rules.

LoKr and LyCORIS' `full_matrix`: peft's LoKr builds the second Kronecker factor w2 (out_k × in_n for a Linear whose
weight is (out_l·out_k) × (in_m·in_n)) as one full matrix exactly when r >= max(out_k, in_n) / 2, and as a rank-r
product otherwise (`peft/tuners/lokr/layer.py`, `use_w2`). `lokr_full_matrix=True` therefore raises each targeted
layer's r (peft `rank_pattern`) to that threshold, and raises its alpha (`alpha_pattern`) by the same factor so the
update is still scaled by `alpha / rank` of the config. (LyCORIS itself uses scale 1 when both factors are full;
set `alpha = rank` for that.) With `lokr_decompose_both` the raised r also keeps w1 full, since peft has one r per
layer; w1 is the small factor, so this costs little.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
from torch import nn

from train.config import AdapterConfig

ADAPTER_NAME = "default"
_BLOCK_LISTS = (("transformer_blocks", "blocks"), ("single_transformer_blocks", "single_blocks"))


def _selected_indices(n: int, wanted: list[int] | None, key: str) -> list[int]:
    if wanted is None:
        return list(range(n))
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise ValueError(f"{key}: block index {bad[0]} out of range (the model has {n} blocks: 0..{n - 1})")
    return sorted(set(wanted))


def target_module_names(transformer: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the `nn.Linear`s to adapt: `<blocks>.<i>.<...suffix>` for each selected block and suffix.

    A suffix matches a module whose name inside its block equals it or ends with `.<suffix>` ("to_q" matches
    `attn.to_q`, not `attn.add_q_proj`). Raises ValueError naming the config key for an out-of-range block index or a
    suffix that matches no Linear in the selected blocks.
    """
    selected: list[tuple[str, nn.Module]] = []
    for attr, field in _BLOCK_LISTS:
        blocks = getattr(transformer, attr, None)
        if blocks is None:
            raise ValueError(f"model.adapter.{field}: the model has no '{attr}' (not a FLUX transformer?)")
        for i in _selected_indices(len(blocks), getattr(cfg, field), f"model.adapter.{field}"):
            selected.append((f"{attr}.{i}", blocks[i]))
    if not selected:
        raise ValueError("model.adapter.blocks: together with model.adapter.single_blocks selects no block")

    names: list[str] = []
    hits = {s: 0 for s in cfg.target_modules}
    non_linear: dict[str, str] = {}
    for prefix, block in selected:
        for sub, module in block.named_modules():
            for suffix in cfg.target_modules:
                if sub == suffix or sub.endswith("." + suffix):
                    if isinstance(module, nn.Linear):
                        hits[suffix] += 1
                        names.append(f"{prefix}.{sub}")
                    else:
                        non_linear.setdefault(suffix, type(module).__name__)
    missing = [s for s, n in hits.items() if n == 0]
    if missing:
        s = missing[0]
        why = f"matches a {non_linear[s]}, not an nn.Linear" if s in non_linear else "matches no module"
        raise ValueError(
            f"model.adapter.target_modules: '{s}' {why} in the selected blocks "
            f"(examples of valid suffixes: to_q, to_out.0, ff.net.0.proj, proj_mlp, proj_out, norm1.linear)"
        )
    return sorted(set(names))


def _lokr_full_matrix_patterns(
    transformer: nn.Module, names: list[str], cfg: AdapterConfig
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-layer r and alpha that make peft keep LoKr's w2 a full matrix (see the module docstring)."""
    from peft.tuners.lokr.layer import factorization

    ranks, alphas = {}, {}
    for name in names:
        lin = transformer.get_submodule(name)
        _, out_k = factorization(lin.out_features, cfg.lokr_factor)
        _, in_n = factorization(lin.in_features, cfg.lokr_factor)
        r = max(cfg.rank, math.ceil(max(out_k, in_n) / 2))
        key = re.escape(name)  # peft matches pattern keys as regexes against the full module name
        ranks[key] = r
        alphas[key] = cfg.alpha * r / cfg.rank
    return ranks, alphas


def _peft_config(transformer: nn.Module, names: list[str], cfg: AdapterConfig):
    if cfg.kind == "lora":
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=names,
            init_lora_weights=cfg.init_weights,
        )
    if cfg.kind == "lokr":
        from peft import LoKrConfig

        ranks, alphas = _lokr_full_matrix_patterns(transformer, names, cfg) if cfg.lokr_full_matrix else ({}, {})
        return LoKrConfig(
            r=cfg.rank,
            alpha=cfg.alpha,
            rank_dropout=cfg.dropout,
            target_modules=names,
            decompose_factor=cfg.lokr_factor,
            decompose_both=cfg.lokr_decompose_both,
            init_weights=cfg.init_weights,
            rank_pattern=ranks,
            alpha_pattern=alphas,
        )
    raise ValueError(f"model.adapter.kind: {cfg.kind!r} is not one of lora, lokr, full")


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _cpu_stand_ins(transformer: nn.Module, names: list[str]):
    """Base weights of the targeted Linears as zero-byte CPU stand-ins while peft injects the adapter.

    peft creates each adapter on the CPU, initialises it, then moves it to its base layer's device (and dtype). On a
    transformer built on `meta` (sharded loading) that move would discard the initial values; with a stand-in of the
    right shape and dtype on the CPU (a stride-0 view of one element, never read: LoRA/LoKr inits do not look at the
    base weight) the adapter stays real, with exactly the values the unsharded path draws. The meta weights are put
    back afterwards.
    """
    saved = []
    for name in names:
        lin = transformer.get_submodule(name)
        if lin.weight.is_meta:
            saved.append((lin, lin.weight))
            stand_in = torch.empty((), dtype=lin.weight.dtype).expand(lin.weight.shape)
            lin.weight = nn.Parameter(stand_in, requires_grad=False)
    try:
        yield
    finally:
        for lin, weight in saved:
            lin.weight = weight


def apply_adapter(transformer: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Make `transformer` trainable as `cfg` says, in place; returns it.

    lora / lokr: inject the adapter into the selected Linears; only adapter parameters require grad. On a
    transformer built on `meta`, the adapter's weights are still created and initialised on the CPU (they are small;
    the sharded loader hands them to the shards), drawing the same random numbers as on a loaded transformer.
    full: every parameter requires grad, no peft.
    """
    if cfg.kind == "full":
        transformer.requires_grad_(True)
        return transformer
    from peft import inject_adapter_in_model

    names = target_module_names(transformer, cfg)
    config = _peft_config(transformer, names, cfg)
    with _cpu_stand_ins(transformer, names):
        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    transformer.requires_grad_(False)
    layers = _tuner_layers(transformer)
    assert sorted(n for n, _ in layers) == names, "peft adapted a different set of modules than requested"
    for _, layer in layers:
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if ADAPTER_NAME in container:
                container[ADAPTER_NAME].requires_grad_(True)
    return transformer


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry a peft adapter (empty for full fine-tuning or a merged model)."""
    return sorted(n for n, _ in _tuner_layers(model))


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, in `named_parameters` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (FSDP2 DTensors count their global size)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every peft adapter into its base Linear's weight and put the plain Linear back, in place; returns model.

    For export: the result has the original diffusers module names and no peft layers. Not for FSDP-sharded models
    (gather to one process first).
    """
    for name, layer in _tuner_layers(model):
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model
