"""No pickles from user files, and no shell strings built from user input.

- DCP: a checkpoint's `.metadata` and its non-tensor entries are pickles. Crafted ones that would run a command are
  refused (`train.checkpoint.SafeReader` / `SafeLoadPlanner`), and the command does not run. Per-rank files load with
  `weights_only=True`.
- No module of ours calls `torch.load` without `weights_only=True`, `pickle.load(s)` outside that one reader, or
  `dcp.load` other than through `train.checkpoint.safe_load`.
- The sbatch scripts and `dedistill submit` with hostile arguments: tests/integration/test_security_cli.py.
"""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from train.checkpoint import CheckpointStore, RefusedFile, read_metadata, safe_load
from train.config import CheckpointConfig

REPO = Path(__file__).resolve().parents[2]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_checkpoint(path: Path, **extra) -> None:
    dcp.save({"model": {"w": torch.arange(4.0)}, **extra}, checkpoint_id=str(path), no_dist=True)


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "step_00000001", tmp_path / "PWNED"
    _small_checkpoint(ckpt)
    assert "model.w" in read_metadata(ckpt).state_dict_metadata  # the real metadata reads fine
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        read_metadata(ckpt)
    with pytest.raises(CheckpointException, match="posix.system|os.system"):  # DCP wraps reader errors
        safe_load({"model": {"w": torch.empty(4)}}, ckpt, no_dist=True)
    assert not marker.exists()


def test_crafted_non_tensor_entry_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "step_00000001", tmp_path / "PWNED"
    _small_checkpoint(ckpt, extra={"note": _Evil(marker)})  # DCP pickles non-tensors with torch.save
    assert not marker.exists()
    with pytest.raises(RefusedFile, match=r"\.distcp \(entry extra\.note\) refused.*(posix|os)\.system"):
        safe_load({"model": {"w": torch.empty(4)}, "extra": {"note": None}}, ckpt, no_dist=True)
    assert not marker.exists()
    # plain data in the same place loads
    ok = tmp_path / "ok"
    _small_checkpoint(ok, extra={"note": (0.1, "a", None, True)})
    state = {"model": {"w": torch.empty(4)}, "extra": {"note": None}}
    safe_load(state, ok, no_dist=True)
    assert state["extra"]["note"] == (0.1, "a", None, True)


def test_per_rank_file_is_loaded_weights_only(tmp_path):
    root, marker = tmp_path / "run", tmp_path / "PWNED"
    manager = CheckpointStore(root, CheckpointConfig(), rank=0)
    path = manager.save(1, {"model": {"w": torch.arange(4.0)}}, per_rank={"data": None})
    torch.save({"rng": _Evil(marker)}, path / "rank_00000.pt")  # a crafted per-rank file
    with pytest.raises(RefusedFile, match=r"rank_00000\.pt refused.*(posix|os)\.system"):
        manager.load(path, {"model": {"w": torch.empty(4)}})
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_our_code():
    offenders = []
    packages = ("train", "tools", "launch", "evals", "dataset_tools", "bench")
    for path in sorted(p for d in packages for p in (REPO / d).rglob("*.py")):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bdcp\.load\(|FileSystemReader\(", code) and path.name != "format.py":
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()} (use train.checkpoint.safe_load)")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(|\bUnpickler\(", code):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    # the one allowed unpickler: DCP metadata, restricted to DCP's own classes
    offenders = [o for o in offenders if not o.startswith("train/checkpoint/format.py") or "_MetadataUnpickler" not in o]
    assert not offenders, "unsafe deserialisation:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------------ sbatch / submit
