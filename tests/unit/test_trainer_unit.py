# tier: unit
"""The Trainer, the checkpoint manager, telemetry and RunDir in process: the run layout as today's runs have it, what
a checkpoint holds, the guard's rewind, the hooks, and a run dir in the checkpoint format earlier releases wrote
resuming bitwise (users' existing runs must keep resuming)."""

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from train.checkpoint import MARKER, CheckpointManager, CheckpointStore, latest_checkpoint, list_checkpoints
from train.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig, dump_config, load_config
from train.mfu import FlopsModel
from train.optim import EMA, build_scheduler
from train.parallel import StepResult
from train.parallelize import destroy_distributed, init_distributed
from train.run_dir import RunDir, checkpoint_step, parse_step, step_name
from train.telemetry import Telemetry
from train.trainer import Trainer, TrainerHooks, TrainState, train


# ------------------------------------------------------------------------------------------------------------ RunDir

def test_run_dir_spells_the_layout_runs_have_on_disk(tmp_path):
    run = RunDir(tmp_path)
    assert run.config == tmp_path / "config.yaml"
    assert run.resumed_config(12) == tmp_path / "config.resumed_step_00000012.yaml"
    assert run.checkpoint(3) == tmp_path / "checkpoints" / "step_00000003"
    assert run.eval_dir(4, "mini") == tmp_path / "evals" / "step_00000004" / "mini"
    assert run.eval_jobs == tmp_path / "evals" / "submitit"
    assert run.grid(7) == tmp_path / "samples" / "grid_step_00000007.png"
    assert (run.tensorboard, run.plots, run.jobs) == (tmp_path / "tb", tmp_path / "plots", tmp_path / "submitit")
    assert RunDir.of_checkpoint(run.checkpoint(3)).root == tmp_path


def test_step_names_parse_and_only_step_dirs_count(tmp_path):
    assert step_name(12) == "step_00000012" and parse_step("step_00000012") == 12
    assert parse_step("step_00000012.corrupt") is None and parse_step("step_12") is None
    assert checkpoint_step(Path("/x/checkpoints/step_00000005")) == 5
    with pytest.raises(ValueError, match="not a checkpoint dir"):
        checkpoint_step(Path("/x/model"))
    run = RunDir(tmp_path)
    assert run.step_dirs() == []
    for name in ("step_00000004", "step_00000002", "step_00000003.corrupt", "other"):
        (run.checkpoints / name).mkdir(parents=True)
    (run.checkpoints / "step_00000009").write_text("a file, not a checkpoint")
    assert run.step_dirs() == [(2, run.checkpoint(2)), (4, run.checkpoint(4))]
    assert [p.name for p in run.checkpoint_entries()] == ["step_00000002", "step_00000003.corrupt", "step_00000004"]


# --------------------------------------------------------------------------------------------------------- Telemetry

def _telemetry(**train) -> Telemetry:
    cfg = TrainConfig(**{"max_steps": 10, "sync_every": 4, "log_every": 5, "batch_size": 2, **train})
    flops = FlopsModel(p_tok=1000.0, layers=1, hidden=8)
    return Telemetry(cfg, checkpoint_every=3, flops=flops, peak=None, global_batch=4, full=False)


def test_telemetry_reads_the_device_at_read_steps_only_and_in_step_order():
    tel = _telemetry()
    assert [s for s in range(1, 11) if tel.is_read_step(s)] == [3, 4, 5, 6, 8, 9, 10]
    for step, applied in ((1, True), (2, False), (3, True)):
        tel.micro_batch(image_tokens=16, text_tokens=8)
        tel.step(step, torch.tensor(float(step)), 0.1 * step,
                 StepResult(grad_norm=torch.tensor(2.0 * step), applied=torch.tensor(applied)))
    records = tel.read()
    assert [(r.step, r.loss, r.grad_norm, r.applied) for r in records] == [
        (1, 1.0, 2.0, True), (2, 2.0, 4.0, False), (3, 3.0, 6.0, True)]
    assert records[1].lr == pytest.approx(0.2) and tel.read() == []
    scalars = tel.throughput()
    assert set(scalars) == {"train/step_time_s", "train/samples_per_s", "train/tflops_per_device"}  # no peak: no MFU
    assert scalars["train/samples_per_s"] == pytest.approx(4 / scalars["train/step_time_s"])
    assert tel.steps == 3 and tel.flops == 3 * 2 * (4 * 1000.0 * 24 + 12 * 24 * 24 * 8)  # 3 micro-batches of 2
    tel.restart()
    assert tel.steps == 0 and tel.flops == 0.0


# ------------------------------------------------------------------------------------------------ checkpoint manager

class _Backend:
    """The parts of a parallel backend the manager uses, over one plain Linear and its AdamW."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)

    def checkpoint_state(self) -> dict:
        return {"model": {k: v for k, v in self.module.state_dict().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])

    def ema_tensors(self):
        return list(self.module.named_parameters())

    def ema_to_checkpoint(self, shadow):
        return dict(shadow)

    def ema_from_checkpoint(self, full, shadow):
        for k in shadow:
            shadow[k].copy_(full[k])

    def train_a_step(self):
        self.module(torch.randn(4, 3)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class _Loader:
    def __init__(self):
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _manager(tmp_path, **cfg):
    backend, loader, state = _Backend(), _Loader(), TrainState()
    scheduler = build_scheduler(backend.optimizer, OptimConfig(warmup_steps=2), 10)
    ema = EMA(backend.ema_tensors(), EMAConfig(decay=0.5))
    manager = CheckpointManager(RunDir(tmp_path), CheckpointConfig(**cfg), rank=0, backend=backend,
                                scheduler=scheduler, ema=ema, loader=loader, train_state=state)
    return manager, backend, loader, state, scheduler, ema


def _step(backend, loader, state, scheduler, ema):
    backend.train_a_step()
    scheduler.step()
    state.step += 1
    loader.position += 2
    ema.update(state.step, torch.tensor(True))


def test_the_manager_saves_what_it_was_handed_and_restores_it(tmp_path):
    manager, backend, loader, state, scheduler, ema = _manager(tmp_path, keep_last=2)
    assert manager.resume() is None  # a fresh start
    for _ in range(3):
        _step(backend, loader, state, scheduler, ema)
        manager.save(state.step)
    assert [s for s, _ in manager.complete()] == [2, 3]  # keep_last
    held = manager.state_dict()
    assert set(held) == {"model", "scheduler", "train", "ema"}  # the keys today's runs hold
    saved = {k: v.clone() for k, v in backend.module.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    _step(backend, loader, state, scheduler, ema)

    resumed, *_ = _manager(tmp_path)  # a new process: everything comes from the newest checkpoint
    assert resumed.resume() == RunDir(tmp_path).checkpoint(3)
    assert resumed.train_state.step == 3 and resumed.loader.position == 6
    assert resumed.scheduler.last_epoch == 3
    assert all(torch.equal(saved[k], v) for k, v in resumed.backend.module.state_dict().items())
    assert all(torch.equal(shadow[k], v) for k, v in resumed.ema.shadow.items())
    off, *_ = _manager(tmp_path, resume=False)
    assert off.resume() is None and off.train_state.step == 0


def test_rewind_restores_all_but_the_loader_and_deletes_the_later_checkpoints(tmp_path):
    manager, backend, loader, state, scheduler, ema = _manager(tmp_path, keep_last=10)
    for _ in range(4):
        _step(backend, loader, state, scheduler, ema)
        manager.save(state.step)
    at_two = CheckpointStore(tmp_path, CheckpointConfig(), rank=0)
    weights = {"model": {k: torch.empty_like(v) for k, v in backend.module.state_dict().items()}}
    at_two.load(RunDir(tmp_path).checkpoint(2), weights)
    manager.rewind(2, RunDir(tmp_path).checkpoint(2))
    assert state.step == 2 and loader.position == 8  # the loader goes on where it was: the bad data is skipped
    assert all(torch.equal(weights["model"][k], v) for k, v in backend.module.state_dict().items())
    assert [s for s, _ in list_checkpoints(RunDir(tmp_path).checkpoints, complete_only=False)] == [1, 2]


# ----------------------------------------------------------------------------------------------------------- Trainer

def _cfg(model, data, run, **over):
    items = {
        "model.path": model, "data.local": data, "run_dir": run, "train.max_steps": 4, "train.progress_bar": False,
        "sample.at_end": False, "checkpoint.every_steps": 2, "checkpoint.keep_last": 10, "train.log_every": 1,
        "optim.warmup_steps": 2, "ema.decay": 0.5, **over,
    }
    return load_config("configs/tiny-cpu.yaml", [f"{k}={v}" for k, v in items.items()])


def _in_process(run):
    """`run()` (which trains a world of one), the environment restored after: init_distributed exports RANK etc."""
    saved = dict(os.environ)
    try:
        return run()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_trainer_calls_its_hooks_and_writes_todays_layout(tiny_model_dir, tiny_data_dir, tmp_path):
    seen, ends = [], []
    hooks = TrainerHooks(on_checkpoint=lambda step, path: seen.append((step, path, (path / MARKER).is_file())),
                         at_end=lambda trainer: ends.append(trainer.state.step))
    run = tmp_path / "run"
    state = _in_process(lambda: train(_cfg(tiny_model_dir, tiny_data_dir, run), hooks))
    assert state.step == 4 and [h["step"] for h in state.history] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in state.history)
    assert seen == [(2, run / "checkpoints" / "step_00000002", True), (4, run / "checkpoints" / "step_00000004", True)]
    assert ends == [4]
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000004").iterdir()) == [
        ".metadata", "COMPLETE", "__0_0.distcp", "rank_00000.pt"]


def _old_payload(trainer: Trainer) -> dict:
    """The checkpoint contents earlier releases wrote (their loop's `payload()`), spelled out here so that format is
    tested for as long as it must resume."""
    backend = trainer.backend
    state = trainer.state
    out = {**backend.checkpoint_state(), "scheduler": trainer.scheduler.state_dict(),
           "train": {"step": torch.tensor(state.step), "skipped_steps": torch.tensor(state.skipped_steps)}}
    out["ema"] = backend.ema_to_checkpoint(trainer.ema.state_dict())
    return out


def test_a_run_dir_written_by_the_old_loop_resumes_bitwise(tiny_model_dir, tiny_data_dir, tmp_path):
    """A run dir laid out and filled as the loop before the Trainer wrote it (its payload, its paths, spelled here),
    resumed by the Trainer: the same losses and the same final tensors as a run never stopped."""
    import tiny_runs

    straight = _in_process(lambda: train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "straight")))

    old = tmp_path / "old"
    cfg = _cfg(tiny_model_dir, tiny_data_dir, tmp_path / "donor")
    holder = {}

    def write_old_checkpoint(step, path):
        if step != 2:
            return
        trainer = holder["trainer"]
        store = CheckpointStore(old, cfg.checkpoint, rank=0)
        store.save(2, _old_payload(trainer), per_rank={"data": trainer.loader.state_dict()})
        store.close()
        os.kill(os.getpid(), signal.SIGTERM)  # the donor stops after this checkpoint

    def donor():
        info = init_distributed(cfg.parallel)
        try:
            holder["trainer"] = trainer = Trainer(cfg, info, TrainerHooks(on_checkpoint=write_old_checkpoint))
            try:
                return trainer.train()
            finally:
                trainer.close()
        finally:
            destroy_distributed()

    first = _in_process(donor)
    assert first.stopped_by_signal and first.step == 3  # the signal is seen at the next read step, which saves too
    ckpt = old / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and latest_checkpoint(old / "checkpoints") == ckpt
    resumed_cfg = _cfg(tiny_model_dir, tiny_data_dir, old)
    dump_config(resumed_cfg, old / "config.yaml")
    second = _in_process(lambda: train(resumed_cfg))
    assert second.step == 4
    assert [h["loss"] for h in first.history[:2]] + [h["loss"] for h in second.history] == [
        h["loss"] for h in straight.history]
    tiny_runs.assert_same_state(tmp_path / "straight" / "checkpoints" / "step_00000004",
                                old / "checkpoints" / "step_00000004")


# -------------------------------------------------------------------------------------------------------- layering

def test_train_imports_nothing_from_the_packages_above_it():
    """train/ is the ground floor: evals/ and launch/ hand it hooks. `python -m train` (train/__main__.py) is the
    `dedistill train` command itself and delegates to launch/; no module of train/ imports it."""
    import ast

    root = Path(__file__).resolve().parents[1] / "train"
    above = ("evals", "launch", "dataset_tools")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.relative_to(root.parent)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in above]
    assert not offenders, offenders
