"""The training job (torchtitan's `Trainer`): `train()` reads top to bottom — build or resume, the step loop, the
periodic work at read steps (logging, checkpoints, the divergence guard, the stop signal), the end.

Run directly (a world of one) or under torchrun; the code path is the same. What runs above training (periodic evals,
the end-of-run grid) comes in as `TrainerHooks` from the caller (evals/periodic.py `trainer_hooks`): nothing here
imports evals/ or launch/.
"""

from __future__ import annotations

import hashlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch
from tqdm import tqdm

from train.build import build_model, load_encoders
from train.checkpoint import CheckpointManager
from train.config import JobConfig, dump_config, load_yaml, to_dict
from train.data import build_loader, forever
from train.guard import DivergenceGuard, Streak
from train.metrics import Logger
from train.mfu import flops_model, peak_flops
from train.model import check_model_dir
from train.optim import EMA, build_scheduler
from train.parallelize import (
    DistInfo, all_reduce_mean, barrier, destroy_distributed, init_distributed, named_collective,
)
from train.run_dir import RunDir
from train.step import forward_backward_step
from train.teacher import build_teacher
from train.telemetry import Telemetry


def step_generator(seed: int, rank: int, step: int, micro: int, *, device: torch.device | str = "cpu"
                   ) -> torch.Generator:
    """A generator on `device` that depends only on (seed, rank, step, micro): resumption needs no RNG bookkeeping
    here. On the training device the step draws its noise where it is used (train/step.py); seeding is host-only."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class StopFlag:
    """Set by SIGUSR1 (SLURM's `--signal` warning) or SIGTERM (preemption, scancel, requeue): the loop finishes the
    current step, saves a checkpoint and returns, so the next start resumes exactly there."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal (ranks may receive it at different steps)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            with named_collective("stop-flag all_reduce (StopFlag.agreed, once per step)"):
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class TrainState:
    step: int = 0
    stopped_by_signal: bool = False
    """True when the run stopped early on SIGUSR1/SIGTERM after saving a checkpoint."""
    skipped_steps: int = 0
    """Optimizer steps skipped because the loss or the gradient was not finite."""
    rewinds: int = 0
    """Divergence-guard rewinds in this process (train/guard.py; not saved in checkpoints)."""
    history: list[dict] = field(default_factory=list)
    """One record per step ({"step", "loss", "lr", "grad_norm"}), filled when the loop reads the device (up to
    `train.sync_every` steps late); after a rewind, the steps it abandoned are gone."""

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step), "skipped_steps": torch.tensor(self.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])


@dataclass(frozen=True)
class TrainerHooks:
    """What runs above training, handed in by the caller (evals/periodic.py builds them from the config)."""

    on_checkpoint: Callable[[int, Path], None] | None = None
    """(step, checkpoint dir), on every rank, once each checkpoint is complete."""
    at_end: Callable[["Trainer"], None] | None = None
    """On every rank, once the run reached `train.max_steps` (not after a stop signal), before the logger closes."""


HooksArg = Union[TrainerHooks, Callable[[DistInfo], TrainerHooks], None]


def write_resolved_config(cfg: JobConfig, run: RunDir, step: int) -> None:
    if not run.config.exists():
        dump_config(cfg, run.config)
    elif load_yaml(run.config) != to_dict(cfg):
        # The original stays; a changed resume keeps its own record beside it.
        dump_config(cfg, run.resumed_config(step))


class Trainer:
    """One run: built from its config in `__init__` (model and optimizer, data, encoders, checkpoints), trained by
    `train()`, released by `close()`."""

    def __init__(self, cfg: JobConfig, info: DistInfo, hooks: TrainerHooks):
        self.cfg, self.info, self.hooks = cfg, info, hooks
        self.run = RunDir(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        self.backend, self.dtype = build_model(cfg, info)
        # Installed before the (possibly long) rest of the setup: a SIGTERM while loading is then not fatal; the loop
        # stops after its first step and saves.
        self.stop = StopFlag().install()
        try:
            self._build_the_rest()
        except BaseException:
            self.close()
            raise
        self.logger: Logger | None = None
        self.progress: tqdm | None = None

    def _build_the_rest(self) -> None:
        """Data, encoders, schedule, EMA, checkpoints, guard and telemetry around the built model."""
        cfg, info = self.cfg, self.info
        max_tokens = cfg.objective.max_text_tokens
        # caption_length is only called while raw data is read (length grouping), after the encoders exist below
        self.loader = build_loader(cfg.data, batch_size=cfg.train.batch_size, dist=info, caption_length=lambda
                                   caption: self.encoders.text.token_count(caption, max_tokens=max_tokens))
        # Precomputed shards carry latents and text states: the VAE, T5 and CLIP are then never loaded for training.
        self.encoders = load_encoders(cfg, info, self.dtype, load=self.loader.dataset.kind != "precomputed")
        self.teacher = build_teacher(cfg, info, self.dtype)  # the frozen base for objective.kind: teacher, else None
        self.scheduler = build_scheduler(self.backend.optimizer, cfg.optim, cfg.train.max_steps)
        self.ema = EMA(self.backend.ema_tensors(), cfg.ema) if cfg.ema.decay > 0 else None
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.run, cfg.checkpoint, rank=info.rank, backend=self.backend,
                                             scheduler=self.scheduler, ema=self.ema, loader=self.loader,
                                             train_state=self.state)
        self.guard = DivergenceGuard(cfg.guard)
        # MFU (train/mfu.py): this rank's model FLOPs per second over the device's dense bf16 peak (GPUs it knows).
        model = self.backend.model
        self.telemetry = Telemetry(
            cfg.train, checkpoint_every=cfg.checkpoint.every_steps,
            flops=flops_model(getattr(model, "module", model)),  # DeepSpeed engines wrap it as .module
            peak=peak_flops(info.device), full=cfg.model.adapter.kind == "full",
            global_batch=cfg.train.batch_size * cfg.train.grad_accum * info.world_size)

    def train(self) -> TrainState:
        cfg, state = self.cfg, self.state
        # build or resume: the newest checkpoint that verifies (newer corrupt ones are moved aside, logged)
        resumed = self.checkpoints.resume(log=lambda line: print(line, flush=True))
        self._announce(resumed)
        self.logger = Logger(self.run.root, enabled=self.info.is_main)
        self.backend.model.train()
        if self.info.is_main and cfg.train.progress_bar and state.step < cfg.train.max_steps:
            self.progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", file=sys.stderr,
                                 dynamic_ncols=True)
        self.batches = forever(self.loader)
        self.telemetry.restart()

        # the step loop
        while state.step < cfg.train.max_steps:
            self.train_step()
            if self.progress:
                self.progress.update(1)
            self.checkpoints.poll()
            if not self.telemetry.is_read_step(state.step):
                continue

            # periodic work, at read steps only: every other step leaves its values on the device
            streak = self._read_device()
            if streak is not None:
                self._rewind(streak)  # or raises DivergenceError
                self.telemetry.restart()
                continue
            self._log()
            stopping = self.stop.agreed(self.info.device)  # one tiny collective per read step, on every rank
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps or stopping:
                self._save(state.step)
            self.telemetry.restart()
            if stopping and state.step < cfg.train.max_steps:
                state.stopped_by_signal = True
                if self.info.is_main:
                    print(f"[dedistill] stop signal: checkpoint saved at step {state.step}; exiting to be resumed",
                          flush=True)
                break

        # the end
        self.checkpoints.close()  # the last checkpoint is complete before the run ends (or exits to be requeued)
        self.stop.uninstall()
        if self.progress:
            self.progress.close()
        if self.hooks.at_end is not None and state.history and not state.stopped_by_signal:
            self.hooks.at_end(self)
        self.logger.close()
        barrier()
        return state

    def train_step(self) -> None:
        """One optimizer step: `train.grad_accum` micro-batches forward and backward, the loss averaged over ranks,
        then clip and step (skipped on the device when the loss or grad norm is not finite), no host sync."""
        cfg, info, state = self.cfg, self.info, self.state
        losses = []
        for micro in range(cfg.train.grad_accum):
            # HSDP: the earlier micro-batches reduce-scatter in the node only; the last all-reduces across nodes
            self.backend.prepare_micro_batch(micro, cfg.train.grad_accum)
            out = forward_backward_step(
                self.backend.model,
                next(self.batches),
                self.encoders,
                cfg.objective,
                generator=step_generator(cfg.seed, info.rank, state.step, micro, device=info.device),
                loss_scale=1.0 / cfg.train.grad_accum,
                teacher=self.teacher,
            )
            losses.append(out["loss"])
            self.telemetry.micro_batch(out["image_tokens"], out["text_tokens"])
        loss = all_reduce_mean(torch.stack(losses).mean(), op="loss all_reduce")
        lr = self.scheduler.get_last_lr()[0]
        # clip, optimizer step unless the loss or the global grad norm is not finite (all ranks agree; decided on the
        # device), zero grads
        result = self.backend.step(loss_finite=torch.isfinite(loss))
        self.scheduler.step()
        state.step += 1
        if self.ema:
            self.ema.update(state.step, result.applied)  # a skipped step leaves the EMA as it is
        self.telemetry.step(state.step, loss, lr, result)

    def close(self) -> None:
        self.stop.uninstall()
        self.backend.close()

    # ------------------------------------------------------------------------------------------- periodic work

    def _announce(self, resumed: Path | None) -> None:
        if not self.info.is_main:
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        write_resolved_config(self.cfg, self.run, self.state.step)
        n_train, n_total = self.backend.count_parameters()
        print(
            f"[dedistill] world={self.info.world_size} device={self.info.device} dtype={self.dtype} "
            f"backend={self.backend.name} adapter={self.cfg.model.adapter.kind} trainable={n_train:,}/{n_total:,} "
            + (f"resumed from {resumed}" if resumed else "fresh start"),
            flush=True,
        )

    def _read_device(self) -> Streak | None:
        """The unread steps into the history (one device read); the guard's streak if one reached K."""
        for r in self.telemetry.read():
            self.state.history.append({"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm})
            if not r.applied:
                self.state.skipped_steps += 1
                if self.info.is_main:
                    print(f"[dedistill] step {r.step - 1}: non-finite loss/grad ({r.loss}), step skipped", flush=True)
            streak = self.guard.observe(r.step, r.applied)
            if streak is not None:
                return streak  # the steps after it are abandoned by the rewind
        return None

    def _log(self) -> None:
        cfg, state = self.cfg, self.state
        if not self.info.is_main:
            return
        record = state.history[-1]
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            self.logger.scalars({"train/loss": record["loss"], "train/lr": record["lr"],
                                 "train/grad_norm": record["grad_norm"], **self.telemetry.throughput(),
                                 "train/skipped_steps": state.skipped_steps}, state.step)
        if self.progress:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def _save(self, step: int) -> Path:
        path = self.checkpoints.save(step)
        if self.info.is_main:
            # how long the loop stood still for this checkpoint (with async_save: only while the state was staged)
            blocked = self.checkpoints.last_blocked_s
            self.logger.scalars({"checkpoint/blocked_s": blocked}, step)
            print(f"[dedistill] checkpoint step {step}: loop blocked {blocked:.3f} s "
                  f"({'async' if self.cfg.checkpoint.async_save else 'sync'})", flush=True)
        if self.hooks.on_checkpoint is not None:
            self.checkpoints.wait()  # evals read the checkpoint: it must be complete
            self.hooks.on_checkpoint(step, path)
        return path

    def _rewind(self, streak: Streak) -> None:
        """guard.on_divergence=rewind (train/guard.py): the checkpoint before the streak, the loader where it is."""
        detected = self.state.step
        target = self.guard.rewind_target(self.checkpoints.complete(), streak)
        self.guard.decide(streak, target, detected_at=detected)  # raises DivergenceError unless a rewind is possible
        step, path = target
        self.checkpoints.rewind(step, path)
        self.state.rewinds += 1
        self.state.history = [h for h in self.state.history if h["step"] <= step]
        self.guard.reset()
        if self.info.is_main:
            print(f"[dedistill] guard: {streak.describe()}, detected at step {detected}; rewound to {path}; skipping "
                  f"the data of steps {step + 1}-{detected} ({(detected - step) * self.cfg.train.grad_accum} batches "
                  f"per rank)", flush=True)
            self.logger.scalars({"train/rewinds": self.state.rewinds}, step)
        if self.progress:
            self.progress.reset(total=self.cfg.train.max_steps)
            self.progress.update(step)


def train(cfg: JobConfig, hooks: HooksArg = None) -> TrainState:
    """Train `cfg` to `train.max_steps` (or to a stop signal). `hooks`: a `TrainerHooks`, or a function of this
    process's `DistInfo` that builds them once the process group exists (evals/periodic.py `trainer_hooks`)."""
    check_model_dir(cfg.model.path)
    info = init_distributed(cfg.parallel)
    try:
        built = hooks(info) if callable(hooks) else hooks or TrainerHooks()
        trainer = Trainer(cfg, info, built)
        try:
            return trainer.train()
        finally:
            trainer.close()
    finally:
        destroy_distributed()
