"""bench/gpu_session.py, the one-shot GPU script, cannot rot: its commands parse here, and its dry mode runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.gpu_session import check_parses, gpu_test_files, plan  # noqa: E402


def test_every_gpu_command_parses_and_has_a_rehearsal(tmp_path):
    steps = plan(tmp_path)
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert {"bench-512-eager", "bench-512-compiled", "bench-1024", "bench-512-sync-debug", "bench-512-grouped", "pytest-gpu",
            "demo-nccl", "proof-gpu-smoke", "bench-512-int8", "bench-512-float8"} == set(names)
    for step in steps:
        check_parses(step)  # the bench's, the CLI's, the proof's own parsers and config loaders
        assert step.dry is not None or step.why_not_dry, step.name
    demo = next(s for s in steps if s.name == "demo-nccl")
    assert "parallel.dist_backend=nccl" in demo.gpu and "parallel.dist_backend=gloo" in demo.dry
    assert {"tests/integration/test_bench_train_step_cli.py", "tests/unit/test_optim.py"} <= set(gpu_test_files())


def test_list_mode_prints_every_command():
    r = subprocess.run([sys.executable, "bench/gpu_session.py", "--list"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(plan(Path("/tmp")))


@pytest.mark.slow
def test_dry_run_writes_the_results_table(tmp_path):
    """The whole script as a GPU session runs it (bench/gpu_session.sh: import check, then every step's tiny CPU
    variant with gloo), minus the wheel install (GPU_WHEELS=none: this venv already has the packages)."""
    env = {**os.environ, "GPU_WHEELS": "none", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_results.json", "gpu_results.md", "gpu_session.log"]
    results = json.loads((out / "gpu_results.json").read_text())
    status = {s["name"]: s["status"] for s in results["steps"]}
    not_dry = ("bench-512-compiled", "proof-gpu-smoke", "bench-512-float8")
    assert {status[k] for k in not_dry} == {"not run in --dry"}
    assert all(v == "ok" for k, v in status.items() if k not in not_dry), status
    assert [(r["mode"], r["options"]) for r in results["rows"]] == [
        ("lora", "eager"), ("baseline", "eager"), ("lokr", "eager"), ("full", "eager"), ("lora", "sync-debug"),
        ("lora", "length grouping"), ("lora", "base int8")]
    table = (out / "gpu_results.md").read_text()
    assert "| date | GPU | mode |" in table and table.count("| eager |") == 4
    assert "gpu_session: diffusers 0.39" in r.stdout  # the import check ran first
