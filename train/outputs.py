"""Files other processes read while they are being made: atomic writes, and "resume unless the settings changed".

A reader (another rank, a resumed job, a concurrent eval) must see the old file or the whole new one, never half of
one: every writer here goes through a temporary name beside the target, then one `os.replace`/`rename`, which is
atomic on one file system. A stage that resumes from outputs already on disk does so only when the settings that
made them are the ones asked for now; otherwise the error names the keys that differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write(path: str | Path, write: Callable[[Path], None], *, suffix: str = "", fsync: bool = False) -> None:
    """`write(tmp)` writes the content to a temporary file beside `path`, which then replaces `path` at once.
    `suffix`: the temporary name's ending, for writers that insist on one (`np.savez` adds `.npz` otherwise).
    `fsync`: the file and then its directory entry reach the disk before this returns, for a file whose presence
    vouches for others (a checkpoint's COMPLETE marker must not survive a power loss that its shards do not)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        write(tmp)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # O_RDONLY: a directory cannot be opened for writing, and fsync needs neither
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> None:
    # backslashreplace: a lone surrogate (an undecodable byte in a file name) is written escaped, never an error
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"), fsync=fsync)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON, indented, with a final newline (report.json and the like mark completion: never half a file)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it is renamed to `out_dir`, on error removed.

    Refuses (ValueError) an `out_dir` that exists and is not empty; an empty one is replaced.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: that is mode 0700, and the result is meant to be shared
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); rename(2) would also replace it, but say so explicitly
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def as_stored(settings: dict) -> dict:
    """Settings as they read back from JSON (tuples become lists), so a fresh dict compares equal to a stored one."""
    return json.loads(json.dumps(settings))


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the names an error message gives for nested settings."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def settings_diff(old: dict, new: dict) -> list[str]:
    """The (dotted) keys whose values differ between two settings dicts, sorted."""
    a, b = flat(as_stored(old)), flat(as_stored(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_same_settings(what: str, old: dict, new: dict, *, remedy: str) -> None:
    """ValueError unless the outputs `what` names were made with the settings asked for now."""
    diff = settings_diff(old, new)
    if diff:
        raise ValueError(f"{what} with other settings ({', '.join(diff)} differ); {remedy}")
