"""Training input: MosaicML Streaming MDS shards (local directory or object store) -> batches for the step.

Three dataset layouts, told apart by the files at the dataset root (docs/data.md):
- raw (`dedistill data convert`): `index.json`; encoded image bytes + caption; every image is scaled and centre
  cropped to `data.resolution` squared. Batches: {"caption": [str], "pixels": (B, 3, R, R)}.
- raw, bucketed (`dedistill data bucket`): `buckets.json` + one MDS directory per aspect bucket; with
  `data.buckets` every batch comes from one bucket and each image is scaled to cover its bucket and centre cropped.
  Batches: {"caption", "pixels": (B, 3, H, W)}.
- precomputed (`dedistill data precompute`): `buckets.json` (kind "precomputed") + per-bucket directories holding
  normalised VAE latent mean/std, unpadded T5 states and CLIP pooled vectors, plus the stored empty-prompt
  encoding for caption dropout. Batches: {"caption", "latent_mean", ["latent_std"], "t5", "t5_mask", "pooled",
  "empty_t5", "empty_mask", "empty_pooled", "max_text_tokens"}; `train.step` uses them instead of the encoders.

Bucketed layouts give one `Stream` per bucket and use streaming's `batching_method="per_stream"`: each global
batch (all ranks, same step) comes from one bucket, and the order is a pure function of (shuffle_seed, epoch), so
the loader's state_dict (saved in every checkpoint) resumes exactly.

Each rank streams its own partition; the loader's state goes into every checkpoint so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from train.config import DataConfig
from train.parallelize import DistInfo, barrier, process_dist
from train.images import open_rgb, to_rgb
from train.outputs import atomic_write

log = logging.getLogger(__name__)


def resize_cover_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (bicubic) so the image covers width x height, then crop the centre: one documented way, done once."""
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to `size` (bicubic), then crop the centre square."""
    return resize_cover_crop(img, size, size)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1], the VAE's input range (any mode: `train.images.to_rgb`)."""
    arr = np.asarray(to_rgb(img), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_image(data: bytes, size: int, height: int | None = None) -> torch.Tensor:
    """Encoded bytes -> (3, height, size) in [-1, 1]: cover-scaled and centre cropped (square when height is None)."""
    return image_to_tensor(resize_cover_crop(open_rgb(data), size, size if height is None else height))  # train.images


# ------------------------------------------------------------------------------------------------------ layouts


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def _fetch(cfg: DataConfig, name: str, sub: str = "") -> Path | None:
    """A small file at the dataset root (or in its subdir `sub`): the local copy, or downloaded from data.remote
    (None when absent)."""
    local = Path(cfg.local, sub)
    if cfg.remote is None:
        path = local / name
        return path if path.is_file() else None
    # deferred: importing train.data must not import streaming (see _train_samples_class)
    from streaming.base.storage.download import CloudDownloader

    from train.remote import object_absent

    local.mkdir(parents=True, exist_ok=True)
    remote = _join(cfg.remote, sub) if sub else cfg.remote

    def download(tmp: Path) -> None:
        # atomic_write's temporary name is fresh per call: the downloader skips existing files, and an old cache
        # must not shadow the remote.
        for attempt in range(1 + cfg.download_retry):
            try:
                CloudDownloader.direct_download(_join(remote, name), str(tmp), timeout=cfg.download_timeout)
                return
            except Exception as e:
                tmp.unlink(missing_ok=True)
                # Absent (a raw layout has no buckets.json) is an answer; a reset connection is not: a flaky store
                # must not turn a bucketed dataset into a "raw" one. Unreachable after the retries: the index fetch
                # will tell.
                if object_absent(e) or attempt == cfg.download_retry:
                    raise _NotFetched(e) from e

    dest = local / name
    try:
        atomic_write(dest, download)
    except _NotFetched as e:
        log.debug("no %s at %s: %s", name, remote, e.args[0])
        return None
    return dest


class _NotFetched(Exception):
    """`_fetch`'s download found no file (absent, or unreachable after the retries): `_fetch` answers None."""


def read_layout(cfg: DataConfig) -> dict | None:
    """buckets.json of a bucketed or precomputed dataset (None for a plain `data convert` directory)."""
    path = _fetch(cfg, "buckets.json")
    return json.loads(path.read_text()) if path is not None else None


def _check_source(cfg: DataConfig) -> None:
    if not cfg.local:
        raise ValueError("data.local: must be set (the shard directory, or a local cache when data.remote is set)")
    local = Path(cfg.local)
    if cfg.remote is None and not ((local / "index.json").is_file() or (local / "buckets.json").is_file()):
        hint = " (a bucket/precompute run that has not finished: see its report)" if (local / "parts").is_dir() else ""
        raise ValueError(
            f"data.local: '{cfg.local}' has no index.json or buckets.json{hint} (expected MDS shards; see "
            f"dedistill data convert)"
        )


def _check_layout(cfg: DataConfig, layout: dict | None) -> None:
    if layout is None:
        if cfg.buckets:
            raise ValueError(
                f"data.buckets: '{cfg.remote or cfg.local}' is not bucketed (no buckets.json); run `dedistill data "
                f"bucket` (raw) or `dedistill data precompute` on it, or set data.buckets=false"
            )
        return
    n_buckets = sum(1 for b in layout["buckets"] if b["samples"])
    if layout["resolution"] != cfg.resolution:
        raise ValueError(
            f"data.resolution: {cfg.resolution}, but '{cfg.remote or cfg.local}' was bucketed/precomputed for "
            f"{layout['resolution']}"
        )
    if layout["kind"] == "precomputed" and n_buckets > 1 and not cfg.buckets:
        raise ValueError(
            f"data.buckets: false, but '{cfg.remote or cfg.local}' holds precomputed latents in {n_buckets} aspect "
            f"buckets (they cannot share a batch); set data.buckets=true"
        )


# ------------------------------------------------------------------------------------------------------ samples


def _tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array as float32; bf16 is stored as its raw 16 bits (numpy has no bfloat16)."""
    if dtype == "bf16":
        return torch.from_numpy(np.array(arr).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: MDS arrays are read-only views


def _train_samples_class():
    """TrainSamples is built on first use so that importing train.data does not import streaming (and, through
    it, transformers); module `__getattr__` below makes it picklable as train.data.TrainSamples (loader workers)."""
    global _TrainSamples
    if _TrainSamples is not None:
        return _TrainSamples
    from streaming import StreamingDataset  # deferred: see the docstring

    class TrainSamples(StreamingDataset):
        """StreamingDataset yielding what the step needs from each sample (see the module docstring)."""

        def __init__(self, *, cfg: DataConfig, layout: dict | None, **kwargs):
            super().__init__(**kwargs)
            self.cfg = cfg
            self.layout = layout
            self.kind = "raw" if layout is None else layout["kind"]
            self.sizes = None if layout is None else {b["id"]: (b["width"], b["height"]) for b in layout["buckets"]}
            self.store_dtype = layout["precompute"]["dtype"] if self.kind == "precomputed" else None

        def __getitem__(self, idx: int) -> dict[str, Any]:
            sample = super().__getitem__(idx)
            cfg = self.cfg
            caption = sample.get(cfg.caption_key)
            if caption is None:
                raise ValueError(f"data.caption_key: shards have no column '{cfg.caption_key}'")
            if self.kind == "precomputed":
                out = {
                    "caption": caption,
                    "latent_mean": _tensor(sample["latent_mean"], self.store_dtype),  # (C, h, w), normalised
                    "t5": _tensor(sample["t5"], self.store_dtype),  # (L, D), unpadded
                    # (D_clip,); no column without CLIP (MDS stores no 0-element array): (0,)
                    "pooled": _tensor(sample["pooled"], self.store_dtype) if "pooled" in sample else torch.zeros(0),
                }
                if "latent_std" in sample:
                    out["latent_std"] = _tensor(sample["latent_std"], self.store_dtype)
                return out
            try:
                data = sample[cfg.image_key]
            except KeyError:
                raise ValueError(f"data.image_key: shards have no column '{cfg.image_key}'") from None
            if cfg.buckets and self.sizes is not None:
                w, h = self.sizes[sample["bucket"]]
                pixels = decode_image(data, w, h)  # (3, h, w)
            else:
                pixels = decode_image(data, cfg.resolution)  # (3, R, R)
            return {"caption": caption, "pixels": pixels}

    TrainSamples.__module__, TrainSamples.__qualname__ = __name__, "TrainSamples"
    _TrainSamples = TrainSamples
    return TrainSamples


_TrainSamples = None


def __getattr__(name: str):
    if name == "TrainSamples":
        return _train_samples_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Collate:
    """Stack a batch; pad precomputed T5 states to the batch's longest (zeros + a False mask, as TextEncoder
    does), and attach the dataset's stored empty prompt. "caption" comes first: StreamingDataLoader counts samples
    by the first value."""

    def __init__(self, empty: dict[str, torch.Tensor] | None = None, max_text_tokens: int | None = None):
        self.empty = empty
        self.max_text_tokens = max_text_tokens

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {"caption": [s["caption"] for s in samples]}
        if "pixels" in samples[0]:
            batch["pixels"] = torch.stack([s["pixels"] for s in samples])
            return batch
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])  # (B, C, h, w)
        if "latent_std" in samples[0]:
            batch["latent_std"] = torch.stack([s["latent_std"] for s in samples])
        lengths = [s["t5"].shape[0] for s in samples]
        dim = samples[0]["t5"].shape[1]
        t5 = torch.zeros(len(samples), max(lengths), dim)  # (B, L, D)
        for i, s in enumerate(samples):
            t5[i, : lengths[i]] = s["t5"]
        batch["t5"] = t5
        batch["t5_mask"] = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (B, L) bool
        batch["pooled"] = torch.stack([s["pooled"] for s in samples])
        if self.empty is not None:
            batch.update(self.empty)
        batch["max_text_tokens"] = self.max_text_tokens
        return batch


def _empty_prompt(cfg: DataConfig) -> dict[str, torch.Tensor]:
    path = _fetch(cfg, "empty_prompt.safetensors")
    if path is None:
        raise ValueError(f"data.local: precomputed dataset '{cfg.remote or cfg.local}' has no empty_prompt.safetensors")
    t = load_file(str(path))  # stored in the dataset's storage dtype (safetensors holds bf16 natively)
    t5, pooled = t["t5"].float(), t["pooled"].float()  # (L0, D), (D_clip,)
    return {
        "empty_t5": t5[None],  # (1, L0, D)
        "empty_mask": torch.ones(1, t5.shape[0], dtype=torch.bool),
        "empty_pooled": pooled[None],  # (1, D)
    }


# ------------------------------------------------------------------------------------------ shared-memory hygiene


def _unlink_prefix(prefix: int) -> None:
    """Unlink every streaming segment of `prefix` that is still there."""
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    for name in SHM_TO_CLEAN:
        Path("/dev/shm", _get_path(prefix, name)).unlink(missing_ok=True)


def release_stale_shm(locals_: list[str]) -> list[int]:
    """Unlink streaming shared memory registered for *our* local cache directories (Linux only).

    A process killed without cleanup (SIGKILL, OOM, node failure) leaves its StreamingDataset's shared memory
    behind; with a remote, the next StreamingDataset on the same local directory then fails with "Reused local
    directory". streaming's `clean_stale_shared_memory()` fixes that by unlinking *every* streaming segment on the
    node, which breaks any other job running there; this removes only the registrations that name our directories
    (which no live job can legitimately share). Returns the prefixes released.
    """
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        return []
    # deferred: importing train.data must not import streaming (see _train_samples_class)
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _unpack_locals

    ours = {os.path.abspath(p) for p in locals_}
    released = []
    for entry in sorted(shm_dir.glob(f"*_{LOCALS}")):
        prefix = entry.name.split("_", 1)[0]
        if not prefix.isdigit():
            continue
        try:
            shm = SharedMemory(entry.name, False, auto_cleanup=False)
            theirs, _ = _unpack_locals(bytes(shm.buf))
            shm.cleanup()
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue
        if ours & set(theirs):
            _unlink_prefix(int(prefix))
            released.append(int(prefix))
    if released:
        log.warning("released stale streaming shared memory %s for %s", released, sorted(ours))
    return released


def fetch_indexes(cfg: DataConfig, subdirs: list[str], dist: DistInfo | None = None) -> None:
    """Global rank 0 puts every stream's index.json into data.local before any rank builds the dataset (the barrier
    in `_prepare_shared_memory` follows). Streaming downloads a missing index on each node's local rank 0 and renames
    index.json.tmp into place, so nodes that share data.local (a shared file system, or several nodes of one machine)
    race on that rename, and the loser fails with FileNotFoundError (seen on the local 2-node SLURM cluster). An index
    that is there is read, not downloaded; ours is replaced atomically, under a fresh temporary name."""
    if cfg.remote is not None and (dist or process_dist()).rank == 0:
        for sub in subdirs:
            _fetch(cfg, "index.json", sub)


def _prepare_shared_memory(locals_: list[str], dist: DistInfo) -> None:
    """Local rank 0 releases stale registrations of our cache dirs; everyone waits for it (when distributed)."""
    if dist.local_rank == 0:
        release_stale_shm(locals_)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


SHM_LOCK = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / "dedistill-streaming-prefix.lock"


@contextmanager
def shm_registration_turn(dist: DistInfo, wait_for_leader: Callable[[], None] = barrier):
    """streaming registers a dataset under the first shared-memory prefix that is free in /dev/shm, then creates it:
    two jobs on one host whose local leaders do that at the same moment pick the same prefix, and the second dies
    with FileExistsError. Local leaders take turns under a host-wide file lock while they build the dataset.

    Every rank, not only the leader, computes that first free prefix before the leader registers it, and a rank
    whose answer differs from its leader's fails ("shared memory registered does not match local leader"). So the
    job's other ranks wait (`wait_for_leader`, a barrier of the job's ranks) until their leader holds the lock: no
    other job registers while any of them looks. Where the lock file cannot be opened (another user's, read-only),
    no lock, and the ranks still meet at the barrier."""
    fd = None
    if dist.local_rank == 0:
        try:
            fd = os.open(SHM_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
        release_half_freed_prefix()
    try:
        wait_for_leader()
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


HALF_FREED_WAIT_S = 5.0  # how long a dataset's own teardown gets to finish before its leftovers are unlinked


def _prefix_streaming_picks() -> int:
    """The prefix streaming's `get_shm_prefix` registers next: for each of its segment names, the first prefix whose
    segment is absent from /dev/shm and that has no file lock in this process's temp dir; the largest of those.
    streaming's own scan (`_check_and_find`) stats each prefix in turn, 0.4 s on a host where thousands of file locks
    have piled up (streaming never removes them); this reads each directory once (tests/unit/test_shm_turn.py checks
    it against streaming's)."""
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    segments = set(os.listdir("/dev/shm"))
    try:
        locks = set(os.listdir(tempfile.gettempdir()))
    except OSError:
        locks = set()

    def free(prefix: int, name: str) -> bool:
        return _get_path(prefix, name) not in segments and locks.isdisjoint(_lock_names(prefix))

    return max(next(p for p in itertools.count() if free(p, name)) for name in SHM_TO_CLEAN)


def release_half_freed_prefix(wait_s: float | None = None) -> list[int]:
    """Called by a local leader holding the registration lock. streaming picks, for each of its segment names, the
    first prefix where that segment is absent (and that has no file lock in this process's temp dir), registers the
    largest of those by creating `<prefix>_locals`, and dies with FileExistsError when that segment is there: the
    prefix belongs to a dataset that is half torn down (atexit unlinks `locals` last; a killed job's resource tracker
    unlinks in any order) and whose file lock this process cannot see (it never iterated, or its job had a private
    /tmp, as SLURM gives). A teardown finishes within a moment, so wait for it; a `locals` that outlives the wait has
    no owner left, and that prefix's leftovers are unlinked. Returns the prefixes released."""
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        return []
    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _get_path

    deadline = time.monotonic() + (HALF_FREED_WAIT_S if wait_s is None else wait_s)
    released = []
    while (shm_dir / _get_path(prefix := _prefix_streaming_picks(), LOCALS)).exists():
        if time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        _unlink_prefix(prefix)
        log.warning("released half-freed streaming shared memory %d (its owner exited mid-cleanup)", prefix)
        released.append(prefix)
    return released


def _lock_names(prefix: int) -> list[str]:
    """The names of `prefix`'s file locks in the temp dir (streaming's barrier lock first)."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import _get_path

    return [_get_path(prefix, name) for name in (BARRIER_FILELOCK, CACHE_FILELOCK)]


def _file_locks(prefix: int) -> list[Path]:
    return [Path(tempfile.gettempdir(), name) for name in _lock_names(prefix)]


def _remove_file_locks(prefixes: list[int]) -> None:
    """At exit, after streaming's own handlers have unlinked the segments: remove the file locks of our prefixes whose
    segments are gone. streaming never removes them, and it skips every prefix with one, so they pile up in /tmp and
    each new dataset scans past all of them (0.4 s per dataset at 3,900 on the test host) and takes a new prefix."""
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    for prefix in prefixes:
        if any(Path("/dev/shm", _get_path(prefix, name)).exists() for name in SHM_TO_CLEAN):
            continue  # not ours to free yet (another rank's process created them and has not exited)
        for lock in _file_locks(prefix):
            lock.unlink(missing_ok=True)


def register_dataset(make: Callable[[], Any], dist: DistInfo | None = None):
    """`make()` (a StreamingDataset constructor) under this host's registration turn (`shm_registration_turn`), its
    prefix then marked used with the temp-dir file lock streaming creates on first iteration (so one not yet iterated
    is not taken for free while its teardown is half done), and that lock removed at exit once streaming's handlers
    have unlinked the segments (registered first, so it runs after them)."""
    prefixes: list[int] = []
    atexit.register(_remove_file_locks, prefixes)
    with shm_registration_turn(dist or process_dist()):
        dataset = make()
        prefixes.append(dataset._shm_prefix_int)
        try:
            _file_locks(dataset._shm_prefix_int)[0].touch()
        except OSError:  # a read-only temp dir: streaming itself fails there on first iteration
            pass
    return dataset


# ------------------------------------------------------------------------------------------------------ loaders


def build_dataset(cfg: DataConfig, *, batch_size: int, dist: DistInfo | None = None):
    """A StreamingDataset yielding per-sample dicts for `Collate` (see the module docstring). `dist`: this process's
    ranks (default: the launcher's, `process_dist`)."""
    dist = dist or process_dist()
    from streaming import Stream  # deferred: importing train.data must not import streaming

    _check_source(cfg)
    if cfg.remote is not None and cfg.remote.startswith("s3://"):
        # deferred like streaming itself: importing train.data must not import streaming (see _train_samples_class)
        from train.remote import install

        install()  # every retry under streaming's S3 reads is counted and logged
    layout = read_layout(cfg)
    _check_layout(cfg, layout)
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=cfg.shuffle,
        shuffle_algo=cfg.shuffle_algo,
        shuffle_seed=cfg.shuffle_seed,
        shuffle_block_size=cfg.shuffle_block_size,
        predownload=cfg.predownload,
        download_retry=cfg.download_retry,
        download_timeout=cfg.download_timeout,
    )
    if layout is None:
        locals_, subdirs = [cfg.local], [""]
        kwargs.update(remote=cfg.remote, local=cfg.local)
    else:
        buckets = [b for b in layout["buckets"] if b["samples"]]
        if cfg.buckets or layout["kind"] == "precomputed":
            buckets = _usable_buckets(buckets, batch_size * dist.world_size)
            kwargs["batching_method"] = "per_stream"  # every global batch from one bucket
        streams = [
            Stream(remote=None if cfg.remote is None else _join(cfg.remote, b["dir"]), local=_join(cfg.local, b["dir"]))
            for b in buckets
        ]
        locals_, subdirs = [s.local for s in streams], [b["dir"] for b in buckets]
        kwargs["streams"] = streams
    if cfg.remote is not None:
        fetch_indexes(cfg, subdirs, dist)
        _prepare_shared_memory(locals_, dist)
    return register_dataset(lambda: _train_samples_class()(cfg=cfg, layout=layout, **kwargs), dist)


def _usable_buckets(buckets: list[dict], global_batch: int) -> list[dict]:
    """per_stream batching needs at least one full global batch from every stream (streaming raises otherwise):
    buckets smaller than that are left out, with a warning naming them."""
    small = [b for b in buckets if b["samples"] < global_batch]
    if small:
        log.warning("data.buckets: leaving out %d bucket(s) with fewer samples than one global batch (%d): %s",
                    len(small), global_batch,
                    ", ".join(f"{b['width']}x{b['height']} ({b['samples']})" for b in small[:10]))
    usable = [b for b in buckets if b["samples"] >= global_batch]
    if not usable:
        raise ValueError(f"data.buckets: no bucket holds a full global batch ({global_batch} samples)")
    return usable


def build_loader(cfg: DataConfig, *, batch_size: int, caption_length: Callable[[str], int] | None = None,
                 dist: DistInfo | None = None):
    """StreamingDataLoader: a torch DataLoader whose state_dict() records the position in the stream; with
    `data.length_grouping`, wrapped in `LengthGroupedBatches` (same iteration and state_dict interface).

    dist: this process's ranks (default: the launcher's, `process_dist`). caption_length: a caption's T5 token count, for length grouping of raw shards (the trainer passes its T5
    tokenizer's); precomputed shards hold the T5 states, whose length is used instead."""
    from streaming import StreamingDataLoader  # deferred: importing train.data must not import streaming

    dist = dist or process_dist()
    dataset = build_dataset(cfg, batch_size=batch_size, dist=dist)
    collate = Collate()
    if dataset.kind == "precomputed":
        collate = Collate(_empty_prompt(cfg), dataset.layout["precompute"]["max_text_tokens"])
    if cfg.length_grouping and dataset.kind != "precomputed" and caption_length is None:
        raise ValueError("data.length_grouping: raw shards need a caption-length function (the T5 tokenizer)")
    loader = StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
        collate_fn=KeepSamplesCollate() if cfg.length_grouping else collate,
    )
    if not cfg.length_grouping:
        return loader
    if dataset.kind == "precomputed":
        length_of = _stored_t5_length
    else:
        def length_of(sample: dict) -> int:
            return caption_length(sample["caption"])
    return LengthGroupedBatches(loader, window=cfg.length_window, collate=collate, length_of=length_of,
                                world_size=dist.world_size)


def _stored_t5_length(sample: dict) -> int:
    return sample["t5"].shape[0]


class KeepSamplesCollate:
    """The loader's collate under length grouping: the batch's samples as they are, regrouped and collated by
    `LengthGroupedBatches` (a mapping, so StreamingDataLoader counts its samples by the first value)."""

    def __call__(self, samples: list[dict]) -> dict[str, list[dict]]:
        return {"samples": samples}


def _image_key(sample: dict) -> tuple:
    """The aspect bucket of a sample: the shape of its pixels or latents."""
    return tuple((sample["pixels"] if "pixels" in sample else sample["latent_mean"]).shape)


def group_by_length(samples: list[dict], *, batch_size: int, length_of: Callable[[dict], int]) -> list[list[dict]]:
    """Regroup a window of consecutive batches (`batch_size` samples each, in stream order) so that captions of
    similar length share a batch, never mixing aspect buckets.

    Batch slot i keeps the bucket it had; inside each bucket the samples are sorted by (length, stream position)
    and cut into batches, which go to that bucket's slots in an order shuffled by a hash of the window's captions
    (so a window does not always run short to long). A pure function of the window: resuming re-reads the window
    and gets the same batches."""
    assert len(samples) % batch_size == 0, "a window holds whole batches"
    slots = [_image_key(samples[i]) for i in range(0, len(samples), batch_size)]
    by_key: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_key.setdefault(_image_key(s), []).append(i)
    digest = hashlib.blake2b("\n".join(str(s["caption"]) for s in samples).encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    chunks: dict[tuple, list[list[dict]]] = {}
    for key, idx in by_key.items():
        idx.sort(key=lambda i: (length_of(samples[i]), i))
        groups = [[samples[i] for i in idx[j : j + batch_size]] for j in range(0, len(idx), batch_size)]
        rng.shuffle(groups)
        chunks[key] = groups
    return [chunks[key].pop() for key in slots]


class LengthGroupedBatches:
    """Iterates a StreamingDataLoader (whose collate is `KeepSamplesCollate`) `window` batches at a time, regrouped by
    `group_by_length` and collated. state_dict() holds the stream position at the current window's start and how
    many of its batches were already handed out; load_state_dict() rewinds the stream there and skips them, so a
    resumed run sees exactly the batches an uninterrupted one does (any num_workers: the stream itself resumes
    at a batch boundary, as without grouping)."""

    def __init__(self, loader, *, window: int, collate: Callable[[list[dict]], dict], length_of, world_size: int):
        self.loader, self.window, self.collate, self.length_of = loader, window, collate, length_of
        self.world_size = world_size  # the stream's position is counted over all ranks
        self.dataset = loader.dataset
        self._start: int | None = None  # samples (this rank) the loader had yielded when the window began
        self._in_window = self._emitted = self._skip = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        while True:
            raw = list(itertools.islice(it, self.window))
            if not raw:
                return
            samples = [s for b in raw for s in b["samples"]]
            batches = group_by_length(samples, batch_size=len(raw[0]["samples"]), length_of=self.length_of)
            self._start = self.loader.num_samples_yielded - len(samples)
            self._in_window, self._emitted = len(batches), 0
            for batch in batches:
                self._emitted += 1  # before the yield: a checkpoint taken after this batch counts it
                if self._skip:
                    self._skip -= 1
                    continue
                yield self.collate(batch)

    def state_dict(self) -> dict[str, Any]:
        if self._start is None:  # nothing read yet (or only a loaded state): the stream's own position
            return {"stream": self.loader.state_dict(), "skip": self._skip}
        if self._emitted == self._in_window:  # the window is used up: the next one starts where the stream is
            start, skip = self.loader.num_samples_yielded, 0
        else:
            start, skip = self._start, self._emitted
        return {"stream": self.dataset.state_dict(start * self.world_size, False), "skip": skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["stream"])
        self._skip, self._start = int(state["skip"]), None


def forever(loader) -> Iterator[dict[str, Any]]:
    """Iterate epoch after epoch; the streaming loader itself advances its epoch counter.

    One empty epoch is expected: a run resumed from a checkpoint taken right after an epoch's last batch first
    finishes that (now empty) epoch. Two in a row mean the data cannot fill a single batch.
    """
    empty = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        empty = empty + 1 if n == 0 else 0
        if empty >= 2:
            raise ValueError("data.local: the dataset yields no full batch for this world size and batch size")
