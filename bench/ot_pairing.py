#!/usr/bin/env python
"""Cost of minibatch OT noise pairing (`objective.noise_pairing`) per micro-batch, on CPU.

    python bench/ot_pairing.py            # FLUX latents (16×64×64 at 512², 16×128×128 at 1024²), batches 1..64
    python bench/ot_pairing.py --tiny     # small latents, a few seconds (CI)

Times `train.objective.pair_noise` exactly as the step calls it, split into its two parts: the (B, B) cost matrix
(float64 matmul over the flattened latents; on a GPU run this part runs on the GPU) and scipy's Hungarian solver
`linear_sum_assignment` (always on the CPU). Times are wall-clock medians; "total CPU ms" is the process's CPU time
for the whole call (all threads), the better figure on a machine whose cores are shared. Batch sizes: the presets'
micro-batches (libreflux 1, openflux and full-fsdp-multinode 2, lora-1gpu 4) and 64 (a large
batch, for reference). Prints a header and one markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from train import objective  # noqa: E402


def _median_s(fn, reps: int, clock=time.perf_counter) -> float:
    fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


def bench(latent: tuple[int, int, int], batch: int, pairing: str, reps: int) -> dict:
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(0)
    c, h, w = latent
    x0 = torch.randn(batch, (h // 2) * (w // 2), c * 4, generator=g)  # packed, as the step holds them
    noise = torch.randn(x0.shape, generator=g)
    cost = objective.pairing_cost(x0, noise, pairing).numpy()
    return {
        "cost_ms": 1e3 * _median_s(lambda: objective.pairing_cost(x0, noise, pairing), reps),
        "solve_ms": 1e3 * _median_s(lambda: linear_sum_assignment(cost), reps),
        "total_ms": 1e3 * _median_s(lambda: objective.pair_noise(x0, noise, pairing), reps),
        # CPU time of this process (all threads): what the pairing costs when the cores are not shared.
        "cpu_ms": 1e3 * _median_s(lambda: objective.pair_noise(x0, noise, pairing), reps, time.process_time),
        "gain": float(cost.diagonal().mean() - cost[linear_sum_assignment(cost)].mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small latents and batches (a few seconds)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.tiny:
        cases = [("tiny 4×16×16", (4, 16, 16), b) for b in (2, 8)]
    else:
        cases = [("512² 16×64×64", (16, 64, 64), b) for b in (1, 2, 4, 64)]
        cases += [("1024² 16×128×128", (16, 128, 128), b) for b in (1, 2, 64)]
    cpu = platform.processor() or platform.machine()
    omp = os.environ.get("OMP_NUM_THREADS", "-")
    print(f"# OT noise pairing — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {cpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={omp}")
    print()
    print("### pair_noise per micro-batch (CPU, median of reps)")
    print("| latents | batch | pairing | cost matrix ms | assignment ms | total ms | total CPU ms "
          "| mean cost gain vs identity |")
    print("|---|---|---|---|---|---|---|---|")
    for name, latent, batch in cases:
        for pairing in ("ot_cosine", "ot_l2"):
            r = bench(latent, batch, pairing, a.reps)
            parts = f"{r['cost_ms']:.2f} | {r['solve_ms']:.3f}" if batch > 1 else "- | -"  # B = 1: nothing to pair
            print(f"| {name} | {batch} | {pairing} | {parts} | {r['total_ms']:.2f} | {r['cpu_ms']:.1f} "
                  f"| {r['gain']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
