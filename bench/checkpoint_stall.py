#!/usr/bin/env python
"""How long a checkpoint stops the training loop: synchronous DCP saves vs `checkpoint.async_save`, against a step.

    dedistill tiny-model /tmp/mid --size mid --dtype bf16
    dedistill tiny-data /tmp/tdata --n 16
    python bench/checkpoint_stall.py --model /tmp/mid --src /tmp/tdata --work /tmp/stall

Runs the real trainer (`python -m train`, torchrun, `--nproc` gloo ranks) twice on the same job: random precomputed
FLUX-width data (`dataset_tools.precompute.precompute_random`), LoRA rank 128 on every block (55M trainable
parameters on the mid model: with AdamW moments and EMA a 0.9 GB checkpoint, so the write is not trivial), bf16
weights, a checkpoint after every step. The loop's own measurement is read
back: `checkpoint/blocked_s` (from the save call to its return; async: the staging only) and `train/step_time_s`
from TensorBoard, and the checkpoint size on disk. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.run_dir import RunDir  # noqa: E402


def _scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run_dir).tensorboard))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--src", required=True, help="any MDS dataset with captions (e.g. dedistill tiny-data)")
    ap.add_argument("--work", required=True, help="scratch dir (data and runs; replaced)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from dataset_tools.precompute import precompute_random

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    precompute_random(a.model, a.src, work / "data", resolution=64, max_text_tokens=a.text_tokens)
    rows = []
    for mode in ("sync", "async"):
        run = work / mode
        over = [f"model.path={a.model}", f"data.local={work / 'data'}", f"run_dir={run}",
                f"train.max_steps={a.steps}", "checkpoint.every_steps=1", f"checkpoint.keep_last={a.steps}",
                f"checkpoint.async_save={'true' if mode == 'async' else 'false'}", "train.batch_size=1",
                "train.log_every=1", "train.progress_bar=false", "sample.at_end=false",
                f"objective.max_text_tokens={a.text_tokens}", "model.adapter.kind=lora",
                "model.adapter.rank=128", "model.adapter.alpha=128", "parallel.reshard_after_forward=false",
                "ema.decay=0.9",
                *a.overrides]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               "-m", "train", str(REPO / "configs" / "tiny-cpu.yaml"), *over]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        trainable = next(x for x in r.stdout.splitlines() if "trainable=" in x).split("trainable=")[1].split()[0]
        blocked, steps = _scalars(run, "checkpoint/blocked_s"), _scalars(run, "train/step_time_s")
        size = sum(f.stat().st_size for f in RunDir(run).checkpoint(a.steps).iterdir())
        rows.append((mode, trainable, size, blocked, steps))
    print(f"# checkpoint_stall  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  model={a.model}  nproc={a.nproc}  "
          f"steps={a.steps}  cpus={os.cpu_count()}")
    print("| mode | trainable/total | checkpoint MiB | loop blocked per save s (each) | step s (median) | "
          "blocked / step |")
    print("|---|---|---|---|---|---|")
    for mode, trainable, size, blocked, steps in rows:
        med = sorted(steps)[len(steps) // 2]
        mean_blocked = sum(blocked) / len(blocked)
        print(f"| {mode} | {trainable} | {size / 2**20:.0f} | {mean_blocked:.3f} "
              f"({', '.join(f'{b:.2f}' for b in blocked)}) | {med:.2f} | {mean_blocked / med:.2f} |")


if __name__ == "__main__":
    main()
