"""Checkpoint faults (docs/reliability.md), each caused for real on a real tiny training run's DCP checkpoints.

1. A corrupt newest checkpoint (truncated `.distcp`, a flipped byte, a missing shard, garbage `.metadata`, a missing
   `rank_N.pt`): `dedistill checkpoint verify` names the file and why; resume moves it aside, says so in one line,
   falls back to the previous checkpoint and trains on to exactly the uninterrupted run's parameters.
2. A disk that fills up in the middle of a save (a small tmpfs mounted as root): the save fails on every rank with
   an error naming the path, the partial directory is gone, the previous checkpoints are intact and still verify,
   and the run stops; freed space, the same command resumes and finishes bitwise
   (tests/integration/test_reliability_checkpoint_ranks.py, with the two-rank faults).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import tiny_runs
from train.checkpoint import CheckpointStore, latest_checkpoint
from train.checkpoint.verify import MARKER, check
from train.config import CheckpointConfig, load_config

STEP6 = "step_00000006"


# ---------------------------------------------------------------------------------------------------- helpers


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    """`dedistill ...` in this process (tiny_runs.cli_status): exit status, stdout, stderr."""
    capsys.readouterr()
    rc = tiny_runs.cli_status(*argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def train_args(model, data, run_dir, **extra) -> list[str]:
    return ["train", str(tiny_runs.CONFIG), *tiny_runs.overrides(model, data, run_dir, **extra)]


def train_cfg(model, data, run_dir, **extra):
    return load_config(tiny_runs.CONFIG, tiny_runs.overrides(model, data, run_dir, **extra))


@pytest.fixture(scope="module")
def one_rank_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The tiny run in one process: 6 steps, checkpoints at 2, 4, 6, all kept."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    tiny_runs.train_in_process(train_cfg(tiny_model_dir, tiny_data_dir, run_dir))
    return run_dir


@pytest.fixture
def run_copy(one_rank_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(one_rank_run, dst)
    return dst


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def truncate_half(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


def garbage(f: Path) -> None:
    f.write_bytes(os.urandom(f.stat().st_size))  # same size: only the checksum or the unpickler can tell


# fault -> (how it is caused on the newest checkpoint, the file the verdict must name, the reason it must give)
FAULTS = {
    "truncated_distcp": (lambda c: truncate_half(c / "__0_0.distcp"), "__0_0.distcp",
                         r"truncated: [\d,]+ of [\d,]+ bytes"),
    "flipped_byte": (lambda c: flip_byte(c / "__0_0.distcp"), "__0_0.distcp", r"sha256 differs"),
    "missing_shard": (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp", r"missing"),
    "garbage_metadata": (lambda c: garbage(c / ".metadata"), ".metadata", r"sha256 differs"),
    "missing_rank_file": (lambda c: (c / "rank_00000.pt").unlink(), "rank_00000.pt", r"missing"),
}


# ------------------------------------------------------------------------------------------------ part 1: save


def test_save_writes_a_manifest_of_every_file_and_verify_says_ok(one_rank_run, capsys):
    for step in (2, 4, 6):
        c = tiny_runs.ckpt(one_rank_run, step)
        files = json.loads((c / MARKER).read_text())["files"]
        on_disk = sorted(p.name for p in c.iterdir() if p.name != MARKER)
        assert sorted(files) == on_disk and {".metadata", "__0_0.distcp", "rank_00000.pt"} <= set(files)
        for name, want in files.items():
            import hashlib

            assert want["size"] == (c / name).stat().st_size
            assert want["sha256"] == hashlib.sha256((c / name).read_bytes()).hexdigest()
    rc, out, _ = cli("checkpoint", "verify", str(one_rank_run), capsys=capsys)
    assert rc == 0
    assert out.splitlines() == [f"step_0000000{s}  ok (size and sha256 of every file)" for s in (2, 4, 6)]


# -------------------------------------------------------------------------------------- part 1: each fault


@pytest.mark.parametrize("fault", list(FAULTS))
def test_verify_names_the_file_and_why_and_fails_when_the_newest_is_bad(run_copy, fault, capsys):
    cause, name, reason = FAULTS[fault]
    cause(run_copy / "checkpoints" / STEP6)
    rc, out, _ = cli("checkpoint", "verify", str(run_copy), capsys=capsys)
    lines = out.splitlines()
    assert rc == 1, out
    assert lines[:2] == [f"step_0000000{s}  ok (size and sha256 of every file)" for s in (2, 4)]
    assert re.fullmatch(rf"{STEP6}  BAD {re.escape(name)}: {reason}.*", lines[2]), lines[2]
    # one checkpoint dir works too, and an older bad one alone does not fail the run's verdict
    rc, out, _ = cli("checkpoint", "verify", str(run_copy / "checkpoints" / STEP6), capsys=capsys)
    assert rc == 1 and out.startswith(f"{STEP6}  BAD {name}")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_moves_the_corrupt_newest_aside_and_falls_back(run_copy, fault):
    """What the trainer does at start (CheckpointStore.resume_from), on each fault."""
    cause, name, reason = FAULTS[fault]
    cause(run_copy / "checkpoints" / STEP6)
    logged = []
    chosen = CheckpointStore(run_copy, CheckpointConfig(), rank=0).resume_from(log=logged.append)
    assert chosen == tiny_runs.ckpt(run_copy, 4)
    assert len(logged) == 1 and re.fullmatch(
        rf"\[dedistill\] checkpoint {STEP6} is corrupt: {re.escape(name)}: {reason}.*; moved to {STEP6}\.corrupt, "
        r"falling back to step_00000004", logged[0]), logged
    assert (run_copy / "checkpoints" / f"{STEP6}.corrupt").is_dir()  # kept for a post-mortem, never deleted
    assert latest_checkpoint(run_copy / "checkpoints") == chosen


@pytest.mark.parametrize("fault", ["flipped_byte", "missing_rank_file"])
def test_training_resumes_past_a_corrupt_checkpoint_and_ends_bitwise(run_copy, one_rank_run, tiny_model_dir,
                                                                     tiny_data_dir, fault, capsys):
    """The real trainer: the flipped byte only a checksum can see, and a missing per-rank file. It falls back to
    step 4, trains steps 5-6 again and writes a step 6 equal to the uninterrupted run's, tensor for tensor."""
    cause, name, _ = FAULTS[fault]
    cause(run_copy / "checkpoints" / STEP6)
    rc, out, err = cli(*train_args(tiny_model_dir, tiny_data_dir, run_copy), capsys=capsys)
    assert rc == 0, err[-3000:]
    assert f"checkpoint {STEP6} is corrupt: {name}" in out and "resumed from" in out and "step_00000004" in out
    tiny_runs.assert_same_state(tiny_runs.ckpt(one_rank_run, 6), tiny_runs.ckpt(run_copy, 6))
    assert check(tiny_runs.ckpt(run_copy, 6)) is None


def test_deepspeed_checkpoints_carry_the_same_manifest(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """DeepSpeed saves through the same checkpoint manager in the same DCP layout: the same manifest, the same
    verdicts (one process, ZeRO-2, 2 steps)."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    rc, out, err = cli(*train_args(tiny_model_dir, tiny_data_dir, run_dir, steps=2,
                                   **{"parallel.backend": "deepspeed"}), capsys=capsys)
    assert rc == 0 and "backend=deepspeed" in out, err[-3000:]
    rc, out, _ = cli("checkpoint", "verify", str(run_dir), capsys=capsys)
    assert rc == 0 and out == "step_00000002  ok (size and sha256 of every file)\n"
    flip_byte(tiny_runs.ckpt(run_dir, 2) / "__0_0.distcp")
    rc, out, _ = cli("checkpoint", "verify", str(run_dir), capsys=capsys)
    assert rc == 1 and out.startswith("step_00000002  BAD __0_0.distcp: sha256 differs")


def test_checkpoints_without_a_manifest_are_checked_structurally_and_say_so(run_copy, capsys):
    """Checkpoints written before manifests existed: a missing or truncated file and garbage metadata are still
    found (DCP's own index), a flipped byte inside a shard is not, and `verify` says which kind of check it made."""
    for step in (2, 4, 6):
        marker = tiny_runs.ckpt(run_copy, step) / MARKER
        meta = json.loads(marker.read_text())
        del meta["files"]
        marker.write_text(json.dumps(meta))
    garbage(tiny_runs.ckpt(run_copy, 6) / ".metadata")
    truncate_half(tiny_runs.ckpt(run_copy, 4) / "__0_0.distcp")
    flip_byte(tiny_runs.ckpt(run_copy, 2) / "__0_0.distcp")
    rc, out, _ = cli("checkpoint", "verify", str(run_copy), capsys=capsys)
    lines = out.splitlines()
    assert rc == 1
    assert lines[0] == "step_00000002  ok (structure only: written without checksums, a flipped byte would pass)"
    assert re.fullmatch(r"step_00000004  BAD __0_0\.distcp: truncated: [\d,]+ bytes, \.metadata names data up to "
                        r"byte [\d,]+", lines[1]), lines[1]
    assert lines[2].startswith(f"{STEP6}  BAD .metadata: not readable DCP metadata ("), lines[2]


def test_when_no_checkpoint_verifies_resume_refuses_and_moves_nothing(run_copy):
    for step in (2, 4, 6):
        (tiny_runs.ckpt(run_copy, step) / "rank_00000.pt").unlink()
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"no checkpoint in '.*' verifies \(step_00000006: rank_00000\.pt: missing"
                                         r".*step_00000002: rank_00000\.pt: missing.*checkpoint\.resume=false"):
        CheckpointStore(run_copy, CheckpointConfig(), rank=0).resume_from(log=print)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def test_verify_reports_incomplete_dirs_and_refuses_what_is_not_a_run(run_copy, tmp_path, capsys):
    half = tiny_runs.ckpt(run_copy, 8)
    shutil.copytree(tiny_runs.ckpt(run_copy, 6), half)
    (half / MARKER).unlink()  # a save killed before its marker
    rc, out, _ = cli("checkpoint", "verify", str(run_copy), capsys=capsys)
    assert rc == 0  # the newest *complete* checkpoint is what a resume takes, and it is fine
    assert out.splitlines()[-1] == "step_00000008  incomplete (no COMPLETE): never resumed, removed by the next save"
    rc, _, err = cli("checkpoint", "verify", str(tmp_path / "nothing"), capsys=capsys)
    assert rc == 2 and "dedistill: error: " in err and "neither a run dir" in err


# ------------------------------------------------------------------------------------------ part 2: disk full


# --------------------------------------------------------------------------------------- two ranks (slow)
