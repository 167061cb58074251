"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run_dir>/checkpoints/step_<N:08d>/` holds the DCP shards (model trainable state, optimizer, scheduler, EMA,
step) plus one `rank_<r>.pt` per rank with what differs per rank (RNG states, data-loader position). The file
`COMPLETE` (JSON: step, world size, timings, and the manifest of every other file) is written last, by rank 0, after
every rank finished: a checkpoint without it never counts, so a job killed in the middle of a save resumes from the
previous one.

With `checkpoint.async_save`, `save` returns once DCP has staged the state (a host copy) and the shards are written
by a background thread over a process group of its own. When that write has finished (DCP's save finishes on every
rank only after rank 0 has gathered every rank's write results, and each rank writes its `rank_<r>.pt` before its
shards), the same thread completes the checkpoint as a synchronous save does.

Completing a checkpoint (`_finish`, collective): each rank hashes the files it wrote, rank 0 writes `COMPLETE` with
the manifest (size and sha256 of every file: train/checkpoint_verify.py), checks the new checkpoint against it, and
only then prunes to `keep_last`. Any rank's failure on the way (a full disk, a quota) is agreed on by all ranks,
which raise `CheckpointSaveError` naming the path, after rank 0 removed the partial directory; older checkpoints are
never touched by a save that did not complete. On resume, `resume_from` verifies the newest checkpoint (every rank a
slice of its files) and falls back past any that do not verify, moving them aside to `step_<N>.corrupt`.

Loading never unpickles arbitrary objects from a checkpoint: DCP's `.metadata` is a pickle, read here with an
unpickler that only admits DCP's own metadata classes (`SafeReader`), and DCP's non-tensor entries (optimizer param
groups, scheduler state) are loaded with `torch.load(weights_only=True)` (`SafeLoadPlanner`). `safe_load` is the one
entry point for reading DCP checkpoints (training resume, inference, export).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from train import checkpoint_verify as verify
from train.checkpoint_verify import MARKER, rank_file
from train.config import CheckpointConfig
from train.parallelize import barrier

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(root: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete_only):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# What a DCP `.metadata` pickle may name (torch 2.6-2.14); anything else is refused, never imported or called.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never does")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` unpickler admits only DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class RefusedFile(ValueError):
    """A checkpoint file holds a pickle the safe loader refuses: said in one line, naming the file."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"checkpoint file {file} refused, nothing loaded: {reason}")
        self.file = file
        self.reason = reason


def safe_torch_load(source: str | Path | io.BytesIO, *, name: str) -> Any:
    """`torch.load(weights_only=True)`; a refusal becomes one line naming `name` and the global the pickle asked for.
    torch's own message would suggest `weights_only=False`, which here would run whatever the file says."""
    try:
        return torch.load(source, weights_only=True)
    except pickle.UnpicklingError as e:
        said = re.search(r"GLOBAL (\S+)", str(e))
        why = (f"its pickle names {said.group(1)}, which no checkpoint holds" if said
               else f"its pickle is not plain data ({next((ln for ln in str(e).splitlines()[1:] if ln.strip()), '')[:120]})")
        raise RefusedFile(name, f"{why}; it is not what a save writes (replaced after the save?)") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

        info = getattr(self, "metadata", None) and self.metadata.storage_data.get(read_item.storage_index)
        where = f"{info.relative_path} (entry {read_item.dest_index.fqn})" if info else read_item.dest_index.fqn
        obj = safe_torch_load(value, name=where)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict[str, Any], path: str | Path, *, no_dist: bool = False) -> None:
    """`dcp.load` into `state` (in place) without unpickling anything but plain data and DCP's own metadata."""
    with warnings.catch_warnings():
        # DCP warns "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a
        # single process" on every load without collectives, even when no_dist=True says exactly that (torch 2.14,
        # state_dict_loader.load). Only that message, only for this call.
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        try:
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
        except CheckpointException as e:  # DCP wraps each rank's error with its traceback: ours is the line to say
            refused = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            refused = [f for f in refused if isinstance(f, RefusedFile)]
            if refused:
                raise refused[0] from None
            raise


def read_metadata(path: str | Path):
    """The DCP metadata of a checkpoint (key -> storage metadata), read safely."""
    return SafeReader(str(path)).read_metadata()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, rank: int):
        self.root = Path(run_dir) / "checkpoints"
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
        path = step_dir(self.root, step)
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
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.rename(path / MARKER)  # atomic: the marker appears whole or not at all

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
