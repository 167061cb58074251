"""Evals during training: every `eval.every_steps` the trainer's new checkpoint goes to the suite in `eval.suite`;
at the end (`sample.at_end`) the CFG grid. `trainer_hooks` hands both to the trainer (train/trainer.py), which knows
nothing of evals.

- `eval.mode: job` — rank 0 submits a separate job with submitit (a SLURM job when training runs under SLURM, else
  a local process); training never waits for it.
- `eval.mode: inline` — for tiny CPU runs: rank 0 loads the just-saved checkpoint with
  `train.inference.load_for_inference` (an unsharded copy, no collectives) and evaluates it in the training process
  while the other ranks wait at a barrier. The trainer's RNG state is left exactly as it was.

Either way a failed eval is recorded in `<run_dir>/evals/step_N/<suite>/error.txt` with its traceback, announced in
one printed line, and never stops training.
"""

from __future__ import annotations

import os
import random
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import submitit
import torch

from evals.sampler import sample_grid_for_run
from evals.suite import Target, eval_dir, evaluate_into_run, load_suite, resolve_paths, resolve_suite_path
from train.build import encoders_for_sampling
from train.parallelize import DistInfo, barrier
from train.run_dir import RunDir
from train.trainer import Trainer, TrainerHooks


def record_failure(run_dir: Path, step: int, suite: str, exc: BaseException) -> Path:
    out = eval_dir(run_dir, step, suite)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "error.txt"
    path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    print(f"[dedistill] eval of step {step} failed: {type(exc).__name__}: {first} (traceback: {path})", flush=True)
    return path


@contextmanager
def preserved_rng():
    """The eval may draw random numbers (module init in from_pretrained, ...); training must not notice."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def run_eval_job(suite_path: str, checkpoint: str, run_dir: str, step: int, suite_name: str) -> dict | None:
    """The body of a submitted eval job (one process). Re-raises after recording, so the scheduler marks it failed."""
    try:
        return evaluate_into_run(load_suite(suite_path), checkpoint)
    except Exception as e:
        record_failure(Path(run_dir), step, suite_name, e)
        raise


def submit_eval(suite_path: Path, checkpoint: Path, *, run_dir: Path, step: int, suite_name: str,
                timeout_min: int = 240):
    """One eval job through submitit; returns the submitit Job. Extend the executor parameters here."""
    # Under SLURM (the training job's own env says so) the eval is another SLURM job; elsewhere a local process.
    # Not `which sbatch`: login nodes and test machines can have the client without a reachable cluster.
    cluster = "slurm" if "SLURM_JOB_ID" in os.environ else "local"
    executor = submitit.AutoExecutor(folder=RunDir(run_dir).eval_jobs, cluster=cluster)
    gpus = 1 if cluster == "slurm" or torch.cuda.is_available() else 0
    executor.update_parameters(name=f"eval-step{step}", timeout_min=timeout_min, gpus_per_node=gpus, nodes=1,
                               tasks_per_node=1)
    job = executor.submit(run_eval_job, str(suite_path), str(checkpoint), str(run_dir), step, suite_name)
    print(f"[dedistill] eval of step {step} submitted ({cluster} job {job.job_id}); results: "
          f"{eval_dir(run_dir, step, suite_name)}", flush=True)
    return job


def check_suite_for_run(cfg) -> Path:
    """The resolved path of `cfg.eval.suite`, after checking that the suite parses and that every path it names
    exists for this run (`{model}` = model.path, `{data}` = data.local); ValueError naming the key otherwise."""
    suite_path = resolve_suite_path(cfg.eval.suite, key="eval.suite")
    suite = load_suite(suite_path, key="eval.suite")
    target = Target(path=Path(cfg.model.path), checkpoint=None, run_dir=Path(cfg.run_dir), run_config=cfg, step=None)
    try:
        resolve_paths(suite, target)
    except ValueError as e:
        raise ValueError(f"eval.suite: {suite_path}: {e}") from None
    return suite_path


def make_eval_callback(cfg, info, chain: Callable[[int, Path], None] | None = None):
    """The trainer's `on_checkpoint(step, path)`, or `chain` unchanged when no eval is configured.

    The suite is parsed and its paths (prompts, Inception weights, FID reference, CLIP model) are checked now, so an
    eval that could never run stops the run at start with one line naming the key. A file that breaks later fails
    only that eval (recorded in error.txt), never training.
    """
    ec = cfg.eval
    if ec.every_steps <= 0:
        return chain
    suite_path = check_suite_for_run(cfg)
    suite_name = load_suite(suite_path).name
    run_dir = Path(cfg.run_dir).resolve()
    submitted = []  # keeps local submitit jobs referenced for the life of the run

    def on_checkpoint(step: int, path: Path) -> None:
        if chain is not None:
            chain(step, path)
        if step % ec.every_steps:
            return
        if ec.mode == "job":
            if info.is_main:
                try:
                    submitted.append(submit_eval(suite_path, Path(path).resolve(), run_dir=run_dir, step=step,
                                                 suite_name=suite_name))
                except Exception as e:
                    record_failure(run_dir, step, suite_name, e)
            return
        if info.is_main:
            with preserved_rng():
                try:
                    evaluate_into_run(load_suite(suite_path), path, device=info.device)
                except Exception as e:
                    record_failure(run_dir, step, suite_name, e)
        barrier()

    return on_checkpoint


def sample_grid_at_end(trainer: Trainer) -> None:
    """The end-of-run CFG grid (`sample.*`) from the trained, still sharded transformer; every rank samples."""
    cfg, info = trainer.cfg, trainer.info
    with encoders_for_sampling(trainer.encoders, cfg, info) as encoders:
        sample_grid_for_run(trainer.backend.module, encoders, cfg, step=trainer.state.step, logger=trainer.logger,
                            is_main=info.is_main)


def trainer_hooks(cfg, *, on_checkpoint: Callable[[int, Path], None] | None = None
                  ) -> Callable[[DistInfo], TrainerHooks]:
    """What `dedistill train` hands the trainer: evals on its checkpoints every `eval.every_steps` (after
    `on_checkpoint`, if given) and the grid at the end when `sample.at_end`. Built once the process group exists
    (the inline eval needs this rank's device); the eval suite is checked then, before any training."""

    def build(info: DistInfo) -> TrainerHooks:
        return TrainerHooks(on_checkpoint=make_eval_callback(cfg, info, chain=on_checkpoint),
                            at_end=sample_grid_at_end if cfg.sample.at_end else None)

    return build
