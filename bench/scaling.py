#!/usr/bin/env python
"""The tables of docs/scaling.md: per-step FSDP2/HSDP communication, compute, modelled efficiency and memory margins
of the shipped presets at 8, 64 and 512 H100s, all from tools/plan.py (the same functions `dedistill plan` prints).

    python bench/scaling.py            # markdown to stdout (docs/scaling.md holds this output verbatim)

Assumptions (tools/plan.py: `Cluster`, `step_timing`): 8 GPUs and 8 InfiniBand NICs per node; NVLink at NCCL's bus
bandwidth, 360 GB/s one way (450 nominal); InfiniBand 400 Gb/s = 50 GB/s per NIC one way; 5 us per ring step; NCCL on
16 of 132 SMs while it overlaps compute; compute at 40 % of 989 TFLOP/s; text at the preset's max_text_tokens (the
worst case a trimmed batch reaches). Each phase hides only its own collectives. A model, not a measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = ["lora-1gpu", "libreflux", "openflux", "full-fsdp-multinode"]
WORLDS = [(1, 8), (8, 8), (64, 8)]
LAYOUTS = [  # (label, overrides)
    ("FSDP, reshard", ["parallel.hsdp=false", "parallel.reshard_after_forward=true"]),
    ("FSDP, no reshard", ["parallel.hsdp=false", "parallel.reshard_after_forward=false"]),
    ("HSDP, reshard", ["parallel.hsdp=true", "parallel.reshard_after_forward=true"]),
    ("HSDP, no reshard", ["parallel.hsdp=true", "parallel.reshard_after_forward=false"]),
]


def _plans():
    from train.config import load_config
    from tools.plan import Cluster, inventory, make_plan, transformer_config

    for preset in PRESETS:
        path = REPO / "configs" / f"{preset}.yaml"
        base = load_config(path)
        inv = inventory(transformer_config(base)[0], base)
        for nodes, per_node in WORLDS:
            cluster = Cluster(nodes=nodes, gpus_per_node=per_node)
            for label, overrides in LAYOUTS:
                if nodes == 1 and label.startswith("HSDP"):
                    continue  # one node: HSDP is FSDP
                for batch in (None, 1, 2, 4):
                    extra = [] if batch is None else [f"train.batch_size={batch}"]
                    cfg = load_config(path, overrides + extra)
                    yield preset, label, batch, make_plan(cfg, cluster, precomputed=True, inv=inv)


def _margins() -> list[str]:
    """The rows at the margin of the card for the full fine-tune, with and without activation checkpointing."""
    from train.config import load_config
    from tools.plan import GiB, USABLE_FRACTION, Cluster, inventory, make_plan, transformer_config

    path = REPO / "configs" / "full-fsdp-multinode.yaml"
    base = load_config(path)
    inv = inventory(transformer_config(base)[0], base)
    out = ["| config | activations kept | recomputed block | activation gradients | AdamW temporary | CUDA + NCCL | "
           "total GiB | ≤ 92 % of 80 GiB (73.6) | fits |", "|---|---|---|---|---|---|---|---|---|"]
    cases = [
        ("HSDP 8×8, AC, batch 2 (preset)", [], None),
        ("HSDP 8×8, AC, batch 2, foreach AdamW", ["optim.implementation=foreach"], None),
        ("HSDP 8×8, no AC, batch 1", ["train.activation_checkpointing=false", "train.batch_size=1"], None),
        ("FSDP 1×8, no AC, batch 1", ["train.activation_checkpointing=false", "train.batch_size=1",
                                     "parallel.hsdp=false"], Cluster(nodes=1, gpus_per_node=8)),
        ("HSDP 8×8, AC, batch 2, grad_accum 4", ["train.grad_accum=4"], None),
    ]
    for label, overrides, cluster in cases:
        p = make_plan(load_config(path, overrides), cluster or Cluster(nodes=8, gpus_per_node=8), precomputed=True,
                      inv=inv)
        r = p.memory.rows
        get = lambda part: next(v for k, v in r.items() if part in k) / GiB  # noqa: E731
        out.append(f"| {label} | {get('activations (kept'):.2f} | {get('backward working set'):.2f} | "
                   f"{get('activation gradients'):.2f} | {get('step temporary'):.2f} | {get('CUDA context'):.2f} | "
                   f"{p.memory.total / GiB:.2f} | {USABLE_FRACTION * 80 - p.memory.total / GiB:+.2f} | "
                   f"{'yes' if p.verdict == 'fits' else 'no'} |")
    return out


def tables() -> str:
    from tools.plan import GiB

    rows, best = [], {}
    for preset, label, batch, p in _plans():
        eff = p.timing.compute_s / p.timing.step_s
        key = (preset, p.cluster.world)
        if batch is not None:
            if eff >= 0.9 and p.verdict == "fits":
                cand = (batch, -eff, label)
                best[key] = min(best.get(key, cand), cand)
            continue
        c, t = p.comm, p.timing
        link = "NVLink" if c.intra_node else "NVLink+IB"
        fwd = next(ph for ph in t.phases if ph[0] == "forward")
        bwd = next(ph for ph in t.phases if ph[0].startswith("backward"))
        rows.append(
            f"| {preset} | {p.cluster.world} | {label} | {p.cfg.train.batch_size} | {c.all_gather / 1e9:.1f} | "
            f"{c.reduce_scatter / 1e9:.2f} | {c.all_reduce / 1e9:.2f} | {link} | {sum(c.calls)} | "
            f"{fwd[1] * 1e3:.0f} / {fwd[2] * 1e3:.0f} | {bwd[1] * 1e3:.0f} / {bwd[2] * 1e3:.0f} | "
            f"{t.exposed_s * 1e3:.0f} | {eff:.0%} | {p.memory.total / GiB:.1f} | "
            f"{'yes' if p.verdict == 'fits' else 'no'} |")
    head = ("| preset | GPUs | layout | batch/GPU | all-gather GB | reduce-scatter GB | all-reduce GB | AG/RS links | "
            "collectives | forward compute / comm ms | backward+recompute compute / comm ms | exposed ms | "
            "efficiency | GiB/GPU | fits 80 GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = ["### Per step, per GPU (preset batch; modelled)", "", head, *rows, "",
           "### Smallest batch per GPU that keeps the modelled efficiency ≥ 90 % and fits 80 GiB", "",
           "| preset | GPUs | batch/GPU | layout | efficiency |", "|---|---|---|---|---|"]
    for preset in PRESETS:
        for nodes, per_node in WORLDS:
            world = nodes * per_node
            b = best.get((preset, world))
            out.append(f"| {preset} | {world} | {b[0]} | {b[2]} | {-b[1]:.0%} |" if b else
                       f"| {preset} | {world} | none ≤ 4 | — | — |")
    out += ["", "### Memory at the margins: full-fsdp-multinode at 64 GPUs, precomputed data (GiB per GPU)", "",
            *_margins()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(), end="")
