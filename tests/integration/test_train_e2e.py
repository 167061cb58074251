"""The real CLI under torchrun with 2 gloo processes: train, checkpoint, resume bitwise, sample."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def torchrun(*args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def base_args(model, data, run, steps, **extra):
    over = {
        "model.path": model, "data.local": data, "run_dir": run, "train.max_steps": steps,
        "checkpoint.every_steps": 4, "checkpoint.keep_last": 10, "train.progress_bar": "false",
        "sample.at_end": "false", "optim.warmup_steps": 2, "ema.decay": 0.5, **extra,
    }
    return [str(REPO / "configs" / "tiny-cpu.yaml"), *[f"{k}={v}" for k, v in over.items()]]


def trainable_state(ckpt: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and k.startswith(("model.", "ema.", "optim.state."))
    }
    dcp.load(state, checkpoint_id=str(ckpt))
    return state


def test_resume_is_bitwise_and_sampling_works(tiny_model_dir, tiny_data_dir, tmp_path):
    """Straight 24 steps vs. a run stopped by SIGTERM (preemption) after its first checkpoint, then resumed."""
    import signal
    import time

    steps = 24
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = torchrun(*base_args(tiny_model_dir, tiny_data_dir, straight, steps))
    assert "fresh start" in r.stdout

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *base_args(tiny_model_dir, tiny_data_dir, resumed, steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = resumed / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks: finish the step, save, exit
    out = proc.communicate(timeout=300)[0]
    done = sorted(p.name for p in (resumed / "checkpoints").glob("step_*"))
    assert "stop signal: checkpoint saved" in out, out[-3000:]
    assert f"step_{steps:08d}" not in done, "the run finished before the signal; nothing was resumed"

    r = torchrun(*base_args(tiny_model_dir, tiny_data_dir, resumed, steps))
    assert "resumed from" in r.stdout, r.stdout

    for run in (straight, resumed):
        ckpts = sorted((run / "checkpoints").glob("step_*"))
        assert ckpts[-1].name == f"step_{steps:08d}"
        assert all((c / "COMPLETE").is_file() for c in ckpts)
        assert {p.name for p in ckpts[-1].glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
        assert list((run / "tb").glob("events.out.tfevents.*"))
        assert (run / "config.yaml").is_file()

    final = f"checkpoints/step_{steps:08d}"
    a, b = trainable_state(straight / final), trainable_state(resumed / final)
    assert any(k.startswith("model.") for k in a) and any(k.startswith("ema.") for k in a)
    assert any(k.startswith("optim.state.") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # and training moved the parameters: the first checkpoint differs from the last
    early = trainable_state(straight / "checkpoints/step_00000004")
    assert any(not torch.equal(early[k], a[k]) for k in a if k.startswith("model."))

    # sample from the checkpoint through the user-facing CLI
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "launch", "sample", "--model", str(straight / final),
           "--prompt", "a red circle", "--steps", "2", "--resolution", "64", "--cfg", "3", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
