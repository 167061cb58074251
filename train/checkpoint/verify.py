"""Checkpoint integrity: at save time a manifest (size and sha256 of every file), inside the completion marker;
at resume and in `dedistill checkpoint verify`, the checks that read a checkpoint back against it.

DCP verifies nothing when it loads: a truncated shard fails somewhere deep inside a load (or reads short), and a
flipped byte in tensor data loads silently. So every save records each file's size and sha256 in `COMPLETE`, which
is written last and atomically, after every rank's files are on disk (each rank hashes the files it wrote; rank 0
gathers them). A check names one file and why, in one line:

1. `COMPLETE` is the JSON marker a save writes.
2. With a manifest: every file it lists exists, has its size and its sha256.
3. Structure, for every checkpoint: `.metadata` is DCP metadata that the safe unpickler reads, every file it names
   exists and holds the byte ranges it names, and every `rank_<r>.pt` of the world that wrote it exists. Checkpoints
   written before manifests existed get only these checks (their rank files are also loaded): a truncated or missing
   file is found, a flipped byte inside a shard is not, and `verify` says so.
4. `dedistill checkpoint verify` also runs the loads a resume runs on every pickle in the checkpoint (`safe=True`):
   each rank file and each non-tensor DCP entry through `train.checkpoint.format.safe_torch_load`. A manifest proves the
   bytes are the ones hashed, not that a save wrote them: a file swapped and re-hashed is refused here, in one line,
   as resume would refuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from train.checkpoint.format import (
    MARKER, METADATA, RefusedFile, list_checkpoints, rank_file, read_metadata, safe_load, safe_torch_load,
)
from train.run_dir import RunDir, is_checkpoint_dir

MANIFEST_KEY = "files"
QUARANTINE_SUFFIX = ".corrupt"


def digest(path: Path) -> dict:
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": sha}


def files_of_rank(path: Path, rank: int) -> list[str]:
    """The files `rank` wrote into a checkpoint: its rank file and its DCP shards (FileSystemWriter names them
    `__<rank>_<n>.distcp`); rank 0 also writes `.metadata`. Whatever this misses, rank 0 hashes (`manifest`)."""
    names = [rank_file(rank), *(p.name for p in path.glob(f"__{rank}_*.distcp"))]
    if rank == 0:
        names.append(METADATA)
    return sorted(n for n in names if (path / n).is_file())


def hash_files(path: Path, names: list[str]) -> dict[str, dict]:
    return {n: digest(path / n) for n in names}


def manifest(path: Path, gathered: list[dict[str, dict]]) -> dict[str, dict]:
    """Every rank's hashes, plus any file of the checkpoint none of them listed (hashed here)."""
    files: dict[str, dict] = {}
    for part in gathered:
        files.update(part)
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name not in files and not p.name.startswith(MARKER):
            files[p.name] = digest(p)
    return dict(sorted(files.items()))


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def read_marker(path: Path) -> dict | Problem:
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return Problem(MARKER, "missing (the save did not finish)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return Problem(MARKER, f"not the JSON marker a save writes ({type(e).__name__})")
    if not isinstance(marker, dict):
        return Problem(MARKER, "not the JSON marker a save writes")
    return marker


def _check_file(path: Path, name: str, want: dict, *, checksums: bool) -> Problem | None:
    f = path / name
    if not f.is_file():
        return Problem(name, "missing (listed in the manifest)")
    size = f.stat().st_size
    if size < want["size"]:
        return Problem(name, f"truncated: {size:,} of {want['size']:,} bytes")
    if size != want["size"]:
        return Problem(name, f"{size:,} bytes, the manifest says {want['size']:,}")
    if checksums and digest(f)["sha256"] != want["sha256"]:
        return Problem(name, "sha256 differs from the manifest (the bytes changed after the save)")
    return None


def check_structure(path: Path, marker: dict, *, load_rank_files: bool = False) -> Problem | None:
    if not (path / METADATA).is_file():
        return Problem(METADATA, "missing (DCP's index of the shards)")
    try:
        metadata = read_metadata(path)
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a garbage pickle raises anything from UnpicklingError to EOFError or AttributeError
        first = (str(e).splitlines() or [""])[0][:120]
        return Problem(METADATA, f"not readable DCP metadata ({type(e).__name__}: {first})")
    for name, end in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            return Problem(name, "missing (named by .metadata)")
        if f.stat().st_size < end:
            return Problem(name, f"truncated: {f.stat().st_size:,} bytes, .metadata names data up to byte {end:,}")
    for r in range(int(marker.get("world_size", 1))):
        f = path / rank_file(r)
        if not f.is_file():
            return Problem(f.name, f"missing (the checkpoint was written by {marker.get('world_size', 1)} processes)")
        if load_rank_files:
            try:
                safe_torch_load(f, name=f.name)
            except RefusedFile as e:
                return Problem(f.name, f"refused by the safe loader: {e.reason}")
            except Exception as e:
                return Problem(f.name, f"not loadable ({type(e).__name__})")
    return None


def check_safe_load(path: Path) -> Problem | None:
    """Every non-tensor DCP entry loaded as resume loads it (`safe_load`, `SafeLoadPlanner`): a pickle that names
    anything but plain data is refused. Tensors are not read (the manifest's sha256 covers their bytes)."""
    entries = {k: None for k, v in read_metadata(path).state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata)}
    if not entries:
        return None
    try:
        safe_load(entries, path, no_dist=True)
    except RefusedFile as e:
        return Problem(e.file, f"refused by the safe loader: {e.reason}")
    return None


def check(path: Path, *, part: tuple[int, int] = (0, 1), checksums: bool = True, safe: bool = False) -> Problem | None:
    """The first problem of checkpoint `path` (None: it verifies). `part=(i, n)`: check only the i-th of n slices of
    its files (ranks verify one checkpoint together); slice 0 also checks the structure. `safe`: also run resume's
    safe loads on every pickle in it (`dedistill checkpoint verify`)."""
    marker = read_marker(path)
    if isinstance(marker, Problem):
        return marker
    files = marker.get(MANIFEST_KEY)
    if files is not None:
        names = sorted(files)[part[0] :: part[1]]
        for name in names:
            problem = _check_file(path, name, files[name], checksums=checksums)
            if problem:
                return problem
    if part[0] == 0:
        return check_structure(path, marker, load_rank_files=files is None or safe) or (
            check_safe_load(path) if safe else None)
    return None


def has_manifest(path: Path) -> bool:
    marker = read_marker(path)
    return isinstance(marker, dict) and MANIFEST_KEY in marker


def quarantine(path: Path) -> Path:
    """Move a corrupt checkpoint out of the way (never deleted: it may be a storage fault worth a look)."""
    target = path.with_name(path.name + QUARANTINE_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}{n}")
    path.rename(target)
    return target


def verify_run(run_dir: str | Path) -> tuple[list[str], bool]:
    """`dedistill checkpoint verify`: one line per checkpoint dir of a run (or of one checkpoint dir), and whether
    the newest complete one is bad (resume would fall back from it)."""
    run = RunDir(run_dir)
    if run.checkpoints.is_dir():
        root, dirs = run.checkpoints, run.checkpoint_entries()
    elif is_checkpoint_dir(run_dir):
        root, dirs = Path(run_dir).parent, [Path(run_dir)]
    else:
        raise ValueError(f"'{run_dir}' is neither a run dir (no checkpoints/ in it) nor a checkpoint dir (step_N)")
    if not dirs:
        raise ValueError(f"no checkpoints in '{root}'")
    found = list_checkpoints(root)
    complete = {p for _, p in found}
    newest = found[-1][1] if found else None
    lines, newest_bad = [], False
    for p in dirs:
        if QUARANTINE_SUFFIX in p.name:
            problem = check(p)
            lines.append(f"{p.name}  quarantined by a resume ({problem or 'now verifies'}); not resumed")
        elif p not in complete:
            lines.append(f"{p.name}  incomplete (no {MARKER}): never resumed, removed by the next save")
        else:
            problem = check(p, safe=True)
            if problem:
                lines.append(f"{p.name}  BAD {problem}")
                newest_bad |= p == newest
            elif has_manifest(p):
                lines.append(f"{p.name}  ok (size and sha256 of every file)")
            else:
                lines.append(f"{p.name}  ok (structure only: written without checksums, a flipped byte would pass)")
    return lines, newest_bad
