#!/usr/bin/env python
"""Host memory and time to get the transformer onto the ranks: a whole-model load on every rank (the baseline) vs
the sharded load (train/parallel/load.py), and what the frozen VAE + T5 + CLIP add when the data is not precomputed.

    dedistill tiny-model /tmp/mid --size mid --dtype bf16          # 0.64B transformer, written once (~1.9 GB)
    python bench/load_memory.py --model /tmp/mid --nproc 2         # torchrun, 2 gloo ranks per mode

Each mode runs in fresh processes under torchrun (`--nproc` gloo ranks on this machine):
- `whole`: the baseline: every rank `load_transformer` (all weights), adapter, then FSDP2 `fully_shard`.
- `sharded`: the trainer's path (`train.build.build_model`): meta -> adapter -> fully_shard -> own rows only.
Per rank: seconds from the start of the load to a ready FSDP2 model, peak RSS of the process (`ru_maxrss`: the
imports, the load and everything before it), and then, in the sharded run, the RSS the trainer would add by loading
the VAE, T5 and CLIP (`train.build.load_encoders`), which a precomputed run skips. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(mode: str, model: str, overrides: list[str]) -> None:
    import torch

    from train.adapters import apply_adapter, trainable_named_parameters
    from train.config import load_config
    from train.build import build_model, load_encoders
    from train.model import load_transformer, resolve_dtype
    from train.optim import build_optimizer
    from train.parallel import StepConfig, build_backend
    from train.parallelize import barrier, destroy_distributed, init_distributed

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"model.path={model}", *overrides])
    info = init_distributed(cfg.parallel)
    torch.manual_seed(cfg.seed)
    barrier()
    before = _rss_gib()
    t0 = time.perf_counter()
    if mode == "sharded":
        backend, dtype = build_model(cfg, info)
    else:  # the pre-sharding build_model, verbatim
        dtype = resolve_dtype(cfg.model.dtype, info.device)
        transformer = load_transformer(cfg.model.path, dtype=dtype)
        apply_adapter(transformer, cfg.model.adapter)
        for _, p in trainable_named_parameters(transformer):
            p.data = p.data.float()
        backend = build_backend(
            transformer, cfg.parallel, info=info, compute_dtype=dtype,
            step=StepConfig(micro_batch_size=1, grad_accum=1, grad_clip=1.0, activation_checkpointing=False),
            make_optimizer=lambda params: build_optimizer(params, cfg.optim),
        )
        del transformer
    seconds = time.perf_counter() - t0
    row = {"mode": mode, "rank": info.rank, "load_s": seconds, "rss_before_gib": before, "peak_gib": _peak_gib(),
           "rss_after_gib": _rss_gib(), "params": sum(p.numel() for p in backend.model.parameters())}
    if mode == "sharded":
        rss = _rss_gib()
        frozen = load_encoders(cfg, info, dtype, load=True)
        row["frozen_gib"] = _rss_gib() - rss
        del frozen
    barrier()
    print("ROW " + json.dumps(row), flush=True)
    destroy_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a FLUX pipeline dir (dedistill tiny-model --size mid)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="whole,sharded")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=bf16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.overrides)

    rows = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               __file__, "--worker", mode, "--model", a.model, *a.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        rows += sorted((json.loads(x[4:]) for x in r.stdout.splitlines() if x.startswith("ROW ")),
                       key=lambda x: x["rank"])
    print(f"# load_memory  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  model={a.model}  nproc={a.nproc}  "
          f"overrides={' '.join(a.overrides) or '-'}  params={rows[0]['params']:,}  cpus={os.cpu_count()}")
    print("| mode | rank | load_s | RSS before load GiB | peak RSS GiB | RSS after GiB | + VAE/T5/CLIP GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        frozen = f"{r['frozen_gib']:.2f}" if "frozen_gib" in r else ""
        print(f"| {r['mode']} | {r['rank']} | {r['load_s']:.1f} | {r['rss_before_gib']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['rss_after_gib']:.2f} | {frozen} |")
    peaks = {m: max(r["peak_gib"] for r in rows if r["mode"] == m) for m in {r["mode"] for r in rows}}
    if {"whole", "sharded"} <= peaks.keys():
        print(f"\npeak RSS per rank, sharded / whole: {peaks['sharded'] / peaks['whole']:.2f}")


if __name__ == "__main__":
    main()
