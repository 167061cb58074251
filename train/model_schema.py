"""The transformer config schema: every size in a model dir's `transformer/config.json` is checked against finite
bounds before anything is built from it.

A config is data someone else wrote. `num_layers: 100000` builds for minutes even on the meta device, and
`joint_attention_dim: 2**31` asks for tens of GiB as soon as weights are allocated; a list or a string where a number
belongs fails deep inside diffusers. Checked here, each is one line naming the key, before the transformer class is
touched. The bounds are generous (FLUX.2 dev has 8 + 48 blocks, width 6144, joint_attention_dim 15360) but finite.

`BOUNDS` holds the keys every FLUX-like transformer shares; `CLASS_BOUNDS` adds each transformer class's own keys
(a family row's `transformer_class`). Keys not named here are left to diffusers, which ignores unknown ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_BLOCKS = 1024
MAX_WIDTH = 65536


@dataclass(frozen=True)
class Bound:
    lo: int
    hi: int
    kind: str = "int"
    """int | bool | ints (a list of ints, each in [lo, hi], at most 16 of them) | number."""
    optional: bool = False
    """null is allowed (diffusers then derives it, e.g. out_channels)."""


BOUNDS: dict[str, Bound] = {
    "patch_size": Bound(1, 16),
    "in_channels": Bound(1, 4096),
    "out_channels": Bound(1, 4096, optional=True),
    "num_layers": Bound(0, MAX_BLOCKS),
    "num_single_layers": Bound(0, MAX_BLOCKS),
    "attention_head_dim": Bound(1, 1024),
    "num_attention_heads": Bound(1, 1024),
    "joint_attention_dim": Bound(1, MAX_WIDTH),
    "axes_dims_rope": Bound(1, 1024, kind="ints"),
}

CLASS_BOUNDS: dict[str, dict[str, Bound]] = {
    "FluxTransformer2DModel": {
        "pooled_projection_dim": Bound(1, MAX_WIDTH),
        "guidance_embeds": Bound(0, 1, kind="bool"),
    },
    "ChromaTransformer2DModel": {
        "approximator_num_channels": Bound(1, 4096),
        "approximator_hidden_dim": Bound(1, MAX_WIDTH),
        "approximator_layers": Bound(0, MAX_BLOCKS),
    },
}


def _check(key: str, value: Any, b: Bound) -> None:
    if value is None and b.optional:
        return
    if b.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r:.60}")
        return
    if b.kind == "ints":
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16:
            raise ValueError(f"{key}: expected a list of 1 to 16 integers, got {value!r:.60}")
        for i, v in enumerate(value):
            _check(f"{key}[{i}]", v, Bound(b.lo, b.hi))
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer, got {value!r:.60}")
    if not b.lo <= value <= b.hi:
        raise ValueError(f"{key}: {value} is outside [{b.lo}, {b.hi}]")


def check_transformer_config(config: Any, *, where: str) -> dict:
    """`config` (a parsed transformer/config.json) if every size in it is within bounds; else ValueError naming
    `where` and the key. Nothing is built or allocated."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object of transformer settings, got a {type(config).__name__}")
    name = config.get("_class_name")
    bounds = {**BOUNDS, **(CLASS_BOUNDS.get(name, {}) if isinstance(name, str) else {})}
    for key, b in bounds.items():
        if key in config:
            _check(f"{where}: {key}", config[key], b)
    width = config.get("num_attention_heads", 1) * config.get("attention_head_dim", 1)
    if width > MAX_WIDTH:
        raise ValueError(f"{where}: num_attention_heads x attention_head_dim: {width} is over {MAX_WIDTH}")
    return config
