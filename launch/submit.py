"""`dedistill submit`: the training job through submitit — SLURM when `sbatch` exists, a local process otherwise.

The job is what slurm/train.sbatch does, in Python: one task per node, each running `python -m launch.torchrun`
(torchrun whose agent ignores USR1/TERM) over the same config, c10d rendezvous on the first node's NodeAddr.
Everything is passed as argument lists (submitit pickles `TrainJob`; no shell line is built from user input). The
job receives exactly the config that was checked here: it is resolved (preset, overrides, every path made absolute,
so the job does not depend on the submitting directory), validated, and written to
`<run_dir>/submitit/job-config-<time>.yaml`, which the job loads with no overrides. Nothing is re-parsed from text on
the way, so a value such as `model.path=/data/m #x` reaches the job whole.

Requeue, one mechanism per signal:
- USR1 (time limit near, `--signal=USR1@grace`): submitit calls `TrainJob.checkpoint()` in the task of global rank 0.
  That forwards USR1 to the training processes, waits until they have saved and exited, and returns the same job, so
  submitit requeues it (`scontrol requeue`); the next start resumes from that checkpoint.
- TERM (preemption, `scontrol requeue`, `scancel`): SLURM requeues (or cancels) by itself; the training processes
  get the SIGTERM directly and checkpoint within KillWait / GraceTime.

Eval jobs: with `eval.mode: job` the training job's rank 0 submits one eval job per `eval.every_steps` checkpoint
through `evals.periodic.submit_eval` (the evals package owns that submission).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.cli import _preset, absolutize_paths
from launch.torchrun import slurm_torchrun_args, standalone_torchrun_args
from train.config import dump_config, load_config
from train.outputs import atomic_write
from train.run_dir import RunDir, checkpoint_step

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(kw_only=True)
class SubmitOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs requested per node (0: none, e.g. CPU test clusters)."""
    nproc_per_node: int | None = None
    """Training processes per node (default: gpus_per_node, or 1 without GPUs)."""
    partition: str | None = None
    time_min: int = 60 * 24
    account: str | None = None
    qos: str | None = None
    name: str = "dedistill"
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    constraint: str | None = None
    signal_grace_s: int = 300
    """Seconds between the USR1 warning and the time limit: enough for one step plus one checkpoint."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options as KEY=VALUE or KEY (e.g. exclusive, reservation=big)."""
    cluster: str | None = None
    """slurm | local | debug (default: slurm when sbatch is on PATH, else local)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node: must be >= 1, got {self.nproc_per_node}")
        if self.cluster not in (None, "slurm", "local", "debug"):
            raise ValueError(f"--cluster: {self.cluster!r} is not one of slurm, local, debug")
        for key in ("partition", "account", "qos", "name", "constraint"):
            _check_plain(f"--{key}", getattr(self, key))
        for item in self.sbatch:
            _check_plain("--sbatch", item)

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


def _check_plain(key: str, value: str | None) -> None:
    """Values that end up in `#SBATCH` lines: submitit shell-quotes them, but a newline would end the line."""
    if value is not None and _CONTROL.search(value):
        raise ValueError(f"{key}: {value!r} contains a control character (newline, tab, ...)")


def _descendants(pid: int) -> list[int]:
    """All descendant PIDs of `pid` (Linux /proc), children first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


class TrainJob:
    """What each task of the submitted job runs: torchrun over `python -m train CONFIG overrides`.

    Has `checkpoint()`, so submitit treats it as checkpointable (see the module docstring).
    """

    def __init__(self, config: str, overrides: list[str], *, nproc_per_node: int, run_dir: str, max_steps: int):
        self.config = config
        self.overrides = list(overrides)
        self.nproc_per_node = nproc_per_node
        self.run_dir = run_dir
        self.max_steps = max_steps
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proc = None

    def torchrun_argv(self, env=None) -> list[str]:
        env = os.environ if env is None else env
        rdzv = (slurm_torchrun_args(self.nproc_per_node, env) if env.get("SLURM_JOB_ID")
                else standalone_torchrun_args(self.nproc_per_node))
        return [sys.executable, "-u", "-m", "launch.torchrun", *rdzv, "-m", "train", self.config, *self.overrides]

    def __call__(self) -> dict:
        # deferred: train.checkpoint imports torch, which this supervising process does without while training runs
        from train.checkpoint import latest_checkpoint

        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = self.torchrun_argv()
        print("[dedistill submit] " + " ".join(map(repr, cmd)), flush=True)
        self._proc = subprocess.Popen(cmd, env=env)
        # Poll instead of wait(): submitit runs checkpoint() in a signal handler on this thread, and Popen.wait()
        # would hold the lock that checkpoint()'s own wait needs (a self-deadlock until SLURM's SIGKILL).
        while self._proc.poll() is None:
            time.sleep(0.5)
        rc = self._proc.returncode
        if rc != 0:
            raise RuntimeError(f"training exited with status {rc} (see the task log)")
        latest = latest_checkpoint(RunDir(self.run_dir).checkpoints)
        step = checkpoint_step(latest) if latest else 0
        return {"run_dir": self.run_dir, "step": step, "finished": step >= self.max_steps}

    def checkpoint(self, *args, **kwargs):
        """USR1 in the rank-0 task: let the training processes checkpoint, then hand submitit the job to requeue."""
        import submitit  # not at the top: it reads SUBMITIT_PREEMPT_SIGNAL at import, set by _import_submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            for pid in _descendants(proc.pid):  # the workers (torchrun's agent ignores USR1)
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=float(os.environ.get("DEDISTILL_CHECKPOINT_WAIT_S", "600")))
            except subprocess.TimeoutExpired:
                print("[dedistill submit] training did not exit after USR1; requeueing anyway", flush=True)
        fresh = TrainJob(self.config, self.overrides, nproc_per_node=self.nproc_per_node, run_dir=self.run_dir,
                         max_steps=self.max_steps)
        return submitit.helpers.DelayedSubmission(fresh)


def resolve_job(config: str, overrides: list[str]):
    """The job's config, resolved with absolute paths and validated here (errors before anything is queued)."""
    # deferred: train.model imports torch; submitit's job process unpickles TrainJob from this module and needs none
    from train.model import check_model_dir

    cfg = load_config(_preset(config).resolve(), overrides)
    absolutize_paths(cfg)
    check_model_dir(cfg.model.path)
    if cfg.eval.every_steps > 0:  # an eval that could never run fails here, not hours into the job
        # deferred: the eval suite (torch, matplotlib) loads only for a run with periodic evals
        from evals.periodic import check_suite_for_run

        check_suite_for_run(cfg)
    if _CONTROL.search(cfg.run_dir):
        raise ValueError(f"run_dir: {cfg.run_dir!r} contains a control character (newline, tab, ...)")
    return cfg


def write_job_config(cfg) -> Path:
    """The resolved config, written where the job reads it (a new file per submission: a requeued job keeps reading
    its own, whatever is submitted later)."""
    folder = RunDir(cfg.run_dir).jobs
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-config-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yaml"
    atomic_write(path, lambda tmp: dump_config(cfg, tmp))
    return path


def _sbatch_extra(items: list[str]) -> dict:
    extra: dict = {}
    for item in items:
        key, eq, value = item.lstrip("-").partition("=")
        if not key:
            raise ValueError(f"--sbatch: {item!r} is not KEY=VALUE or KEY")
        extra[key.replace("-", "_")] = value if eq else True
    return extra


def _import_submitit():
    # submitit's default warning signal is USR2, read from the environment when submitit is imported, both here (for
    # `#SBATCH --signal`) and in the job (its handler); the job inherits this environment. Our training processes
    # handle USR1 and TERM (an unhandled USR2 would kill them without a checkpoint).
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"
    import submitit  # here, not at the top: after the variable above is set
    from submitit.core.job_environment import JobEnvironment

    JobEnvironment.USR_SIG = "USR1"  # in case submitit was imported before the variable was set
    return submitit


def submit_training(config: str, overrides: list[str], opts: SubmitOptions):
    """Submit the training job; returns the submitit Job (its files: <run_dir>/submitit/<job id>/ under SLURM,
    <run_dir>/submitit/<job id>_* locally)."""
    submitit = _import_submitit()

    cfg = resolve_job(config, overrides)
    cluster = opts.cluster or ("slurm" if shutil.which("sbatch") else "local")
    if cluster != "slurm" and opts.nodes > 1:
        raise ValueError(f"--nodes: {opts.nodes} nodes need SLURM (no sbatch on PATH; the local executor runs 1 node)")
    if cluster == "slurm" and not shutil.which("srun"):
        raise ValueError("--cluster: sbatch is on PATH but srun is not (no complete SLURM client here); run the job "
                         "on this machine with --cluster local")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # SLURM expands %j in its own paths (one folder per job id). The local executor's job process would create the
    # folder with a literal "%j" in its name, so local jobs share one folder (their files are named by job id).
    folder = RunDir(run_dir).jobs / ("%j" if cluster == "slurm" else "")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict = dict(name=opts.name, timeout_min=opts.time_min, nodes=opts.nodes, tasks_per_node=1)
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if cluster == "slurm":
        params.update(slurm_signal_delay_s=opts.signal_grace_s,
                      slurm_additional_parameters={"requeue": True, **_sbatch_extra(opts.sbatch)})
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(opts, key):
                params[f"slurm_{key}"] = getattr(opts, key)
    executor.update_parameters(**params)
    train_job = TrainJob(str(write_job_config(cfg)), [], nproc_per_node=opts.procs_per_node, run_dir=cfg.run_dir,
                         max_steps=cfg.train.max_steps)
    if cluster != "slurm":
        return executor.submit(train_job), cfg, cluster
    from submitit.core.utils import FailedJobError, FailedSubmissionError  # after _import_submitit (its signal)

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # submitit prints sbatch's stderr before raising; we say it once
            job = executor.submit(train_job)
    except (FailedJobError, FailedSubmissionError) as e:
        said = [ln.strip() for ln in (str(e) or err.getvalue()).splitlines() if ln.strip()]
        # sbatch ends with its most telling line ("fatal: Could not establish a configuration source", ...)
        telling = [ln for ln in said if "fatal" in ln.lower()] or [ln for ln in said if "error" in ln.lower()] or said
        reason = telling[-1] if telling else type(e).__name__
        raise ValueError(f"--cluster: sbatch failed ({reason}); if this machine is not part of a SLURM cluster, run "
                         f"the job here with --cluster local") from None
    return job, cfg, cluster


def wait_for(job, poll_s: float = 2.0) -> dict:
    """Block until the job is done (through requeues) and return the result of its first task."""
    while not job.done():
        time.sleep(poll_s)
    return job.results()[0]
