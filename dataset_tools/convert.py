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
One boundary, `convert_part`'s loop with `skip_of`, turns any per-sample failure into a counted skip, and every read
is bounded before it starts: only regular files are opened (never a FIFO or a device), a file, tar member or
manifest line over `--max-bytes` is never read, and an image header claiming more than `--max-pixels` is never
decoded. A source that once crashed a conversion therefore converts on the rerun, with that sample counted.
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
import stat
import sys
import tarfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataset_tools.report import Skip, SkipLog, merge_reports, printable
from train.images import displayed_size, open_rgb
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
    max_bytes: int = 1 << 26
    """Largest file read: an image, a sidecar, a tar member or a manifest line over this many bytes is skipped
    (`too_large`) without being read (its size is known from stat or the tar header)."""
    max_pixels: int = 89_478_485
    """Largest image (width x height, from the header) that is decoded; larger ones are skipped
    (`too_many_pixels`). The default is Pillow's own warning limit (about 9459 x 9459); Pillow refuses anything
    over twice that whatever this says."""
    max_side: int = 4096
    """Images whose long side is over this are stored downscaled to it (re-encoded in their own format; counted as
    `resized` in the report), so no later decode costs more than this size; 0 keeps every image's original bytes."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind: '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.check not in CHECKS:
            raise ValueError(f"--check: '{self.check}' is not one of {', '.join(CHECKS)}")
        if self.min_size < 0:
            raise ValueError(f"--min-size: must be >= 0, got {self.min_size}")
        if self.shard_size < 1 << 12:
            raise ValueError(f"--shard-size: must be at least 4 KiB, got {self.shard_size}")
        if self.max_bytes < 1:
            raise ValueError(f"--max-bytes: must be >= 1, got {self.max_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels: must be >= 1, got {self.max_pixels}")
        if self.max_side < 0 or 0 < self.max_side < self.min_size:
            raise ValueError(f"--max-side: must be 0 (keep original sizes) or >= --min-size, got {self.max_side}")


# -------------------------------------------------------------------------------------------------------- checks


def check_image(data: bytes, *, min_size: int, check: str = "fast",
                max_pixels: int = 89_478_485) -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, or raise Skip. Width/height follow EXIF orientation
    (`train.images.displayed_size`: the size every later stage sees).

    fast costs a header parse plus: JPEG a look at the last bytes (a truncated JPEG has no end-of-image marker;
    when the marker is not there, e.g. data appended after it, a full decode decides), PNG `verify()` (every chunk's
    CRC and the IEND chunk), WebP `verify()` (the RIFF length). See docs/data.md for measured costs.
    """
    if not data:
        raise Skip("empty_file")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise Skip("truncated_image", f"RIFF length {int.from_bytes(data[4:8], 'little') + 8} > {len(data)} bytes")
    try:
        with warnings.catch_warnings():  # over Pillow's warning limit but within --max-pixels: checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Skip("not_an_image") from None
    except Image.DecompressionBombError as e:
        raise Skip("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:  # a recognised header that is broken
        raise Skip("corrupt_image", str(e)) from None
    if img.format not in FORMATS:
        raise Skip("unsupported_format", str(img.format))
    w, h = img.size  # the short side does not change under EXIF rotation
    if w * h > max_pixels:  # before any pixel is decoded: a 778-byte PNG may claim 60000 x 60000
        raise Skip("too_many_pixels", f"{w}x{h} > --max-pixels {max_pixels}")
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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\udcff" in a JSON manifest
        raise Skip("undecodable_caption", str(e)) from None
    return text


def downscale(data: bytes, fmt: str, max_side: int) -> tuple[bytes, int, int]:
    """(bytes, width, height) of the image re-encoded in its own format with its long side `max_side`: decoded as
    every stage decodes it (`train.images.open_rgb`: upright RGB), so the stored pixels are what training sees."""
    img = open_rgb(data)
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue(), img.width, img.height


def skip_of(e: Exception) -> Skip:
    """The one place that names a per-sample failure: any exception reading or checking a sample becomes a Skip."""
    if isinstance(e, Skip):
        return e
    if isinstance(e, Image.DecompressionBombError):
        return Skip("too_many_pixels", str(e))
    if isinstance(e, UnicodeError):
        return Skip("bad_key", f"{type(e).__name__}: {e}")
    if isinstance(e, MemoryError):
        return Skip("too_large", "out of memory reading it")
    if isinstance(e, FileNotFoundError):
        return Skip("missing_file")
    if isinstance(e, OSError):
        return Skip("corrupt_image", f"unreadable: {e}")
    return Skip("unexpected_error", f"{type(e).__name__}: {e}")


def caption_from_json(raw: bytes | str, field: str) -> tuple[object, dict]:
    """(caption or None, attributes) from a JSON sidecar; raise Skip when it does not parse."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Skip("undecodable_caption", f"json: {e}") from None
    except RecursionError:
        raise Skip("undecodable_caption", "json: nested too deep") from None
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


_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or raise Skip. The type and size come from stat before
    anything is opened (a symlink to /dev/zero is a character device; a FIFO is never opened, as opening one
    blocks), and the open is non-blocking with a second check on the open descriptor, so a file swapped for a FIFO
    in between cannot hang the read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Skip("missing_file") from None
    if not stat.S_ISREG(st.st_mode):
        raise Skip("not_a_regular_file", _file_type(st.st_mode))
    if st.st_size > max_bytes:
        raise Skip("too_large", f"{st.st_size:,} bytes > --max-bytes {max_bytes:,}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Skip("not_a_regular_file", _file_type(st.st_mode))
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the stat
        raise Skip("too_large", f"over --max-bytes {max_bytes:,} bytes")
    return data


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
                    sidecar = read_bounded(base.with_name(stem + ".json"), opts.max_bytes)
                    caption, attributes = caption_from_json(sidecar, opts.caption_field)
                if ".txt" in exts:
                    caption = read_bounded(base.with_name(stem + ".txt"), opts.max_bytes)
            except Skip as e:
                caption_error = e
            except OSError as e:
                caption_error = Skip("undecodable_caption", f"unreadable sidecar: {e}")
            except Exception as e:
                caption_error = skip_of(e)
            for ext in images:
                path = base.with_name(stem + ext)
                sample = RawSample(key, str(path), caption=caption, attributes=attributes, error=caption_error)
                if sample.error is None:
                    try:
                        sample.image = read_bounded(path, opts.max_bytes)
                    except Exception as e:
                        sample.error = skip_of(e)
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
                if m.isdir():
                    continue
                key, ext = _split_member(m.name)
                if not m.isfile():  # a symlink, hard link, device or FIFO member: never followed or extracted
                    kind = "a link" if m.issym() or m.islnk() else "a device or FIFO"
                    yield RawSample(key, f"{path}:{m.name}", error=Skip("not_a_regular_file", f"member is {kind}"))
                    continue
                if m.size > opts.max_bytes:  # from the header: the stream skips the data without keeping it
                    yield RawSample(key, f"{path}:{m.name}",
                                    error=Skip("too_large", f"{m.size:,} bytes > --max-bytes {opts.max_bytes:,}"))
                    continue
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
            for i, line in enumerate(_bounded_lines(fh, opts.max_bytes)):
                if line is None:
                    yield i, None, f"line over --max-bytes {opts.max_bytes:,}"
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield i, None, f"not JSON: {e}"
                    continue
                except RecursionError:
                    yield i, None, "JSON nested too deep"
                    continue
                yield (i, row, "") if isinstance(row, dict) else (i, None, "not a JSON object")
    else:
        # deferred: pyarrow reads .parquet manifests only, and `dedistill --help` imports this module
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        keep, as_text, _ = parquet_columns(pf.schema_arrow, opts)
        i = 0
        for batch in pf.iter_batches(batch_size=4096, columns=keep):
            for name in as_text:
                batch = batch.set_column(batch.schema.get_field_index(name), name, batch.column(name).cast("string"))
            for row in batch.to_pylist():
                yield i, row, ""
                i += 1


def _bounded_lines(fh, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file, each read with at most `limit` + 1 bytes in memory; None for a longer line (the
    rest of which is read through and dropped), so a manifest without newlines cannot be read whole."""
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def parquet_columns(schema, opts: ConvertOptions) -> tuple[list[str], list[str], list[str]]:
    """(columns to read, columns read as text, columns dropped) of a parquet manifest. Extra columns become the JSON
    `attributes`: dates, times, durations and decimals are kept as their text; binary columns, and nested columns
    holding binary or dates, cannot be JSON and are dropped. `convert` prints one line naming both."""
    # deferred: pyarrow reads .parquet manifests only (see _manifest_rows)
    import pyarrow as pa

    def has(t, test) -> bool:
        return test(t) or any(has(t.field(k).type, test) for k in range(getattr(t, "num_fields", 0)))

    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)

    def textual(t) -> bool:
        return pa.types.is_temporal(t) or pa.types.is_decimal(t)

    own = {opts.path_field, opts.caption_field, opts.key_field}
    keep, as_text, dropped = [], [], []
    for f in schema:
        if f.name in own:
            keep.append(f.name)
        elif has(f.type, binary) or (has(f.type, textual) and not textual(f.type)):
            dropped.append(f.name)
        else:
            keep.append(f.name)
            if textual(f.type):
                as_text.append(f.name)
    return keep, as_text, dropped


def manifest_note(source: Path, opts: ConvertOptions) -> str:
    """The line `convert` prints about a parquet manifest's extra columns that are not JSON types ("" if none)."""
    if source.suffix != ".parquet":
        return ""
    # deferred: pyarrow reads .parquet manifests only (see _manifest_rows)
    import pyarrow.parquet as pq

    _, as_text, dropped = parquet_columns(pq.read_schema(source), opts)
    said = ([f"kept as text: {', '.join(as_text)}"] if as_text else []) + (
        [f"dropped (binary or nested): {', '.join(dropped)}"] if dropped else [])
    return f"{source.name}: extra columns {'; '.join(said)}" if said else ""


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
            sample.image = read_bounded(file, opts.max_bytes)
        except Exception as e:
            sample.error = skip_of(e)
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
    # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
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
            # The boundary: whatever goes wrong with this one sample (a check, a decode, an encoding, a bug) is
            # a counted skip; errors of the output (a full disk in writer.write) still stop the conversion.
            try:
                row = checked_row(s, opts)
                if s.key in seen:
                    raise Skip("duplicate_key")
            except Exception as e:
                e = skip_of(e)
                log.skip(e.reason, key=s.key, file=s.file, detail=e.detail)
            else:
                seen.add(s.key)
                writer.write(row)
                log.converted += 1
                log.resized += row["image"] is not s.image
                log.image_bytes += len(row["image"])
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


def checked_row(s: RawSample, opts: ConvertOptions) -> dict:
    """The MDS row of a sample, or raise: every check a sample passes before it is written, in the documented order
    (the source's own error, caption, image, key, attributes)."""
    if s.error is not None:
        raise s.error
    caption = check_caption(s.caption)
    fmt, w, h = check_image(s.image, min_size=opts.min_size, check=opts.check, max_pixels=opts.max_pixels)
    try:
        s.key.encode("utf-8")
    except UnicodeEncodeError:
        raise Skip("bad_key", printable(s.key)) from None
    try:
        json.dumps(s.attributes or {}, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise Skip("bad_attributes", f"{type(e).__name__}: {e}") from None
    image = s.image
    if opts.max_side and max(w, h) > opts.max_side:
        image, w, h = downscale(image, fmt, opts.max_side)
    return {"image": image, "caption": caption, "width": w, "height": h, "key": s.key, "attributes": s.attributes or {}}


def _worker_context():
    """fork when this process runs no other thread (the CLI): a worker starts in milliseconds, where spawn would
    re-import torch via streaming for seconds. With threads alive (a notebook, a test session with live streaming
    loaders) a forked child can inherit a lock held mid-use and hang, so then a forkserver with this module
    preloaded: a clean, single-threaded parent to fork from, paid for once per process."""
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


def _check_source(source: Path, out: Path, kind: str) -> None:
    """One line naming the flag when the source cannot be read as `kind`, or when `out` lies inside it."""
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


def _run_workers(jobs: list[dict], out: Path, shard_index: int, *, desc: str | None) -> list[dict]:
    """Each job's `convert_part` (in this process for one worker, else one process each) and its report; `desc`:
    the progress bar's label, None for no bar."""
    workers = len(jobs)

    def new_bar():
        if desc is None:
            return None
        return tqdm(desc=desc, unit=" samples", file=sys.stderr, dynamic_ncols=True)

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
    return reports


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
    _check_source(source, out, kind)
    out.mkdir(parents=True, exist_ok=True)

    note = manifest_note(source, opts) if kind == "manifest" else ""
    settings = _settings(source, kind, opts, num_shards, workers)
    for done in sorted(out.glob(f"part-{shard_index:05d}-*/report.json")):
        old = json.loads(done.read_text()).get("settings", {})
        _check_same_settings(done.parent, {k: old.get(k) for k in settings}, settings)

    jobs = [dict(source=source, out=out, kind=kind, opts=opts, slice_index=shard_index, num_slices=num_shards,
                 worker=j, workers=workers) for j in range(workers)]
    t0 = time.perf_counter()
    reports = _run_workers(jobs, out, shard_index, desc=f"convert {source.name}" if progress_bar else None)
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
              "parts": [part_name(shard_index, j) for j in range(workers)], "merged": False,
              "notes": [note] if note else []}
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
    # deferred: streaming takes seconds to import, and `dedistill --help` imports this module
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
