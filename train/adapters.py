"""Which parameters train: a peft LoRA / LoKr adapter injected into the transformer (FLUX or Chroma), or all of it.

Adapters are injected with `peft.inject_adapter_in_model`, which swaps the targeted `nn.Linear`s for peft layers in
place and keeps the diffusers class: per-block FSDP wrapping and the family's pipeline work unchanged. Targets are an
explicit list of full module names (`transformer_blocks.3.attn.to_q`), built here from `AdapterConfig`, so what
gets adapted never depends on peft's suffix-matching rules.

LoKr, read the way LyCORIS users read it (LibreFLUX trained with LyCORIS; ComfyUI applies LoKr files by the same rules):
- Shapes. A Linear of weight (out_l·out_k) × (in_m·in_n) gets w1 (out_l × in_m) ⊗ w2 (out_k × in_n), the pairs from
  `factorization(dim, factor)` (identical in peft and LyCORIS). peft keeps a factor a full matrix exactly when
  LyCORIS does for the same r (`use_w2 = r >= max(out_k, in_n) / 2`; w1 full unless decompose_both), so
  `lokr_full_matrix=True` (LyCORIS `full_matrix`) raises each layer's peft r to that threshold.
- Scale. LyCORIS scales the Kronecker update by 1 whenever both factors are full matrices, whatever `linear_alpha`
  says, and by alpha / rank otherwise; peft always by alpha / r. With `scale_convention: lycoris` (the default)
  each layer's peft alpha is set so that alpha / r is LyCORIS's scale; with `peft` it is
  alpha / rank of the config on every layer. So LibreFLUX's settings (linear_dim 1e6, linear_alpha 1, factor 2,
  full_matrix) give scale 1 here too, not 1e-6.
- Per-layer factor. peft's LoKrConfig has one `decompose_factor`; `lokr_factor_pattern` (LyCORIS `name_algo_map`
  globs) therefore splits the targets into groups of equal (factor, r, alpha) and injects each group with its own
  config under the same adapter name. Every layer is still one peft LoKr layer; only which config built it differs.
- Init. peft starts w1 at zero and w2 random; LyCORIS the other way round. Both make the adapter a no-op at step 0;
  `init_from` starts from a LyCORIS file instead (`load_lycoris_lokr`).
`adapter_groups` reports each group's effective scale and parameter count; the trainer prints them at start.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from train.config import AdapterConfig
from train.family import family_of_model

ADAPTER_NAME = "default"
_CONFIG_FIELDS = ("blocks", "single_blocks")  # index the family's two block lists, double-stream first


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
    family = family_of_model(transformer)
    selected: list[tuple[str, nn.Module]] = []
    for attr, field in zip(family.block_lists, _CONFIG_FIELDS):
        blocks = getattr(transformer, attr)
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
            f"(valid suffixes in a {family.name} transformer: {family.adapter_examples})"
        )
    return sorted(set(names))


@dataclass(frozen=True)
class LoKrLayerPlan:
    """How one Linear is adapted by LoKr: peft's r and alpha for it, and the scale alpha / r that results."""

    name: str
    factor: int
    r: int
    alpha: float
    scale: float
    w1_full: bool
    w2_full: bool


def _linear(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def lokr_factor_for(name: str, cfg: AdapterConfig) -> int:
    """The first `lokr_factor_pattern` glob matching the full module name sets the factor (LyCORIS's name_algo_map
    order: an exact name first, then the globs in order); otherwise `lokr_factor`."""
    if name in cfg.lokr_factor_pattern:
        return cfg.lokr_factor_pattern[name]
    for glob, factor in cfg.lokr_factor_pattern.items():
        if fnmatch.fnmatchcase(name, glob):
            return factor
    return cfg.lokr_factor


def plan_lokr(transformer: nn.Module, names: list[str], cfg: AdapterConfig) -> list[LoKrLayerPlan]:
    """Per-layer factor, r, alpha and scale (see the module docstring for the LyCORIS rules they follow)."""
    # deferred: peft takes seconds to import, and only building or reading an adapter needs it
    from peft.tuners.lokr.layer import factorization

    plans = []
    for name in names:
        lin = _linear(transformer.get_submodule(name))
        factor = lokr_factor_for(name, cfg)
        out_l, out_k = factorization(lin.out_features, factor)
        in_m, in_n = factorization(lin.in_features, factor)
        r = max(cfg.rank, math.ceil(max(out_k, in_n) / 2)) if cfg.lokr_full_matrix else cfg.rank
        w2_full = r >= max(out_k, in_n) / 2
        w1_full = not (cfg.lokr_decompose_both and r < max(out_l, in_m) / 2)
        both_full = w1_full and w2_full
        scale = 1.0 if cfg.scale_convention == "lycoris" and both_full else cfg.alpha / cfg.rank
        plans.append(LoKrLayerPlan(name=name, factor=factor, r=r, alpha=scale * r, scale=scale,
                                   w1_full=w1_full, w2_full=w2_full))
    unused = [g for g in cfg.lokr_factor_pattern if not any(p.name == g or fnmatch.fnmatchcase(p.name, g)
                                                              for p in plans)]
    if unused:
        raise ValueError(f"model.adapter.lokr_factor_pattern: {unused[0]!r} matches none of the adapted layers "
                         f"(full names such as {names[0]!r})")
    return plans


def _lokr_configs(plans: list[LoKrLayerPlan], cfg: AdapterConfig):
    """One peft LoKrConfig per (factor, r, alpha): peft has a single decompose_factor per config, and per-layer
    `rank_pattern` keys are regexes that peft recompiles for every layer (minutes for FLUX's 400+ layers)."""
    # deferred: peft takes seconds to import, and only building or reading an adapter needs it
    from peft import LoKrConfig

    groups: dict[tuple[int, int, float], list[str]] = {}
    for p in plans:
        groups.setdefault((p.factor, p.r, p.alpha), []).append(p.name)
    return [
        LoKrConfig(
            r=r,
            alpha=alpha,
            rank_dropout=cfg.dropout,
            target_modules=names,
            decompose_factor=factor,
            decompose_both=cfg.lokr_decompose_both,
            init_weights=cfg.init_weights,
        )
        for (factor, r, alpha), names in groups.items()
    ]


def _peft_configs(transformer: nn.Module, names: list[str], cfg: AdapterConfig) -> list:
    if cfg.kind == "lora":
        # deferred: peft takes seconds to import, and only building or reading an adapter needs it
        from peft import LoraConfig

        return [LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=names,
            init_lora_weights=cfg.init_weights,
        )]
    if cfg.kind == "lokr":
        return _lokr_configs(plan_lokr(transformer, names, cfg), cfg)
    raise ValueError(f"model.adapter.kind: {cfg.kind!r} is not one of lora, lokr, full")


def _tuner_layers(model: nn.Module):
    # deferred: peft takes seconds to import, and only building or reading an adapter needs it
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
        lin = _linear(transformer.get_submodule(name))
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
    full: every parameter requires grad, no peft, except those under a `cfg.frozen` prefix.
    """
    if cfg.kind == "full":
        transformer.requires_grad_(True)
        for prefix in cfg.frozen:
            matched = [p for n, p in transformer.named_parameters() if n.startswith(prefix)]
            if not matched:
                raise ValueError(f"model.adapter.frozen: {prefix!r} is the start of no parameter name "
                                 f"(e.g. time_text_embed., transformer_blocks.0.)")
            for p in matched:
                p.requires_grad_(False)
        return transformer
    # deferred: peft takes seconds to import, and only building or reading an adapter needs it
    from peft import inject_adapter_in_model

    names = target_module_names(transformer, cfg)
    configs = _peft_configs(transformer, names, cfg)
    for i, config in enumerate(configs):
        with warnings.catch_warnings():
            if i:  # the groups share one adapter name on disjoint layers; peft warns about a second config
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            with _cpu_stand_ins(transformer, sorted(config.target_modules)):  # this group's layers
                inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    transformer.requires_grad_(False)
    layers = _tuner_layers(transformer)
    assert sorted(n for n, _ in layers) == names, "peft adapted a different set of modules than requested"
    if cfg.kind == "lokr":
        for plan in plan_lokr(transformer, names, cfg):
            layer = transformer.get_submodule(plan.name)
            assert math.isclose(layer.scaling[ADAPTER_NAME], plan.scale, rel_tol=1e-9), plan
            assert (ADAPTER_NAME in layer.lokr_w1, ADAPTER_NAME in layer.lokr_w2) == (plan.w1_full, plan.w2_full), plan
    for _, layer in layers:
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if ADAPTER_NAME in container:
                container[ADAPTER_NAME].requires_grad_(True)
    return transformer


@dataclass(frozen=True)
class AdapterGroup:
    """Layers that share an adapter form and effective scale (the update is scale × the factors' product)."""

    kind: str
    form: str
    scale: float
    layers: int
    parameters: int

    def line(self) -> str:
        if self.kind == "full":
            return f"full: {self.form} trains, {self.parameters:,} trainable"
        return (f"{self.kind} {self.form}: effective scale {self.scale:g} on {self.layers} layers, "
                f"{self.parameters:,} trainable")


def _numel(p: torch.Tensor) -> int:
    return p.numel()  # DTensors (FSDP2) and meta tensors report their global size


def adapter_groups(transformer: nn.Module, cfg: AdapterConfig) -> list[AdapterGroup]:
    """Each adapted layer group's effective scale and trainable parameters, as the trainer prints them at start."""
    if cfg.kind == "full":
        n = sum(_numel(p) for p in transformer.parameters() if p.requires_grad)
        form = "every parameter" + (f" but those under {', '.join(cfg.frozen)}" if cfg.frozen else "")
        return [AdapterGroup(kind="full", form=form, scale=1.0, layers=0, parameters=n)]
    groups: dict[tuple[str, float], list[int]] = {}
    plans = {p.name: p for p in plan_lokr(transformer, adapted_module_names(transformer), cfg)} \
        if cfg.kind == "lokr" else {}
    for name, layer in _tuner_layers(transformer):
        n = sum(_numel(p) for p in layer.parameters() if p.requires_grad)
        if cfg.kind == "lokr":
            p = plans[name]
            form = (f"factor {p.factor}, w1 {'full' if p.w1_full else f'rank {p.r}'}, "
                    f"w2 {'full' if p.w2_full else f'rank {p.r}'}")
        else:
            form = f"rank {layer.r[ADAPTER_NAME]}"
        key = (form, float(layer.scaling[ADAPTER_NAME]))
        groups.setdefault(key, [0, 0])
        groups[key][0] += 1
        groups[key][1] += n
    return [AdapterGroup(kind=cfg.kind, form=form, scale=scale, layers=c, parameters=n)
            for (form, scale), (c, n) in sorted(groups.items())]


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
