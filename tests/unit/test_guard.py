"""The divergence guard (docs/reliability.md), caused for real: a precomputed MDS data set whose samples 10-15 hold NaN
latents (written by `dedistill data precompute`, then rewritten with MDSWriter), read in order (no shuffle), 2
samples a step: steps 6, 7 and 8 are non-finite.

With K = 2 and `train.sync_every=2` the 2nd non-finite step (7) is seen at the read of step 8, before its
checkpoint. rewind: back to the step-4 checkpoint, the loader stays past samples 8-15 (the data of steps 5-8), the
run ends at step 12 on finite losses having drawn exactly one epoch; a process that restarts from the step-4
checkpoint after the rewind replays the same steps and ends bitwise equal. stop: a one-line DivergenceError naming
the steps and the checkpoint; nothing is saved after it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_runs

BAD = range(10, 16)  # sample indices with NaN latents: steps 6-8 at batch size 2


def _poison(src: Path, out: Path, bad) -> Path:
    """A copy of the precomputed data set `src` whose samples `bad` (global order) have NaN latent means."""
    from streaming import LocalDataset, MDSWriter

    from dataset_tools.buckets import finalize

    shutil.copytree(src, out)
    index = 0
    for part in sorted((out / "b000").glob("part_*")):
        shard = json.loads((part / "index.json").read_text())["shards"][0]
        columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        rows = [dict(r) for r in LocalDataset(local=str(part))]
        shutil.rmtree(part)
        with MDSWriter(out=str(part), columns=columns) as w:
            for row in rows:
                if index in bad:
                    row["latent_mean"] = np.full_like(row["latent_mean"], np.nan)
                w.write(row)
                index += 1
    finalize(out)  # the bucket's merged index, over the rewritten parts
    return out


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    from dataset_tools.buckets import BucketSpec
    from dataset_tools.precompute import PrecomputeOptions, precompute
    from dataset_tools.tiny_data import write_tiny_data
    from dataset_tools.tiny_model import write_tiny_model

    base = tmp_path_factory.mktemp("guard")
    model = write_tiny_model(base / "model", seed=0)
    raw = write_tiny_data(base / "raw", n=32, size=64, seed=0)
    clean = base / "clean"
    precompute(model, raw, clean, spec=BucketSpec(resolution=64, square=True),
               opts=PrecomputeOptions(dtype="fp32", max_text_tokens=64), progress_bar=False)
    return model, _poison(clean, base / "nan", set(BAD))


def _cfg(model, data, run, **over):
    from train.config import load_config

    items = {"model.path": model, "data.local": data, "run_dir": run, "train.max_steps": 12, "data.shuffle": False,
             "train.progress_bar": False, "sample.at_end": False, "checkpoint.every_steps": 4,
             "checkpoint.keep_last": 10, "train.log_every": 100, "train.sync_every": 2,
             "guard.max_nonfinite_steps": 2, **over}
    return load_config("configs/tiny-cpu.yaml", [f"{k}={v}" for k, v in items.items()])


def test_rewind_skips_the_poisoned_window_and_a_restart_replays_it_bitwise(nan_data, tmp_path, capfd):
    model, data = nan_data
    run = tmp_path / "run"
    state = tiny_runs.train_in_process(_cfg(model, data, run))
    out = capfd.readouterr().out
    assert "step 5: non-finite" in out and "step 6: non-finite" in out  # 0-based: steps 6 and 7
    assert (f"guard: 2 consecutive non-finite steps (6-7), detected at step 8; rewound to "
            f"{tiny_runs.ckpt(run, 4)}; skipping the data of steps 5-8 (4 batches per rank)") in out
    assert state.step == 12 and state.rewinds == 1
    assert [h["step"] for h in state.history] == list(range(1, 13))
    assert all(np.isfinite(h["loss"]) for h in state.history) and state.skipped_steps == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_00000004", "step_00000008", "step_00000012"]
    # 12 accepted steps + the 4 skipped = 16 batches of 2: the loader ended exactly one epoch in
    data_state = torch.load(tiny_runs.ckpt(run, 12) / "rank_00000.pt", weights_only=True)["data"]
    assert (data_state["epoch"], data_state["sample_in_epoch"]) in ((0, 32), (1, 0)), data_state

    # A crash after the rewind, before step 8's checkpoint: the restart has only step 4, replays 5-8 and rewinds.
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(tiny_runs.ckpt(run, 4), tiny_runs.ckpt(again, 4))
    replay = tiny_runs.train_in_process(_cfg(model, data, again))
    assert replay.rewinds == 1 and replay.step == 12
    tiny_runs.assert_same_state(tiny_runs.ckpt(run, 12), tiny_runs.ckpt(again, 12))


def test_stop_ends_the_run_with_one_line(nan_data, tmp_path):
    from train.guard import DivergenceError

    model, data = nan_data
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as e:
        tiny_runs.train_in_process(_cfg(model, data, run, **{"guard.on_divergence": "stop"}))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"guard: 2 consecutive non-finite steps (6-7), detected at step 8; stopped "
                   f"(guard.on_divergence=stop); the newest checkpoint before them is {tiny_runs.ckpt(run, 4)}")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_streaks_and_targets():
    from train.config import GuardConfig
    from train.guard import DivergenceError, DivergenceGuard, Streak

    g = DivergenceGuard(GuardConfig(max_nonfinite_steps=3, max_rewinds=1))
    seen = [g.observe(s, ok) for s, ok in enumerate([True, False, False, True, False, False, False, False], 1)]
    assert seen[:6] == [None] * 6 and seen[6] == Streak(5, 7) and seen[7] is None  # fires once per streak
    ckpts = [(2, Path("c2")), (4, Path("c4")), (6, Path("c6"))]
    assert g.rewind_target(ckpts, Streak(5, 7)) == (4, Path("c4"))
    assert g.rewind_target(ckpts, Streak(2, 4)) is None
    assert g.decide(Streak(5, 7), (4, Path("c4")), detected_at=8) == "rewind"
    with pytest.raises(DivergenceError, match="stopped after 1 rewinds"):
        g.decide(Streak(5, 7), (4, Path("c4")), detected_at=8)
    with pytest.raises(DivergenceError, match="cannot rewind: no checkpoint precedes them"):
        DivergenceGuard(GuardConfig(max_nonfinite_steps=3)).decide(Streak(1, 3), None, detected_at=4)
    off = DivergenceGuard(GuardConfig(max_nonfinite_steps=0))
    assert all(off.observe(s, False) is None for s in range(1, 100))
