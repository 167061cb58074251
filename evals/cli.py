"""`dedistill eval` and `dedistill fid` (registered into launch/cli.py's parser by `register`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from evals import fid
from train.config import ParallelConfig
from train.parallelize import destroy_distributed, init_distributed


def register(sub) -> None:
    s = sub.add_parser(
        "eval", help="run an eval suite on checkpoints or model dirs (FID, CLIP score, CFG grids, plots)",
        description="Without --out, each --checkpoint must belong to a run: results go to <run_dir>/evals/step_N/<suite>/, "
        "its TensorBoard and plots. With --out, every --checkpoint (checkpoint, run dir or diffusers dir, e.g. "
        "FLUX.1-schnell) is evaluated into DIR and compared in DIR/report.md. Under torchrun the prompts are split "
        "across ranks (each rank holds a full copy of the model).",
    )
    s.add_argument("suite", help="suite YAML, or a preset name in configs/evals/ (e.g. tiny)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides of the suite (e.g. num_samples=1000)")
    s.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="checkpoint dir, run dir (its newest checkpoint) or diffusers model dir; repeat to compare")
    s.add_argument("--out", default=None, metavar="DIR", help="write a comparison report (report.md + plots) here")
    s.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    s.set_defaults(func=cmd_eval)
    fid.register(sub)


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def cmd_eval(a) -> None:
    # deferred: the suite loads matplotlib and the samplers (~1 s), and `dedistill --help` imports this module
    from evals.report import write_report
    from evals.suite import evaluate, evaluate_into_run, load_suite, resolve_target

    suite = load_suite(a.suite, a.overrides)
    targets = [resolve_target(p) for p in a.checkpoint]  # every path checked before any model loads
    if a.out is None:
        bad = [str(t.path) for t in targets if t.checkpoint is None]
        if bad:
            raise ValueError(f"--out: required for model dirs that are not run checkpoints ({', '.join(bad)})")

    rank, world, device = 0, 1, torch.device(a.device) if a.device else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: split prompts across ranks
        info = init_distributed(ParallelConfig())
        rank, world, device = info.rank, info.world_size, device or info.device
    try:
        if a.out is None:
            for t in targets:
                evaluate_into_run(suite, t.path, device=device, rank=rank, world=world)
            return
        out = Path(a.out)
        entries, taken = [], set()
        for t in targets:
            sub = _slug(t.label, taken)
            m = evaluate(suite, t, out_dir=out / sub, device=device, rank=rank, world=world)
            if m is not None:
                entries.append((sub, m))
        if rank == 0:
            print(write_report(out, entries))
    finally:
        if world > 1:
            destroy_distributed()
