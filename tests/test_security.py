"""No pickles from user files, and no shell strings built from user input.

- DCP: a checkpoint's `.metadata` and its non-tensor entries are pickles. Crafted ones that would run a command are
  refused (`train.checkpoint.SafeReader` / `SafeLoadPlanner`), and the command does not run. Per-rank files load with
  `weights_only=True`.
- No module of ours calls `torch.load` without `weights_only=True`, `pickle.load(s)` outside that one reader, or
  `dcp.load` other than through `train.checkpoint.safe_load`.
- slurm/train.sbatch hands a run name with spaces, `;` and `$(...)` to the training verbatim (fake srun/scontrol on
  PATH, so this runs without SLURM; tests/test_slurm.py does the same on a real cluster), and `dedistill submit`
  refuses values that would break out of an `#SBATCH` line.
"""

import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from train.checkpoint import CheckpointManager, read_metadata, safe_load
from train.config import CheckpointConfig

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(CheckpointException, match="(?i)weights.only|unpickl|unsupported|global"):
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
    manager = CheckpointManager(root, CheckpointConfig(), rank=0)
    path = manager.save(1, {"model": {"w": torch.arange(4.0)}}, per_rank={"data": None})
    torch.save({"rng": _Evil(marker)}, path / "rank_00000.pt")  # a crafted per-rank file
    with pytest.raises(pickle.UnpicklingError):
        manager.load(path, {"model": {"w": torch.empty(4)}})
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_our_code():
    offenders = []
    packages = ("train", "tools", "launch", "evals", "dataset_tools", "bench")
    for path in sorted(p for d in packages for p in (REPO / d).rglob("*.py")):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bdcp\.load\(|FileSystemReader\(", code) and path.name != "checkpoint.py":
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()} (use train.checkpoint.safe_load)")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(|\bUnpickler\(", code):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    # the one allowed unpickler: DCP metadata, restricted to DCP's own classes
    offenders = [o for o in offenders if not o.startswith("train/checkpoint.py") or "_MetadataUnpickler" not in o]
    assert not offenders, "unsafe deserialisation:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------------ sbatch / submit

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_DIR/srun.argv"
echo $$ > "$FAKE_DIR/srun.pid"
trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 0' USR1
trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit 0' TERM
if [ -n "${FAKE_SRUN_WAIT:-}" ]; then for _ in $(seq 300); do sleep 0.1; done; fi
exit 0
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
case "$1 $2" in
  "show hostnames") echo n7; echo n8 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=10.9.8.7 NodeHostName=$3 Version=22.05" ;;
esac
"""
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.log"
[ "$1" = "--signal=USR1" ] && kill -USR1 "$(cat "$FAKE_DIR/srun.pid")"
exit 0
"""


def fake_slurm(tmp_path: Path) -> dict:
    """PATH with fake srun/scontrol/scancel that record what they are given, and a job's SLURM_* environment."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "n[7-8]", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NAME": "dedistill", "PYTHON": "python3",
    }


HOSTILE = ["configs/tiny-cpu.yaml", "run_dir=runs/my run; touch PWNED", "sample.prompts=[$(touch PWNED2)]", "a`id`b"]


def test_train_sbatch_passes_hostile_arguments_verbatim(tmp_path):
    env = fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), *HOSTILE], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert argv[argv.index("-m", argv.index("launch.torchrun") + 1) + 1:] == ["train", *HOSTILE]
    assert "--rdzv-endpoint=10.9.8.7:29734" in argv  # NodeAddr of the first node, 29500 + job id % 1000
    assert "--nnodes=2" in argv and "--rdzv-id=1234" in argv
    assert (tmp_path / "slurm-logs" / "dedistill-1234").is_dir()
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))


def test_other_sbatch_scripts_pass_arguments_verbatim(tmp_path):
    env = fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(REPO / "slurm" / "eval.sbatch"), *HOSTILE], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert argv[-len(HOSTILE) - 1:] == ["eval", *HOSTILE]
    # convert_array.sbatch runs python itself (no srun): a fake PYTHON records what it gets
    fake_python = tmp_path / "fakebin" / "python"
    fake_python.write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" > "$FAKE_DIR/python.argv"\n')
    fake_python.chmod(0o755)
    env_array = {**env, "PYTHON": str(fake_python), "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}
    r = subprocess.run(["bash", str(REPO / "slurm" / "convert_array.sbatch"), "--source", "my dir; rm -rf x", "--out",
                        "$(touch PWNED)"], cwd=tmp_path, env=env_array, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "python.argv").read_text().split("\0")[:-1]
    assert argv == ["-u", "-m", "dataset_tools", "data", "convert", "--source", "my dir; rm -rf x", "--out",
                    "$(touch PWNED)", "--shard-index", "3", "--num-shards", "8", "--no-progress"]
    assert not list(tmp_path.rglob("PWNED*"))

    for script in ("train.sbatch", "eval.sbatch", "convert_array.sbatch"):
        text = (REPO / "slurm" / script).read_text()
        assert subprocess.run(["bash", "-n", str(REPO / "slurm" / script)]).returncode == 0
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in code if re.search(r"(^|[;&|(]\s*)eval\s|\bbash -c|\bsh -c", line)], script


def test_submit_refuses_values_that_break_sbatch_lines_and_quotes_the_rest(tmp_path):
    from launch.submit import SubmitOptions

    for key in ("name", "partition", "account", "qos", "constraint"):
        with pytest.raises(ValueError, match=f"--{key}"):
            SubmitOptions(**{key: "ok\n#SBATCH --wrap=touch PWNED"})
    with pytest.raises(ValueError, match="--sbatch"):
        SubmitOptions(sbatch=["reservation=x\nrm -rf /"])

    # what submitit writes for a hostile run dir / job name: one bash-valid script whose srun line keeps the path whole
    from submitit.slurm.slurm import _make_sbatch_string

    folder = tmp_path / "my run; touch PWNED $(touch PWNED2)" / "submitit" / "%j"
    text = _make_sbatch_string(command="python -m submitit.core._submit 'x'", folder=folder, job_name="a; b",
                               nodes=2, ntasks_per_node=1)
    script = tmp_path / "s.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    import shlex

    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert str(folder / "%j_%t_log.out") in shlex.split(srun)
