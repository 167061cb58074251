"""Saving and resuming a training run: `CheckpointStore` writes and reads checkpoints (any state dict), and
`CheckpointManager` is handed a run's stateful objects once and saves, resumes and rewinds them.

A checkpoint is `<run>/checkpoints/step_<N:08d>/` (train/checkpoint/format.py). `COMPLETE` (JSON: step, world size,
timings, and the manifest of every other file) is written last, by rank 0, after every rank finished: a checkpoint
without it never counts, so a job killed in the middle of a save resumes from the previous one.

With `checkpoint.async_save`, `save` returns once DCP has staged the state (a host copy) and the shards are written
by a background thread over a process group of its own. When that write has finished (DCP's save finishes on every
rank only after rank 0 has gathered every rank's write results, and each rank writes its `rank_<r>.pt` before its
shards), the same thread completes the checkpoint as a synchronous save does.

Completing a checkpoint (`_finish`, collective): each rank hashes the files it wrote, rank 0 writes `COMPLETE` with
the manifest (size and sha256 of every file: train/checkpoint/verify.py), checks the new checkpoint against it, and
only then prunes to `keep_last`. Any rank's failure on the way (a full disk, a quota) is agreed on by all ranks,
which raise `CheckpointSaveError` naming the path, after rank 0 removed the partial directory; older checkpoints are
never touched by a save that did not complete. On resume, `resume_from` verifies the newest checkpoint (every rank a
slice of its files) and falls back past any that do not verify, moving them aside to `step_<N>.corrupt`.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import train.checkpoint.verify as verify
from train.checkpoint.format import (
    MARKER, is_complete, latest_checkpoint, list_checkpoints, rank_file, rng_state, safe_load, safe_torch_load,
    set_rng_state,
)
from train.config import CheckpointConfig
from train.optim import EMA
from train.outputs import write_text_atomic
from train.parallel import Backend
from train.parallelize import barrier
from train.run_dir import RunDir


def _to_builtin(obj: Any) -> Any:
    """Data-loader state as plain JSON-able values (streaming returns ints/strs)."""
    return json.loads(json.dumps(obj))


@dataclass
class _Pending:
    """An async save in flight: `future` resolves once the checkpoint is marked complete (or the save failed)."""

    step: int
    path: Path
    future: Future


class CheckpointSaveError(ValueError):
    """A save that could not finish (a full disk, a quota, an I/O error). Every rank raises it at the same step, the
    partial directory is removed, and the previous checkpoints are untouched. A ValueError so that the CLI reports
    it in one line, as it does a bad input: a person has to act (free space) before the run can go on."""


def _cause(exc: BaseException) -> str:
    """One line for what went wrong: DCP wraps a rank's OSError in a CheckpointException listing every rank."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, (inner, _trace) = next(iter(sorted(failures.items())))
        return f"rank {rank}: {_cause(inner)}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" ('{exc.filename}')" if exc.filename else "")
    text = (str(exc).splitlines() or [type(exc).__name__])[-1].strip()
    if "unexpected pos" in text or "file write failed" in text:
        # torch's stream writer (DCP writes tensors through it) on a short write; the errno is lost on the way
        return f"a short write ({text.split('] ')[-1].strip(' .')}): the disk or quota is full, or an I/O error"
    return text


class CheckpointStore:
    """The checkpoints of one run: a state dict saved completely or not at all, the newest `keep_last` kept, the
    newest one that verifies found on resume. Knows nothing of what the state holds (`CheckpointManager` does)."""

    def __init__(self, run_dir: str | Path | RunDir, cfg: CheckpointConfig, *, rank: int):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.root = self.run.checkpoints
        self.cfg = cfg
        self.rank = rank
        self.pending: _Pending | None = None
        self.last_blocked_s = 0.0
        """How long the last `save` blocked its caller (the whole save, or only the staging when async)."""
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Gloo, whatever the training backend: the save's agreement and hash gathering are CPU objects, and an
            # async save's background write runs collectives (planning, the final gather, the marker) while
            # training runs its own; a group of its own keeps the two streams apart (as torchtitan does), and gives
            # DCP's async save the CPU backend it requires next to NCCL.
            self._group = dist.new_group(backend="gloo")

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    # ---------------------------------------------------------------------------------------------- collectives

    def _world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def _agree(self, error: str | None) -> str | None:
        """Every rank learns the first rank's error (or None): all ranks then fail, or go on, together."""
        if self._group is None:
            return error
        errors: list[str | None] = [None] * self._world()
        dist.all_gather_object(errors, error, group=self._group)
        return next((e for e in errors if e is not None), None)

    def _gather_all(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self._world()
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _gather_to_main(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        out = [None] * self._world() if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out or []

    # ---------------------------------------------------------------------------------------------------- save

    def save(self, step: int, state: dict[str, Any], *, per_rank: dict[str, Any]) -> Path:
        """`state` holds DCP-able entries (tensors / DTensors / nested dicts); `per_rank` this rank's extras.

        Synchronous: returns when the checkpoint is complete. Async (`checkpoint.async_save`): returns once the state
        is staged; the checkpoint is complete after `wait()` (or a `poll()` that saw it finish). A save that fails
        (disk full, quota, I/O error) raises `CheckpointSaveError` on every rank, naming the path — for an async save
        at the next `wait()`, which every rank calls at the same step (the next save, or the end of the run)."""
        self.wait()  # one save in flight at a time: the previous one completes (and is marked) first
        path = self.run.checkpoint(step)
        t0 = time.perf_counter()
        error = None
        try:
            if self.rank == 0:
                if path.exists():  # a half-written save of the same step from a killed run
                    shutil.rmtree(path)
                path.mkdir(parents=True)
        except OSError as e:
            error = f"creating the directory: {_cause(e)}"
        self._raise_if(self._agree(error), step, path)
        try:
            # Before the shards: once rank 0's DCP save has finished, every rank's file is then known to exist.
            # Serialized in memory, then written: torch.save's own file writer reports a full disk as "unexpected
            # pos 64 vs 0", a plain write as "No space left on device".
            buf = io.BytesIO()
            torch.save({"rng": rng_state(), "data": _to_builtin(per_rank.get("data")), "step": step}, buf)
            (path / rank_file(self.rank)).write_bytes(buf.getvalue())
        except OSError as e:
            error = f"writing {rank_file(self.rank)}: {_cause(e)}"
        self._raise_if(self._agree(error), step, path)
        if self.cfg.async_save:
            # No agreement on our group from here on in this thread: DCP's writer thread is using it now.
            response = dcp.async_save(state, checkpoint_id=str(path), process_group=self._group)
            written = getattr(response, "upload_completion", response)  # an AsyncSaveResponse with async staging
            self.last_blocked_s = blocked = time.perf_counter() - t0
            done: Future = Future()

            def finish(f: Future) -> None:
                # Runs where the write finished (DCP's writer thread, on every rank), or here if it already has.
                try:
                    error = None if f.exception() is None else f"writing the shards: {_cause(f.exception())}"
                    self._finish(step, path, error, t0=t0, blocked_s=blocked)
                    done.set_result(path)
                except BaseException as e:
                    done.set_exception(e)

            self.pending = _Pending(step, path, done)
            written.add_done_callback(finish)
            return path
        try:
            dcp.save(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP raises the same CheckpointException on every rank
            error = f"writing the shards: {_cause(e)}"
        self._finish(step, path, error, t0=t0)
        self.last_blocked_s = time.perf_counter() - t0
        return path

    def _finish(self, step: int, path: Path, error: str | None, *, t0: float, blocked_s: float | None = None) -> None:
        """Collective, once every rank's files are written: each rank hashes its own files, rank 0 gathers them,
        writes COMPLETE with the manifest, verifies the new checkpoint against it, and only then prunes."""
        hashes = {}
        if error is None:
            try:
                hashes = verify.hash_files(path, verify.files_of_rank(path, self.rank))
            except OSError as e:
                error = f"reading back: {_cause(e)}"
        gathered = self._gather_to_main(hashes)
        if self.rank == 0 and error is None:
            try:
                meta = {"step": step, "world_size": self._world(), "seconds": round(time.perf_counter() - t0, 3)}
                if blocked_s is not None:
                    meta.update(async_save=True, blocked_s=round(blocked_s, 3))
                meta[verify.MANIFEST_KEY] = verify.manifest(path, gathered)
                # the files were just hashed; what is left to check before the marker is DCP's structure
                problem = verify.check_structure(path, meta)
                if problem:
                    error = f"the new checkpoint does not verify: {problem}"
                else:
                    self._mark_complete(path, meta)
            except OSError as e:
                error = f"writing {MARKER}: {_cause(e)}"
            except Exception as e:  # never leave the other ranks waiting in the agreement below
                error = f"completing: {type(e).__name__}: {_cause(e)}"
        self._raise_if(self._agree(error), step, path)
        if self.rank == 0:
            self._prune()  # only now: the new checkpoint is complete and verified

    def _raise_if(self, error: str | None, step: int, path: Path) -> None:
        if error is None:
            return
        try:
            left = shutil.disk_usage(self.root).free  # before the partial dir is removed: the space at the failure
            free = "No space left on device" if left < (1 << 16) else f"{left:,} bytes were free there"
        except OSError:
            free = "free space unknown"
        free = "" if free in error else f" ({free})"
        self._agree(None)  # (a barrier on our group) every rank has looked before rank 0 removes the partial dir
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # a partial dir never counts; removing it gives the space back
        previous = [p for s, p in list_checkpoints(self.root) if s < step]
        keep = f"the previous checkpoint '{previous[-1]}' is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointSaveError(
            f"checkpoint save failed: '{path}': {error}{free}; {keep}; the run stops here: free space (or raise "
            f"the quota) and start it again to resume from the newest good checkpoint"
        )

    def poll(self) -> None:
        """Forget an async save that has completed (never blocks, never raises); call it once per step. A failed
        one stays pending, so that every rank raises it at the same step, in `wait`."""
        if self.pending is not None and self.pending.future.done() and self.pending.future.exception() is None:
            self.pending = None

    def wait(self) -> None:
        """Block until the async save in flight (if any) is complete; re-raise its failure here, on every rank."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None

    def _mark_complete(self, path: Path, meta: dict) -> None:
        # atomic: the marker appears whole or not at all; fsync: it is durable before any older checkpoint is pruned
        write_text_atomic(path / MARKER, json.dumps(meta), fsync=True)

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        keep = {p for _, p in complete[-self.cfg.keep_last :]}
        newest = complete[-1][0] if complete else -1
        for s, p in list_checkpoints(self.root, complete_only=False):
            # Older incomplete dirs are debris of killed saves; newer ones may be an async save still being written.
            if p not in keep and s <= newest:
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------------------------------------- resume

    def resume_from(self, log=print) -> Path | None:
        """The newest checkpoint that verifies (every rank checks a slice of its files; all agree). Newer ones that
        do not are moved aside to `step_<N>.corrupt` and named in one line each; if none verifies, raise."""
        candidates = [p for _, p in list_checkpoints(self.root)]
        if self._group is not None:  # one listing for all ranks, whatever each one's filesystem view
            box = [candidates]
            dist.broadcast_object_list(box, src=0, group=self._group)
            candidates = box[0]
        bad: list[tuple[Path, verify.Problem]] = []
        chosen = None
        for path in reversed(candidates):
            try:
                mine = verify.check(path, part=(self.rank, self._world()))
            except OSError as e:
                mine = verify.Problem("(checkpoint dir)", _cause(e))
            found = [p for p in self._gather_all(mine) if p is not None]
            if not found:
                chosen = path
                break
            bad.append((path, min(found, key=lambda p: p.file)))
        if bad and chosen is None:
            lines = "; ".join(f"{p.name}: {problem}" for p, problem in bad)
            raise ValueError(
                f"no checkpoint in '{self.root}' verifies ({lines}); nothing was moved: fix or move them away, or "
                f"set checkpoint.resume=false to start afresh"
            )
        barrier()
        if self.rank == 0:
            for path, problem in bad:
                moved = verify.quarantine(path)
                log(f"[dedistill] checkpoint {path.name} is corrupt: {problem}; moved to {moved.name}, "
                    f"falling back to {chosen.name}")
        barrier()
        return chosen

    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Loads DCP entries into `state` in place; restores this rank's RNG; returns its per-rank extras."""
        if not is_complete(path):
            raise ValueError(f"checkpoint '{path}' is incomplete (no {MARKER} marker)")
        saved_world = json.loads((path / MARKER).read_text()).get("world_size")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved_world is not None and saved_world != world:
            raise ValueError(
                f"checkpoint '{path}' was written by {saved_world} processes, this run has {world}: resume with the "
                f"same number (RNG and data-loader position are per rank)"
            )
        safe_load(state, path)
        own = path / rank_file(self.rank)
        if not own.is_file():
            raise ValueError(f"checkpoint '{path}' has no {own.name}: it was written with a different world size")
        extras = safe_torch_load(own, name=str(own))
        set_rng_state(extras["rng"])
        return extras


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointManager:
    """A training run's checkpoints, handed once everything a resume needs: the model and optimizer (through the
    parallel backend, which puts them in the one layout both backends share), the LR scheduler, the EMA, the data
    loader (per rank, with the RNG) and the train state (step, skipped steps). It alone decides what a checkpoint
    holds:

        model.<fqn>, optim.*        backend.checkpoint_state()
        scheduler                   the LR scheduler's state
        train                       {"step", "skipped_steps"}
        ema.<fqn>                   with an EMA, in the backend's layout
        rank_<r>.pt                 this rank's RNG and data-loader position (CheckpointStore)
    """

    def __init__(self, run: RunDir, cfg: CheckpointConfig, *, rank: int, backend: Backend, scheduler: Stateful,
                 ema: EMA | None, loader: Stateful, train_state: Stateful):
        self.cfg = cfg
        self.rank = rank
        self.store = CheckpointStore(run, cfg, rank=rank)
        self.backend, self.scheduler, self.ema = backend, scheduler, ema
        self.loader, self.train_state = loader, train_state

    @property
    def last_blocked_s(self) -> float:
        return self.store.last_blocked_s

    def state_dict(self) -> dict[str, Any]:
        """The DCP part of a checkpoint (tensors, DTensors, nested dicts), read from the live objects."""
        out = {**self.backend.checkpoint_state(), "scheduler": self.scheduler.state_dict(),
               "train": self.train_state.state_dict()}
        if self.ema is not None:
            out["ema"] = self.backend.ema_to_checkpoint(self.ema.state_dict())
        return out

    def save(self, step: int) -> Path:
        return self.store.save(step, self.state_dict(), per_rank={"data": self.loader.state_dict()})

    def restore(self, path: Path, *, data: bool = True) -> None:
        """Everything checkpoint `path` holds, into the live objects; `data=False` leaves the loader where it is."""
        loaded = self.state_dict()
        extras = self.store.load(path, loaded)
        self.backend.load_checkpoint_state(loaded)
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.train_state.load_state_dict(loaded["train"])
        if self.ema is not None:
            self.backend.ema_from_checkpoint(loaded["ema"], self.ema.shadow)
        if data and extras.get("data") is not None:
            self.loader.load_state_dict(extras["data"])

    def resume(self, log: Callable[[str], None] = print) -> Path | None:
        """Restore the newest checkpoint that verifies and return it; None on a fresh start or with
        `checkpoint.resume=false`. Newer corrupt ones are moved aside, one logged line each."""
        latest = self.store.resume_from(log=log) if self.cfg.resume else None
        if latest is not None:
            self.restore(latest)
        return latest

    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete checkpoint, once the save in flight (if any) has completed."""
        self.store.wait()
        return list_checkpoints(self.store.root)

    def rewind(self, step: int, path: Path) -> None:
        """Back to checkpoint `path` (step `step`), the data loader left where it is; the checkpoints after it belong
        to abandoned steps and are deleted. Collective."""
        self.store.wait()
        self.restore(path, data=False)
        barrier()  # every rank has read it before the abandoned steps' checkpoints go
        if self.rank == 0:
            for s, p in list_checkpoints(self.store.root, complete_only=False):
                if s > step:
                    (p / MARKER).unlink(missing_ok=True)  # first: a half-deleted directory must never count
                    shutil.rmtree(p, ignore_errors=True)
        barrier()

    def poll(self) -> None:
        """Marks an async checkpoint complete as soon as its write has finished (host-only); once per step."""
        self.store.poll()

    def wait(self) -> None:
        self.store.wait()

    def close(self) -> None:
        """The last checkpoint is complete before this returns."""
        self.store.close()

