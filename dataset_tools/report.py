"""Skip accounting for the dataset tools: every bad input is skipped, counted by reason and listed, never fatal.

Each part (one worker's output sub-directory) writes `skipped.jsonl` (one line per skipped sample) and
`report.json` (its counts, written last: it doubles as the part's completion marker). `merge_reports` sums the
parts into the dataset's top-level `report.json`; its format is documented in docs/data.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.outputs import write_json_atomic

# Reasons a sample is skipped. The names are part of report.json's format (docs/data.md).
REASONS: dict[str, str] = {
    "empty_file": "zero-byte image file",
    "not_an_image": "the bytes are not an image PIL can identify (e.g. text with a .jpg extension)",
    "unsupported_format": "an image, but not JPEG, PNG or WebP",
    "truncated_image": "the image ends early (interrupted download or copy)",
    "corrupt_image": "the image does not decode",
    "too_small": "the short side is under --min-size",
    "missing_caption": "no caption (no .txt sidecar, no caption field)",
    "empty_caption": "the caption is empty or whitespace",
    "undecodable_caption": "the caption is not UTF-8 text (or its JSON does not parse)",
    "duplicate_key": "a sample with the same key was already converted (the first one is kept)",
    "missing_file": "a manifest row names an image file that does not exist",
    "bad_row": "a manifest row that is not a JSON object / lacks the path column",
    "bad_archive": "a tar file that ends early or does not parse (the samples before the damage are kept)",
    "too_large": "the file (or tar member, or manifest line) is over --max-bytes; checked before reading it",
    "too_many_pixels": "the image header claims more pixels than --max-pixels (a decompression bomb)",
    "not_a_regular_file": "a FIFO, device, socket or directory where a file was expected, or a link/device tar member",
    "bad_key": "the key or file name is not valid UTF-8 (e.g. a name holding the byte 0xFF)",
    "bad_attributes": "the extra fields cannot be stored as JSON",
    "unexpected_error": "any other error while reading or checking this one sample (the detail names it)",
}

# report.json lists skipped samples inline up to this many; every part's skipped.jsonl has them all.
MAX_LISTED = 10_000


class Skip(Exception):
    """Raised by a sample check: the sample is skipped for `reason` (a REASONS key)."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipLog:
    """Counts of converted/skipped samples for one part, streaming skipped entries to `skipped.jsonl`."""

    path: Path | None = None
    """Where skipped entries go (one JSON object a line); None keeps nothing but the counts."""
    converted: int = 0
    image_bytes: int = 0
    resized: int = 0
    """Converted samples re-encoded smaller (over --max-side), included in `converted`."""
    by_reason: Counter = field(default_factory=Counter)
    _fh: Any = None

    def skip(self, reason: str, *, key: str, file: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.by_reason[reason] += 1
        if self.path is not None:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8")
            entry = {"key": printable(key), "file": printable(file), "reason": reason}
            if detail:
                entry["detail"] = printable(detail[:300])
            self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def summary(self) -> dict:
        return {
            "converted": self.converted,
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.by_reason.items())),
            "image_bytes": self.image_bytes,
            "resized": self.resized,
        }


def printable(text: str) -> str:
    """`text` as valid UTF-8: an undecodable byte in a file name (a lone surrogate in Python) becomes `\\udcff`, so
    the skip list itself cannot fail to write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_skipped(path: Path, limit: int | None = None) -> list[dict]:
    out: list[dict] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(out) >= limit:
                break
            out.append(json.loads(line))
    return out


def merge_reports(root: Path, parts: list[Path], *, extra: dict | None = None) -> dict:
    """Sum the parts' report.json files into root/report.json (format: docs/data.md) and return it."""
    total = Counter()
    converted = image_bytes = resized = 0
    listed: list[dict] = []
    per_part = []
    elapsed = 0.0
    for part in parts:
        rep = json.loads((part / "report.json").read_text())
        converted += rep["converted"]
        image_bytes += rep.get("image_bytes", 0)
        resized += rep.get("resized", 0)
        total.update(rep["skipped_by_reason"])
        elapsed = max(elapsed, rep.get("elapsed_s", 0.0))
        per_part.append({"dir": part.name, "converted": rep["converted"], "skipped": rep["skipped"]})
        if len(listed) < MAX_LISTED:
            for entry in read_skipped(part / "skipped.jsonl", MAX_LISTED - len(listed)):
                listed.append({**entry, "part": part.name})
    n_skipped = sum(total.values())
    report = {
        **(extra or {}),
        "converted": converted,
        "skipped": n_skipped,
        "skipped_by_reason": dict(sorted(total.items())),
        "image_bytes": image_bytes,
        "resized": resized,
        "skipped_samples": listed,
        "skipped_samples_truncated": n_skipped > len(listed),
        "parts": per_part,
    }
    write_json_atomic(root / "report.json", report)
    return report
