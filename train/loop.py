"""The training job, top to bottom: setup, resume, the step loop, checkpoints, the final CFG grid.

Run directly (a world of one) or under torchrun; the code path is the same.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import yaml

from train.adapters import adapter_groups, apply_adapter, trainable_named_parameters
from train.checkpoint import MARKER, CheckpointManager, list_checkpoints
from train.config import JobConfig, dump_config, to_dict
from train.data import build_loader, forever
from train.guard import DivergenceGuard, Streak
from train.lycoris_format import load_lycoris_lokr
from train.metrics import Logger
from train.mfu import flops_model, peak_flops
from train.model import check_model_dir, load_transformer, load_vae, meta_transformer, resolve_dtype
from train.optim import EMA, build_optimizer, build_scheduler
from train.parallel import Backend, StepConfig, build_backend
from train.parallel.load import materialize as materialize_sharded
from train.parallelize import (
    DistInfo, all_reduce_mean, barrier, destroy_distributed, init_distributed, named_collective, shard_text_encoder,
)
from train.quant import quant_target_names, quantize_linear, torchao_config
from train.step import Frozen, forward_backward_step
from train.teacher import build_teacher
from train.text import TextEncoder


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


def _write_resolved_config(cfg: JobConfig, run_dir: Path, step: int) -> None:
    path = run_dir / "config.yaml"
    if not path.exists():
        dump_config(cfg, path)
    elif yaml.safe_load(path.read_text()) != to_dict(cfg):
        # The original stays; a changed resume keeps its own record beside it.
        dump_config(cfg, run_dir / f"config.resumed_step_{step:08d}.yaml")


def build_model(cfg: JobConfig, info: DistInfo) -> tuple[Backend, torch.dtype]:
    """Base transformer, adapter, fp32 trainable params, then the parallel backend (FSDP2 or DeepSpeed,
    `parallel.backend`), which also builds the optimizer over the parameters in its own form.

    FSDP2 loads sharded (train/parallel/load.py): meta -> adapter -> fully_shard -> each rank reads only its rows of
    the base weights, so no rank ever holds the whole model. DeepSpeed gets the whole model on every rank and
    partitions it itself (docs/cluster.md says what that costs)."""
    dtype = resolve_dtype(cfg.model.dtype, info.device)
    sharded = cfg.parallel.backend == "fsdp2"
    guidance = dict(guidance=cfg.model.guidance, guidance_scale=cfg.model.guidance_scale)
    if sharded:
        transformer, weights = meta_transformer(cfg.model.path, dtype=dtype, **guidance)
    else:
        transformer = load_transformer(cfg.model.path, dtype=dtype, **guidance)
    apply_adapter(transformer, cfg.model.adapter)  # on meta: the new adapter's weights are still real (CPU)
    for _, p in trainable_named_parameters(transformer):
        p.data = p.data.float()  # fp32 master copy of what trains; frozen weights stay in `dtype`
    if cfg.model.adapter.init_from:  # after the fp32 cast: the file's factors are not rounded to `dtype`
        n = load_lycoris_lokr(transformer, cfg.model.adapter.init_from)
        if info.is_main:
            print(f"[dedistill] adapter init_from {cfg.model.adapter.init_from}: {n} LoKr layers", flush=True)
    if info.is_main:  # before sharding: what trains, and at which effective scale (LyCORIS users check this)
        for group in adapter_groups(transformer, cfg.model.adapter):
            print(f"[dedistill] adapter {group.line()}", flush=True)
    materialize = None
    quantized = quant_target_names(transformer) if cfg.model.base_quant != "none" else []
    if quantized:
        torchao_config(cfg.model.base_quant)  # a missing torchao fails here, before any weight is read
    if sharded:
        initial = {n: p.detach() for n, p in trainable_named_parameters(transformer) if not p.is_meta}
        transformer.to("meta")  # the adapter's initial values live on in `initial` until the shards are filled
        materialize = partial(materialize_sharded, index=weights, initial=initial, deferred=quantized,
                              finish=partial(quantize_linear, kind=cfg.model.base_quant))
    backend = build_backend(
        transformer,
        cfg.parallel,
        info=info,
        compute_dtype=dtype,
        step=StepConfig(
            micro_batch_size=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            grad_clip=cfg.train.grad_clip,
            activation_checkpointing=cfg.train.activation_checkpointing,
        ),
        make_optimizer=lambda params: build_optimizer(params, cfg.optim),
        materialize=materialize,
        replicated=frozenset(quantized),
    )
    return backend, dtype


def load_text_encoder(cfg: JobConfig, info: DistInfo, dtype: torch.dtype) -> TextEncoder:
    """T5 + CLIP where `model.text_encoder_placement` puts them (device, cpu, or T5 sharded with FSDP2)."""
    placement = cfg.model.text_encoder_placement
    text = TextEncoder(cfg.model.path, dtype=dtype, device=torch.device("cpu") if placement == "cpu" else info.device)
    if placement == "fsdp":
        shard_text_encoder(text.t5, info)
    return text


def load_frozen(cfg: JobConfig, info: DistInfo, dtype: torch.dtype, *, encoders: bool) -> Frozen:
    """The VAE and text encoders when `encoders` (raw data), else none of them (precomputed data)."""
    return Frozen(
        vae=load_vae(cfg.model.path, dtype=dtype, device=info.device) if encoders else None,
        text=load_text_encoder(cfg, info, dtype) if encoders else None,
        dtype=dtype,
        device=info.device,
    )


@contextmanager
def frozen_for_sampling(frozen: Frozen, cfg: JobConfig, info: DistInfo):
    """Sampling needs the VAE and the text encoders: a precomputed run loads them only for it, and frees them after."""
    if frozen.vae is not None and frozen.text is not None:
        yield frozen
        return
    parts = load_frozen(cfg, info, frozen.dtype, encoders=True)
    try:
        yield parts
    finally:
        parts.vae = parts.text = None
        gc.collect()


def train(cfg: JobConfig, *, on_checkpoint: Callable[[int, Path], None] | None = None) -> TrainState:
    check_model_dir(cfg.model.path)
    info = init_distributed(cfg.parallel)
    try:
        return _train(cfg, info, on_checkpoint)
    finally:
        destroy_distributed()


def _train(cfg: JobConfig, info: DistInfo, on_checkpoint) -> TrainState:
    from evals.periodic import make_eval_callback

    # Evals every eval.every_steps (inline or as submitted jobs); a failed eval never stops training.
    on_checkpoint = make_eval_callback(cfg, info, chain=on_checkpoint)
    torch.manual_seed(cfg.seed)
    backend, dtype = build_model(cfg, info)
    try:
        return _train_with(cfg, info, on_checkpoint, backend, dtype)
    finally:
        backend.close()


def _train_with(cfg: JobConfig, info: DistInfo, on_checkpoint, backend: Backend, dtype: torch.dtype) -> TrainState:
    run_dir = Path(cfg.run_dir)
    # Installed before the (possibly long) setup: a SIGTERM while loading is then not fatal; the loop stops after
    # its first step and saves.
    stop = StopFlag().install()
    transformer = backend.model
    max_tokens = cfg.objective.max_text_tokens
    # caption_length is only called while raw data is read (length grouping), after `frozen` exists below
    loader = build_loader(cfg.data, batch_size=cfg.train.batch_size,
                          caption_length=lambda caption: frozen.text.token_count(caption, max_tokens=max_tokens))
    # Precomputed shards carry latents and text states: the VAE, T5 and CLIP are then never loaded for training.
    frozen = load_frozen(cfg, info, dtype, encoders=loader.dataset.kind != "precomputed")
    teacher = build_teacher(cfg, info, dtype)  # None unless objective.kind is teacher
    optimizer = backend.optimizer
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ema = EMA(backend.ema_tensors(), cfg.ema) if cfg.ema.decay > 0 else None
    state = TrainState()
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, rank=info.rank)

    def payload() -> dict:
        out = {**backend.checkpoint_state(), "scheduler": scheduler.state_dict(), "train": state.state_dict()}
        if ema:
            out["ema"] = backend.ema_to_checkpoint(ema.state_dict())
        return out

    def restore(path: Path, *, data: bool = True) -> None:
        """Everything a checkpoint holds; `data=False` (a guard rewind) leaves the loader where it is."""
        loaded = payload()
        extras = ckpt.load(path, loaded)
        backend.load_checkpoint_state(loaded)
        scheduler.load_state_dict(loaded["scheduler"])
        state.load_state_dict(loaded["train"])
        if ema:
            backend.ema_from_checkpoint(loaded["ema"], ema.shadow)
        if data and extras.get("data") is not None:
            loader.load_state_dict(extras["data"])

    # The newest checkpoint that verifies (sizes, sha256, DCP structure); newer corrupt ones are moved aside, logged.
    latest = ckpt.resume_from(log=partial(print, flush=True)) if cfg.checkpoint.resume else None
    if latest is not None:
        restore(latest)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_resolved_config(cfg, run_dir, state.step)
        n_train, n_total = backend.count_parameters()
        print(
            f"[dedistill] world={info.world_size} device={info.device} dtype={dtype} backend={backend.name} "
            f"adapter={cfg.model.adapter.kind} trainable={n_train:,}/{n_total:,} "
            + (f"resumed from {latest}" if latest else "fresh start"),
            flush=True,
        )
    logger = Logger(run_dir, enabled=info.is_main)
    transformer.train()

    def save(step: int) -> Path:
        path = ckpt.save(step, payload(), per_rank={"data": loader.state_dict()})
        if info.is_main:
            # how long the loop stood still for this checkpoint (with async_save: only while the state was staged)
            logger.scalars({"checkpoint/blocked_s": ckpt.last_blocked_s}, step)
            print(f"[dedistill] checkpoint step {step}: loop blocked {ckpt.last_blocked_s:.3f} s "
                  f"({'async' if cfg.checkpoint.async_save else 'sync'})", flush=True)
        if on_checkpoint is not None:
            ckpt.wait()  # evals read the checkpoint: it must be complete
            on_checkpoint(step, path)
        return path

    progress = None
    if info.is_main and cfg.train.progress_bar and state.step < cfg.train.max_steps:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", file=sys.stderr, dynamic_ncols=True)

    batches = forever(loader)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * info.world_size
    # MFU (train/mfu.py): this rank's model FLOPs per second over the device's dense bf16 peak (GPUs it knows).
    flops = flops_model(getattr(transformer, "module", transformer))  # DeepSpeed engines wrap it as .module
    peak = peak_flops(info.device)
    guard = DivergenceGuard(cfg.guard)
    # Each step's loss, grad norm and applied flag stay on the device until the next read (`is_read_step`): one
    # device-to-host copy for the window instead of a sync per step.
    pending: list[dict] = []
    window = {"t0": time.perf_counter(), "steps": 0, "flops": 0.0}

    def is_read_step(step: int) -> bool:
        """The steps at which the host reads the device; a function of the step only, so every rank agrees."""
        t = cfg.train
        return (step % t.sync_every == 0 or step % t.log_every == 0 or step % cfg.checkpoint.every_steps == 0
                or step == t.max_steps)

    def read_window() -> Streak | None:
        """Move the pending records into the history (one device read); the streak that reached K, if any."""
        if not pending:
            return None
        values = torch.stack([
            torch.stack([r["loss"].float(), r["grad_norm"].to(r["loss"].device, torch.float32),
                         r["applied"].to(r["loss"].device, torch.float32)])
            for r in pending
        ]).tolist()  # (n, 3): the window's only host sync
        records, pending[:] = list(pending), []
        for r, (loss_value, norm, applied) in zip(records, values):
            state.history.append({"step": r["step"], "loss": loss_value, "lr": r["lr"], "grad_norm": norm})
            if not applied:
                state.skipped_steps += 1
                if info.is_main:
                    print(f"[dedistill] step {r['step'] - 1}: non-finite loss/grad ({loss_value}), step skipped",
                          flush=True)
            streak = guard.observe(r["step"], bool(applied))
            if streak is not None:
                return streak
        return None

    def rewind(streak: Streak) -> None:
        """guard.on_divergence=rewind (train/guard.py): the checkpoint before the streak, the loader where it is."""
        ckpt.wait()
        detected = state.step
        target = guard.rewind_target(list_checkpoints(ckpt.root), streak)
        guard.decide(streak, target, detected_at=detected)  # raises DivergenceError unless a rewind is possible
        step, path = target
        restore(path, data=False)
        barrier()  # every rank has read it before the abandoned steps' checkpoints go
        if info.is_main:
            for s, p in list_checkpoints(ckpt.root, complete_only=False):
                if s > step:
                    (p / MARKER).unlink(missing_ok=True)  # first: a half-deleted directory must never count
                    shutil.rmtree(p, ignore_errors=True)
        barrier()
        state.rewinds += 1
        state.history = [h for h in state.history if h["step"] <= step]
        guard.reset()
        if info.is_main:
            print(f"[dedistill] guard: {streak.describe()}, detected at step {detected}; rewound to {path}; skipping "
                  f"the data of steps {step + 1}-{detected} ({(detected - step) * cfg.train.grad_accum} batches per "
                  f"rank)", flush=True)
            logger.scalars({"train/rewinds": state.rewinds}, step)
        if progress:
            progress.reset(total=cfg.train.max_steps)
            progress.update(step)

    while state.step < cfg.train.max_steps:
        losses = []
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            out = forward_backward_step(
                transformer,
                batch,
                frozen,
                cfg.objective,
                generator=step_generator(cfg.seed, info.rank, state.step, micro, device=info.device),
                loss_scale=1.0 / cfg.train.grad_accum,
                teacher=teacher,
            )
            losses.append(out["loss"])
            window["flops"] += flops.per_step(
                image_tokens=out["image_tokens"], text_tokens=out["text_tokens"], batch=cfg.train.batch_size,
                full=cfg.model.adapter.kind == "full",
            )
        loss = all_reduce_mean(torch.stack(losses).mean(), op="loss all_reduce")
        lr = scheduler.get_last_lr()[0]
        # clip, optimizer step unless the loss or the global grad norm is not finite (all ranks agree; decided on the
        # device), zero grads
        result = backend.step(loss_finite=torch.isfinite(loss))
        scheduler.step()
        state.step += 1
        if ema:
            ema.update(state.step, result.applied)  # a skipped step leaves the EMA as it is
        pending.append({"step": state.step, "loss": loss.detach(), "lr": lr, "grad_norm": result.grad_norm,
                        "applied": result.applied})
        window["steps"] += 1
        if progress:
            progress.update(1)
        ckpt.poll()  # marks an async checkpoint complete as soon as its write has finished (host-only)
        if not is_read_step(state.step):
            continue

        streak = read_window()
        if streak is not None:
            rewind(streak)  # or raises DivergenceError
            window.update(t0=time.perf_counter(), steps=0, flops=0.0)
            continue
        dt = (time.perf_counter() - window["t0"]) / window["steps"]  # per step, over the steps since the last read
        record = state.history[-1]
        if info.is_main:
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                logger.scalars(
                    {
                        "train/loss": record["loss"],
                        "train/lr": record["lr"],
                        "train/grad_norm": record["grad_norm"],
                        "train/step_time_s": dt,
                        "train/samples_per_s": global_batch / dt,
                        "train/tflops_per_device": window["flops"] / window["steps"] / dt / 1e12,
                        **({"train/mfu": window["flops"] / window["steps"] / dt / peak} if peak else {}),
                        "train/skipped_steps": state.skipped_steps,
                    },
                    state.step,
                )
            if progress:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        stopping = stop.agreed(info.device)  # one tiny collective per read step, on every rank
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps or stopping:
            save(state.step)
        window.update(t0=time.perf_counter(), steps=0, flops=0.0)
        if stopping and state.step < cfg.train.max_steps:
            state.stopped_by_signal = True
            if info.is_main:
                print(f"[dedistill] stop signal: checkpoint saved at step {state.step}; exiting to be resumed", flush=True)
            break

    ckpt.close()  # the last checkpoint is complete before the run ends (or the job exits to be requeued)
    stop.uninstall()
    if progress:
        progress.close()
    if cfg.sample.at_end and state.history and not state.stopped_by_signal:
        from evals.sampler import sample_grid_for_run

        with frozen_for_sampling(frozen, cfg, info) as parts:
            sample_grid_for_run(backend.module, parts, cfg, step=state.step, logger=logger, is_main=info.is_main)
    logger.close()
    barrier()
    return state
