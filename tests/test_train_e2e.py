"""The real CLI under torchrun with 2 gloo processes: train, checkpoint, resume bitwise, sample."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


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
        "checkpoint.every_steps": 4, "checkpoint.keep_last": 5, "train.progress_bar": "false",
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
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = torchrun(*base_args(tiny_model_dir, tiny_data_dir, straight, 8))
    assert "fresh start" in r.stdout
    torchrun(*base_args(tiny_model_dir, tiny_data_dir, resumed, 4))
    r = torchrun(*base_args(tiny_model_dir, tiny_data_dir, resumed, 8))
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout

    for run in (straight, resumed):
        ckpts = sorted((run / "checkpoints").glob("step_*"))
        assert [c.name for c in ckpts] == ["step_00000004", "step_00000008"]
        assert all((c / "COMPLETE").is_file() for c in ckpts)
        assert {p.name for p in ckpts[-1].glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
        assert list((run / "tb").glob("events.out.tfevents.*"))
        assert (run / "config.yaml").is_file()

    a, b = trainable_state(straight / "checkpoints/step_00000008"), trainable_state(resumed / "checkpoints/step_00000008")
    assert any(k.startswith("model.") for k in a) and any(k.startswith("ema.") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # and training moved the adapter away from its no-op init
    lokr = [v for k, v in a.items() if k.startswith("model.") and "lokr_w1" in k]
    assert lokr and any(v.abs().sum() > 0 for v in lokr)

    # sample from the checkpoint through the user-facing CLI
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "launch", "sample", "--model", str(straight / "checkpoints/step_00000008"),
           "--prompt", "a red circle", "--steps", "2", "--resolution", "64", "--cfg", "3", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
