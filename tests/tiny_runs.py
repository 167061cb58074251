"""Helpers for the cluster tests: the tiny 2-rank training run, launching it, comparing checkpoints bitwise.

Every cluster test trains the same tiny LoKr job (6 steps, a checkpoint every 2, EMA on), so runs that were stopped,
killed, requeued or run on another backend can be compared with one uninterrupted reference, tensor by tensor.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def config_files(kind: str) -> list[Path]:
    """configs/*.yaml of one schema, told apart by their root key: "job" presets (train.config, `run_dir:`) or
    "proof" experiments (evals.experiments.proof, `out_dir:`: proof-cpu/gpu, toy-schnell)."""
    import yaml

    key = {"job": "run_dir", "proof": "out_dir"}[kind]
    return sorted(p for p in (REPO / "configs").glob("*.yaml") if key in (yaml.safe_load(p.read_text()) or {}))
STEPS = 6
EVERY = 2


def overrides(model, data, run_dir, *, steps: int = STEPS, **extra) -> list[str]:
    over = {
        "model.path": model, "data.local": data, "run_dir": run_dir, "train.max_steps": steps,
        "checkpoint.every_steps": EVERY, "checkpoint.keep_last": 10, "train.progress_bar": "false",
        "sample.at_end": "false", "optim.warmup_steps": 2, "ema.decay": 0.5, **extra,
    }
    return [f"{k}={v}" for k, v in over.items()]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", **extra}


def torchrun_cmd(*args, nproc: int = 2, script: str | None = None) -> list[str]:
    target = [script] if script else ["-m", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
            *map(str, args)]


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=kw.pop("env", env()), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd[:6]}... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def train(model, data, run_dir, *, nproc: int = 2, **extra) -> subprocess.CompletedProcess:
    return run(torchrun_cmd(CONFIG, *overrides(model, data, run_dir, **extra), nproc=nproc))


@contextmanager
def environment_kept():
    """The environment as it was before the block: a training in this process runs init_distributed, which exports
    RANK/WORLD_SIZE/..., and later tests must not see a world of one."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_in_process(cfg, on_checkpoint=None):
    """`dedistill train` in this process (the trainer with the hooks the CLI hands it), the environment kept."""
    from evals.periodic import trainer_hooks
    from train.trainer import train

    with environment_kept():
        return train(cfg, trainer_hooks(cfg, on_checkpoint=on_checkpoint))


def cli_status(*argv) -> int:
    """`dedistill ARGV` in this process, the environment kept (a training run exports RANK/WORLD_SIZE); its exit
    status. The CLI's own parsing and code, without the ~6 s of imports (torch, diffusers, transformers) a fresh
    interpreter pays again: for tests whose subject is what a command writes or says; the tests about processes
    (torchrun, signals, exit codes of a real start) keep their subprocess."""
    from launch.cli import main

    with environment_kept():
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def cli(*argv) -> None:
    """`cli_status`, for a command that must succeed."""
    if rc := cli_status(*argv):
        raise AssertionError(f"dedistill {' '.join(map(str, argv[:3]))} ... exited with {rc}")


def ckpt(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def started_from(src_run, run_dir, step: int) -> Path:
    """`run_dir` as `src_run` left it at `step`: its config and that one checkpoint, so the next start resumes there."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(Path(src_run) / "config.yaml", run_dir / "config.yaml")
    shutil.copytree(ckpt(src_run, step), ckpt(run_dir, step))
    return run_dir


def trainable_state(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model, optimizer moments, EMA, scheduler/step counters), unsharded."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from train.checkpoint import read_metadata, safe_load

    meta = read_metadata(path)
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    safe_load(state, path, no_dist=True)
    return state


def assert_same_state(a_path, b_path, *, atol: float = 0.0) -> dict[str, torch.Tensor]:
    """Bitwise (atol=0) or close equality of two checkpoints' tensors; returns a's state."""
    a, b = trainable_state(a_path), trainable_state(b_path)
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())[:5]}"
    assert any(k.startswith("model.") for k in a) and any(k.startswith("optim.state.") for k in a)
    assert any(k.startswith("ema.") for k in a)
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k].float() - b[k].float()).abs().max()}"
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by more than {atol}"
    return a


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def descendants(pid: int) -> list[int]:
    from launch.submit import _descendants

    return _descendants(pid)


def signal_tree(proc: subprocess.Popen, sig: int, *, include_root: bool = True) -> None:
    """Send `sig` to a launcher and every process under it (torchrun puts its workers in their own sessions)."""
    pids = descendants(proc.pid) + ([proc.pid] if include_root else [])
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    signal_tree(proc, signal.SIGKILL)
    proc.wait(timeout=30)


def pipeline_and_sample_images(export: Path, script: str, settings: dict, prompts: list[str], neg: str,
                               out: Path) -> dict:
    """{name: uint8 image} for an export: what `script` (run in a fresh process, no repo on the path: it saves
    custom_*/stock_* .npy files into `out`) writes, and ours_<i> from `dedistill sample` on the same settings.

    `dedistill sample` runs in this process, through the console script's function (launch.cli.main), on one thread
    as the script's process does (env(): OMP_NUM_THREADS=1), so the two are computed alike; the pipeline script needs
    its own process, one where dedistill cannot be imported."""
    import json

    import numpy as np
    from PIL import Image

    from launch.cli import main

    s = settings
    args = {"settings": s, "prompts": prompts, "neg": neg, "dir": str(out)}
    e = env(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out / "hf_modules"), PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", script, str(export), json.dumps(args)], cwd=out, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    got = {p.stem: np.load(p) for p in out.glob("*.npy")}
    for i, prompt in enumerate(prompts):
        png = out / f"ours_{i}.png"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            main(["sample", "--model", str(export), "--prompt", prompt, "--negative-prompt", neg, "--cfg", str(s["cfg"]),
                  "--cfg-skip-steps", str(s["skip"]), "--steps", str(s["steps"]), "--resolution", str(s["res"]),
                  "--seed", str(s["seed"]), "--max-text-tokens", str(s["tokens"]), "--dtype", "fp32", "--out", str(png)])
        finally:
            torch.set_num_threads(threads)
        got[f"ours_{i}"] = np.asarray(Image.open(png).convert("RGB"))
    return got
