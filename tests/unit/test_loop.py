"""The training loop in-process (a world of one, same code path as torchrun): skipping non-finite steps, logging."""

import math

import pytest
import torch

from train.config import OptimConfig, load_config
from train.optim import lr_factor


def _cfg(model, data, run, **over):
    items = {
        "model.path": model, "data.local": data, "run_dir": run, "train.max_steps": 4, "train.progress_bar": False,
        "sample.at_end": False, "checkpoint.every_steps": 100, "train.log_every": 1, **over,
    }
    return load_config("configs/tiny-cpu.yaml", [f"{k}={v}" for k, v in items.items()])


def test_non_finite_loss_skips_the_step_and_training_goes_on(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import tiny_runs
    import train.trainer as trainer
    from train import step as step_mod

    real = step_mod.forward_backward_step
    calls = {"n": 0}
    snapshots = []

    def poisoned(transformer, batch, *a, **kw):
        calls["n"] += 1
        snapshots.append({n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad})
        if calls["n"] == 2:  # the second step's loss is NaN (e.g. a corrupt batch)
            batch = {**batch, "pixels": batch["pixels"] * float("nan")}
        return real(transformer, batch, *a, **kw)

    monkeypatch.setattr(trainer, "forward_backward_step", poisoned)
    state = tiny_runs.train_in_process(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "run"))
    assert state.step == 4 and state.skipped_steps == 1
    assert math.isnan(state.history[1]["loss"]) and all(math.isfinite(h["loss"]) for i, h in enumerate(state.history) if i != 1)
    # the skipped step left the parameters untouched; the others moved them
    before, after_skip, after_next = snapshots[1], snapshots[2], snapshots[3]
    assert all(torch.equal(before[k].full_tensor() if hasattr(before[k], "full_tensor") else before[k],
                           after_skip[k].full_tensor() if hasattr(after_skip[k], "full_tensor") else after_skip[k])
               for k in before)
    assert any(not torch.equal(_full(after_skip[k]), _full(after_next[k])) for k in before)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_s",
            "train/skipped_steps"} <= tags
    assert [e.value for e in acc.Scalars("train/skipped_steps")][-1] == 1


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg, 14) == pytest.approx(1.0)
    assert lr_factor(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_factor(14, cfg, 14) == pytest.approx(0.1)
    const = OptimConfig(lr=1.0, warmup_steps=2, schedule="constant")
    assert [lr_factor(s, const, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    from train.trainer import train

    with pytest.raises(ValueError, match="model.path"):
        train(_cfg(tmp_path / "nope", tmp_path, tmp_path / "run"))
