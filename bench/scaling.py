#!/usr/bin/env python
"""The tables of docs/scaling.md: per-step FSDP2/HSDP communication, compute and weak-scaling efficiency of the
shipped presets at 8, 64 and 512 H100s, all from tools/plan.py (the same functions `dedistill plan` prints).

    python bench/scaling.py            # markdown to stdout (docs/scaling.md holds this output verbatim)

Assumptions (tools/plan.py: `step_timing`): 8 GPUs per node; NVLink 900 GB/s and InfiniBand 400 Gb/s per GPU at
their nominal rates; compute at 40 % MFU of 989 TFLOP/s; text at the preset's max_text_tokens (the worst case a
trimmed batch reaches); communication overlaps compute except one unit's all-gather and reduce-scatter per step.
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
        c = p.comm
        link = "NVLink" if c.intra_node else "IB"
        rows.append(
            f"| {preset} | {p.cluster.world} | {label} | {p.cfg.train.batch_size} | {c.all_gather / 1e9:.1f} | "
            f"{c.reduce_scatter / 1e9:.2f} | {c.all_reduce / 1e9:.2f} | {link} | {p.timing.comm_s * 1e3:.0f} | "
            f"{p.timing.compute_s * 1e3:.0f} | {p.timing.exposed_s * 1e3:.0f} | {eff:.0%} | "
            f"{p.memory.total / GiB:.1f} | {'yes' if p.verdict == 'fits' else 'no'} |")
    head = ("| preset | GPUs | layout | batch/GPU | all-gather GB | reduce-scatter GB | all-reduce GB | AG/RS link | "
            "comm ms | compute ms | exposed ms | efficiency | GiB/GPU | fits 80 GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = ["### Per step, per GPU (preset batch)", "", head, *rows, "",
           "### Smallest batch per GPU that keeps efficiency ≥ 90 % and fits 80 GiB", "",
           "| preset | GPUs | batch/GPU | layout | efficiency |", "|---|---|---|---|---|"]
    for preset in PRESETS:
        for nodes, per_node in WORLDS:
            world = nodes * per_node
            b = best.get((preset, world))
            out.append(f"| {preset} | {world} | {b[0]} | {b[2]} | {-b[1]:.0%} |" if b else
                       f"| {preset} | {world} | none ≤ 4 | — | — |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(), end="")
