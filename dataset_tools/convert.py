"""`dedistill data convert`: image folders, WebDataset tars or jsonl/parquet manifests -> MDS shards.

Each sample keeps its original encoded bytes (JPEG/PNG/WebP, never re-encoded) plus caption, width, height, key and
attributes: the same columns as `dataset_tools.tiny_data.MDS_COLUMNS`.

Work is split into *parts*. A part is one (slice, worker) pair and writes its own sub-directory
`OUT/part-<slice:05d>-<worker:04d>/` with shards, `index.json`, `skipped.jsonl` and, last, `report.json` (the
completion marker). Which part a sample goes to depends only on the source:

- folders and manifests: a stable hash of the sample key (`part_of`), so the same key always lands in the same part
  and duplicate keys are caught exactly, whatever the number of slices/workers;
- WebDataset: whole tar files, the t-th tar (sorted) going to slice t % n and worker (t // n) % w.

Slices (`--shard-index i --num-shards n`, one per SLURM array task) are disjoint and together cover the source. A
re-run skips finished parts, so a killed job resumes by running the same command again. Once every slice is done,
`dedistill data merge OUT` joins the parts' indexes (streaming's `merge_index`) and reports; a run with a single
slice merges by itself.

Bad input never stops a conversion: it is skipped, counted by reason (`dataset_tools.report.REASONS`) and listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from dataset_tools.report import Skip, SkipLog, merge_reports
from train.images import displayed_size
from train.outputs import check_same_settings, write_json_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
FORMATS = ("JPEG", "PNG", "WEBP")
COLUMNS = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "key": "str", "attributes": "json"}
KINDS = ("auto", "folder", "webdataset", "manifest")
CHECKS = ("fast", "full")


@dataclass(kw_only=True)
class ConvertOptions:
    kind: str = "auto"
    """auto | folder | webdataset | manifest (auto: .jsonl/.parquet file -> manifest, .tar or a directory holding
    .tar files -> webdataset, other directories -> folder)."""
    min_size: int = 64
    """Skip images whose short side is under this many pixels (after EXIF rotation)."""
    check: str = "fast"
    """fast: header + a structural check that catches truncation (JPEG end marker, PNG chunk CRCs, WebP RIFF
    length), falling back to a full decode when the cheap test is inconclusive; full: decode every pixel."""
    shard_size: int = 1 << 26
    """Bytes per MDS shard before a new one starts (streaming's default, 64 MiB)."""
    caption_field: str = "caption"
    """The caption in .json sidecars, tar .json members and manifest rows (a .txt sidecar wins over it)."""
    path_field: str = "path"
    """Manifests: the column holding the image path (relative paths are relative to the manifest's directory)."""
    key_field: str = "key"
    """Manifests: the column holding the sample key (missing: the image path is the key)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind: '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.check not in CHECKS:
            raise ValueError(f"--check: '{self.check}' is not one of {', '.join(CHECKS)}")
        if self.min_size < 0:
            raise ValueError(f"--min-size: must be >= 0, got {self.min_size}")
        if self.shard_size < 1 << 12:
            raise ValueError(f"--shard-size: must be at least 4 KiB, got {self.shard_size}")


# -------------------------------------------------------------------------------------------------------- checks


def check_image(data: bytes, *, min_size: int, check: str = "fast") -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, or raise Skip. Width/height follow EXIF orientation
    (`train.images.displayed_size`: the size every later stage sees).

    fast costs a header parse plus: JPEG a look at the last bytes (a truncated JPEG has no end-of-image marker;
    when the marker is not there, e.g. data appended after it, a full decode decides), PNG `verify()` (every chunk's
    CRC and the IEND chunk), WebP `verify()` (the RIFF length). See docs/data.md for measured costs.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Skip("empty_file")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise Skip("truncated_image", f"RIFF length {int.from_bytes(data[4:8], 'little') + 8} > {len(data)} bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not_an_image") from None
    except (OSError, SyntaxError, ValueError) as e:  # a recognised header that is broken
        raise Skip("corrupt_image", str(e)) from None
    if img.format not in FORMATS:
        raise Skip("unsupported_format", str(img.format))
    w, h = img.size  # the short side does not change under EXIF rotation
    if min(w, h) < min_size:
        raise Skip("too_small", f"{w}x{h} < {min_size}")
    try:
        if check == "full" or (img.format == "JPEG" and not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9")):
            img.load()
        elif img.format != "JPEG":
            img.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        msg = str(e)
        if "truncated" in msg.lower() or "could not create decoder" in msg.lower() or isinstance(e, EOFError):
            raise Skip("truncated_image", msg) from None
        raise Skip("corrupt_image", f"{type(e).__name__}: {msg}") from None
    # After EXIF rotation, as train.images.open_rgb decodes it (any format). A fresh header parse: PIL's verify()
    # must come first on an opened image, and reading a PNG's EXIF walks its chunks.
    w, h = displayed_size(Image.open(io.BytesIO(data)))
    return img.format, w, h


def check_caption(raw) -> str:
    """Caption text (stripped) from str/bytes, or raise Skip (missing, empty, not UTF-8)."""
    if raw is None:
        raise Skip("missing_caption")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise Skip("undecodable_caption", str(e)) from None
    if not isinstance(raw, str):
        raise Skip("undecodable_caption", f"not text: {type(raw).__name__}")
    text = raw.replace("\0", "").strip()
    if not text:
        raise Skip("empty_caption")
    return text


def caption_from_json(raw: bytes | str, field: str) -> tuple[object, dict]:
    """(caption or None, attributes) from a JSON sidecar; raise Skip when it does not parse."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Skip("undecodable_caption", f"json: {e}") from None
    if not isinstance(obj, dict):
        return None, {"value": obj}
    return obj.get(field), {k: v for k, v in obj.items() if k != field}


# ------------------------------------------------------------------------------------------------------- sources


@dataclass
class RawSample:
    key: str
    file: str
    """What to name in the report: a path, or tar:member."""
    image: bytes | None = None
    error: Skip | None = None
    """Set when the source itself already knows the sample is bad (unreadable file, bad manifest row)."""
    caption: object = None
    """str, bytes (a .txt sidecar) or None; checked by check_caption."""
    attributes: dict | None = None


def part_of(key: str, num_slices: int, workers: int) -> tuple[int, int]:
    """(slice, worker) of a sample key: a stable hash, the same on every machine and Python version."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h % num_slices, (h // num_slices) % workers


def detect_kind(source: Path) -> str:
    if source.is_file():
        if source.suffix in (".jsonl", ".parquet"):
            return "manifest"
        if source.suffix == ".tar":
            return "webdataset"
        raise ValueError(f"--source: '{source}' is a file but not a .jsonl/.parquet manifest or a .tar")
    if source.is_dir():
        for _, _, files in os.walk(source):
            if any(f.endswith(".tar") for f in files):
                return "webdataset"
        return "folder"
    raise ValueError(f"--source: '{source}' does not exist")


def _read(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def iter_folder(root: Path, opts: ConvertOptions, mine: Callable[[str], bool]) -> Iterator[RawSample]:
    """Images with sidecars: `dir/name.jpg` + `dir/name.txt` (caption) and/or `dir/name.json` (caption field and
    attributes). Key: the path relative to the root without extension. Several images with one stem share a key:
    the first (sorted) converts, the others count as duplicates."""
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        groups: dict[str, list[str]] = {}
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            groups.setdefault(stem, []).append(ext)
        for stem, exts in groups.items():
            images = [e for e in exts if e.lower() in IMAGE_EXTS]
            if not images:
                continue
            key = (rel_dir / stem).as_posix()
            if not mine(key):
                continue
            base = Path(dirpath) / stem
            caption, attributes, caption_error = None, {}, None
            try:
                if ".json" in exts:
                    caption, attributes = caption_from_json(_read(base.with_name(stem + ".json")), opts.caption_field)
                if ".txt" in exts:
                    caption = _read(base.with_name(stem + ".txt"))
            except Skip as e:
                caption_error = e
            except OSError as e:
                caption_error = Skip("undecodable_caption", f"unreadable sidecar: {e}")
            for ext in images:
                path = base.with_name(stem + ext)
                sample = RawSample(key, str(path), caption=caption, attributes=attributes, error=caption_error)
                if sample.error is None:
                    try:
                        sample.image = _read(path)
                    except OSError as e:
                        sample.error = Skip("corrupt_image", f"unreadable: {e}")
                yield sample


def tar_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*.tar") if p.is_file())


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename; the rest is the extension."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def iter_tar(path: Path, opts: ConvertOptions, log: SkipLog) -> Iterator[RawSample]:
    """Samples of one WebDataset tar, read as a stream (members of a sample are consecutive)."""

    def flush(key: str, members: dict[str, bytes]) -> Iterator[RawSample]:
        images = [e for e in members if "." + e.rpartition(".")[2] in IMAGE_EXTS]
        if not images:
            return
        caption, attributes, error = None, {}, None
        try:
            if "json" in members:
                caption, attributes = caption_from_json(members["json"], opts.caption_field)
            for ext in ("txt", "caption"):
                if ext in members:
                    caption = members[ext]
        except Skip as e:
            error = e
        for ext in images:
            yield RawSample(key, f"{path}:{key}.{ext}", image=members[ext], caption=caption,
                            attributes=attributes, error=error)

    current, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                data = tf.extractfile(m).read()
                if key != current:
                    if current is not None:
                        yield from flush(current, members)
                    current, members = key, {}
                if ext in members:  # the same member twice inside one sample: keep the first
                    ext = f"dup{len(members)}.{ext}"
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        log.skip("bad_archive", key=current or "", file=str(path), detail=f"{type(e).__name__}: {e}")
    if current is not None:
        yield from flush(current, members)


def _manifest_rows(path: Path, opts: ConvertOptions) -> Iterator[tuple[int, dict | None, str]]:
    """(row number, row dict or None when unparseable, error detail)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield i, None, f"not JSON: {e}"
                    continue
                yield (i, row, "") if isinstance(row, dict) else (i, None, "not a JSON object")
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield i, row, ""
                i += 1


def iter_manifest(path: Path, opts: ConvertOptions, mine: Callable[[str], bool]) -> Iterator[RawSample]:
    """Rows {path, caption[, key], ...}: other columns become attributes."""
    base = path.parent
    for i, row, err in _manifest_rows(path, opts):
        if row is None or not isinstance(row.get(opts.path_field), str) or not row.get(opts.path_field):
            key = f"{path.name}:row{i}"
            if mine(key):
                detail = err or f"no '{opts.path_field}' column"
                yield RawSample(key, f"{path}:{i + 1}", error=Skip("bad_row", detail))
            continue
        rel = row[opts.path_field]
        key = row.get(opts.key_field)
        key = str(key) if key is not None and str(key) else rel
        if not mine(key):
            continue
        file = base / rel
        sample = RawSample(
            key, str(file), caption=row.get(opts.caption_field),
            attributes={k: v for k, v in row.items() if k not in (opts.path_field, opts.caption_field, opts.key_field)},
        )
        try:
            sample.image = _read(file)
        except FileNotFoundError:
            sample.error = Skip("missing_file")
        except OSError as e:
            sample.error = Skip("corrupt_image", f"unreadable: {e}")
        yield sample


# --------------------------------------------------------------------------------------------------------- parts


def part_name(slice_index: int, worker: int) -> str:
    return f"part-{slice_index:05d}-{worker:04d}"


def _settings(source: Path, kind: str, opts: ConvertOptions, num_slices: int, workers: int) -> dict:
    return {"source": str(source), "kind": kind, "num_slices": num_slices, "workers": workers,
            "options": {k: v for k, v in asdict(opts).items() if k != "kind"}}


def _check_same_settings(part: Path, old: dict, new: dict) -> None:
    def options_inline(d: dict) -> dict:  # the message names an option by its own name (min_size), as its flag does
        return {**{k: v for k, v in d.items() if k != "options"}, **d.get("options", {})}

    check_same_settings(f"{part}: finished by an earlier run", options_inline(old), options_inline(new),
                        remedy="use another --out or delete the old parts")


def convert_part(
    source: Path, out: Path, *, kind: str, opts: ConvertOptions, slice_index: int, num_slices: int,
    worker: int, workers: int, progress: Callable[[int], None] | None = None,
) -> dict:
    """Convert this part's samples into OUT/part-<slice>-<worker>/; returns its report. Skips a finished part."""
    from streaming import MDSWriter

    part = out / part_name(slice_index, worker)
    settings = {**_settings(source, kind, opts, num_slices, workers), "slice": slice_index, "worker": worker}
    done = part / "report.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        _check_same_settings(part, rep.get("settings", {}), settings)
        return rep
    if part.exists():
        shutil.rmtree(part)  # an interrupted attempt: start the part over
    log = SkipLog(part / "skipped.jsonl")  # opened at the first skip, after MDSWriter created the directory
    t0 = time.perf_counter()
    seen: set[str] = set()

    def mine(key: str) -> bool:
        return part_of(key, num_slices, workers) == (slice_index, worker)

    if kind == "folder":
        samples = iter_folder(source, opts, mine)
    elif kind == "manifest":
        samples = iter_manifest(source, opts, mine)
    else:
        tars = tar_files(source)
        mine_tars = [t for i, t in enumerate(tars) if (i % num_slices, (i // num_slices) % workers) == (slice_index, worker)]
        samples = (s for t in mine_tars for s in iter_tar(t, opts, log))

    pending = 0
    with MDSWriter(out=str(part), columns=COLUMNS, size_limit=opts.shard_size) as writer:
        for s in samples:
            try:
                if s.error is not None:
                    raise s.error
                caption = check_caption(s.caption)
                _, w, h = check_image(s.image, min_size=opts.min_size, check=opts.check)
                if s.key in seen:
                    raise Skip("duplicate_key")
            except Skip as e:
                log.skip(e.reason, key=s.key, file=s.file, detail=e.detail)
            else:
                seen.add(s.key)
                writer.write({"image": s.image, "caption": caption, "width": w, "height": h, "key": s.key,
                              "attributes": s.attributes or {}})
                log.converted += 1
                log.image_bytes += len(s.image)
            pending += 1
            if progress is not None and pending >= 64:
                progress(pending)
                pending = 0
    if progress is not None and pending:
        progress(pending)
    log.close()
    elapsed = time.perf_counter() - t0
    rep = {**log.summary(), "elapsed_s": round(elapsed, 3), "settings": settings}
    write_json_atomic(done, rep)
    return rep


def _worker_context():
    """fork when this process runs no other thread (the CLI): a worker starts in milliseconds, where spawn would
    re-import torch via streaming for seconds. With threads alive (a notebook, a test session with live streaming
    loaders) a forked child can inherit a lock held mid-use and hang, so then a forkserver with this module
    preloaded: a clean, single-threaded parent to fork from, paid for once per process."""
    import threading

    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return mp.get_context("fork")
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "streaming", "PIL.Image"])  # what a worker imports
        return ctx
    return mp.get_context("spawn")


def _worker_main(args: dict, counter) -> None:
    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    convert_part(**args, progress=progress)


@contextmanager
def _quiet_streaming_logs():
    """merge_index logs a WARNING per call about its temp folder; that is not news to our users."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def convert(
    source: str | Path, out: str | Path, *, opts: ConvertOptions | None = None, workers: int = 1,
    shard_index: int = 0, num_shards: int = 1, progress_bar: bool = True,
) -> dict:
    """Convert one slice of `source` with `workers` processes; merge when it is the only slice.

    Returns {"converted", "skipped", "skipped_by_reason", "parts", "merged"}. Raises ValueError when the source
    held samples and none converted (nothing to train on is an error; a few bad samples never are).
    """
    opts = opts or ConvertOptions()
    source, out = Path(source), Path(out)
    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index: must be in [0, --num-shards={num_shards}), got {shard_index}")
    kind = detect_kind(source) if opts.kind == "auto" else opts.kind
    if kind != "folder" and not source.exists():
        raise ValueError(f"--source: '{source}' does not exist")
    if kind == "folder" and not source.is_dir():
        raise ValueError(f"--source: '{source}' is not a directory (--kind folder)")
    if kind == "webdataset" and not tar_files(source):
        raise ValueError(f"--source: no .tar files in '{source}'")
    if kind == "manifest" and source.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--source: '{source}' is not a .jsonl or .parquet manifest")
    if out.resolve() == source.resolve() or (source.is_dir() and source.resolve() in out.resolve().parents):
        raise ValueError(f"--out: '{out}' is inside the source '{source}'")
    out.mkdir(parents=True, exist_ok=True)

    settings = _settings(source, kind, opts, num_shards, workers)
    for done in sorted(out.glob(f"part-{shard_index:05d}-*/report.json")):
        old = json.loads(done.read_text()).get("settings", {})
        _check_same_settings(done.parent, {k: old.get(k) for k in settings}, settings)

    jobs = [dict(source=source, out=out, kind=kind, opts=opts, slice_index=shard_index, num_slices=num_shards,
                 worker=j, workers=workers) for j in range(workers)]
    t0 = time.perf_counter()
    def new_bar():
        if not progress_bar:
            return None
        from tqdm import tqdm

        return tqdm(desc=f"convert {source.name}", unit=" samples", file=sys.stderr, dynamic_ncols=True)

    if workers == 1:
        bar = new_bar()
        # `is not None`: a tqdm without a total has no truth value (bool(bar) raises TypeError)
        reports = [convert_part(**jobs[0], progress=bar.update if bar is not None else None)]
    else:
        ctx = _worker_context()
        counter = ctx.Value("q", 0)
        procs = [ctx.Process(target=_worker_main, args=(job, counter), daemon=True) for job in jobs]
        for p in procs:
            p.start()
        bar = new_bar()  # after the workers started: tqdm's monitor thread would make fork unsafe
        shown = 0
        while any(p.is_alive() for p in procs):
            mp.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.2)  # wakes when one ends
            if bar is not None and counter.value > shown:
                bar.update(counter.value - shown)
                shown = counter.value
        if bar is not None and counter.value > shown:
            bar.update(counter.value - shown)
        failed = [j for j, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"convert workers {failed} failed (see their traceback above); re-run to resume")
        reports = [json.loads((out / part_name(shard_index, j) / "report.json").read_text()) for j in range(workers)]
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    converted = sum(r["converted"] for r in reports)
    skipped = sum(r["skipped"] for r in reports)
    by_reason: dict[str, int] = {}
    for r in reports:
        for k, v in r["skipped_by_reason"].items():
            by_reason[k] = by_reason.get(k, 0) + v
    if converted == 0 and (skipped or num_shards == 1):
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())) or "no samples found"
        raise ValueError(f"nothing converted from '{source}' ({detail}); see {out}/part-*/skipped.jsonl")
    result = {"converted": converted, "skipped": skipped, "skipped_by_reason": by_reason,
              "elapsed_s": round(elapsed, 3), "samples_per_s": round((converted + skipped) / max(elapsed, 1e-9), 1),
              "parts": [part_name(shard_index, j) for j in range(workers)], "merged": False}
    if num_shards == 1:
        merge(out)
        result["merged"] = True
    return result


# --------------------------------------------------------------------------------------------------------- merge


def find_parts(root: Path) -> list[Path]:
    """Finished parts of a conversion, checked for a consistent, complete set of slices and workers."""
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    dirs = sorted(p for p in root.glob("part-*") if p.is_dir())
    if not dirs:
        raise ValueError(f"{root}: no part-* directories (nothing converted here yet)")
    unfinished = [p.name for p in dirs if not (p / "report.json").is_file()]
    if unfinished:
        raise ValueError(f"{root}: unfinished parts {', '.join(unfinished[:5])}: re-run their slice(s) first")
    settings = {p: json.loads((p / "report.json").read_text())["settings"] for p in dirs}
    first = settings[dirs[0]]
    n = first["num_slices"]
    workers: dict[int, int] = {}
    got: set[tuple[int, int]] = set()
    for p, s in settings.items():
        if (s["source"], s["kind"], s["num_slices"], s["options"]) != (first["source"], first["kind"], n, first["options"]):
            raise ValueError(f"{p}: converted with other settings than {dirs[0].name} (source, --num-shards or "
                             f"options differ); remove the stale parts")
        if workers.setdefault(s["slice"], s["workers"]) != s["workers"]:
            raise ValueError(f"{p}: slice {s['slice']} has parts from runs with different --workers; remove the "
                             f"stale ones and re-run the slice")
        got.add((s["slice"], s["worker"]))
    missing_slices = sorted(set(range(n)) - set(workers))
    if missing_slices:
        raise ValueError(f"{root}: slices {missing_slices[:10]} of {n} have not run yet (--shard-index)")
    missing = sorted({(i, j) for i, w in workers.items() for j in range(w)} - got)
    if missing:
        raise ValueError(f"{root}: missing parts {[part_name(*m) for m in missing[:5]]}")
    return dirs


def merge_index_files(indexes: list[Path], root: Path) -> None:
    """streaming's merge_index into a temp dir, then an atomic rename onto root/index.json (merge_index refuses to
    overwrite, and a reader must never see a missing or half-written index)."""
    from streaming.base.util import merge_index

    tmp = root / f".merge-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _quiet_streaming_logs():
            merge_index([str(p) for p in indexes], str(tmp))
        os.replace(tmp / "index.json", root / "index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(root: str | Path) -> dict:
    """Join the parts' index.json files (streaming's merge_index) and reports into root/index.json and
    root/report.json. Safe to run again."""
    root = Path(root)
    parts = find_parts(root)
    first = json.loads((parts[0] / "report.json").read_text())["settings"]
    merge_index_files([p / "index.json" for p in parts], root)
    extra = {"source": first["source"], "kind": first["kind"], "num_slices": first["num_slices"],
             "options": first["options"]}
    return merge_reports(root, parts, extra=extra)
