"""The real CLI end to end: what a finished 2-rank run directory holds, and `dedistill sample` from its checkpoint.

The run is the suite's reference run (conftest.py: `dedistill submit --cluster local`, 2 gloo ranks under
launch.torchrun, FSDP2, LoKr, EMA, 6 steps, a checkpoint every 2), which every resume test compares with bitwise.
Stopping a run by SIGTERM and resuming it bitwise is tests/integration/test_preemption.py's."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

import tiny_runs

pytestmark = pytest.mark.slow


def test_finished_run_holds_checkpoints_logs_and_config_and_samples(reference_run, tmp_path):
    steps = tiny_runs.STEPS
    ckpts = sorted((reference_run / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{s:08d}" for s in range(tiny_runs.EVERY, steps + 1, tiny_runs.EVERY)]
    for c in ckpts:
        assert (c / "COMPLETE").is_file()
        assert {p.name for p in c.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    assert (reference_run / "config.yaml").is_file()

    final = tiny_runs.trainable_state(ckpts[-1])
    assert any(k.startswith("model.") for k in final) and any(k.startswith("ema.") for k in final)
    assert any(k.startswith("optim.state.") for k in final)
    first = tiny_runs.trainable_state(ckpts[0])
    assert any(not torch.equal(first[k], final[k]) for k in final if k.startswith("model.")), "training moved nothing"

    out = tmp_path / "img.png"
    cmd = [sys.executable, "-m", "launch", "sample", "--model", str(ckpts[-1]),
           "--prompt", "a red circle", "--steps", "2", "--resolution", "64", "--cfg", "3", "--out", str(out)]
    subprocess.run(cmd, cwd=tiny_runs.REPO, check=True, capture_output=True, timeout=300, env=tiny_runs.env())
    assert Image.open(out).size == (64, 64)
