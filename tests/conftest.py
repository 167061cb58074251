"""Shared fixtures. The tiny pipeline and dataset are written once per session (both deterministic for a seed)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny FLUX pipeline in diffusers layout (`dedistill tiny-model`, seed 0)."""
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """128 procedural 64 px samples as MDS shards (`dedistill tiny-data`, seed 0)."""
    from dataset_tools.tiny_data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tiny") / "data", n=128, size=64, seed=0)


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The uninterrupted tiny run every resume/backend test compares with: 2 gloo ranks, FSDP2, 6 steps, a checkpoint
    every 2 (tests/tiny_runs.py). Started with `dedistill submit --cluster local` (submitit's local executor ->
    launch.torchrun --standalone), the path users without SLURM take; the tests that compare plain torchrun runs
    with it bitwise also check that this path trains exactly the same job."""
    import sys

    import tiny_runs

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cmd = [sys.executable, "-m", "launch", "submit", str(tiny_runs.CONFIG), "--cluster", "local",
           "--nproc-per-node", "2", *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir)]
    r = tiny_runs.run(cmd)
    assert "local job" in r.stdout and "'finished': True" in r.stdout, r.stdout[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real local SLURM cluster (munged, slurmctld, two slurmd "nodes"), installed from Debian packages if missing
    (as root) and stopped by PID at the end (tests/slurm_cluster.py). Skips only where it cannot be installed."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from slurm_cluster import LocalSlurmCluster, ensure_installed

    reason = ensure_installed()
    if reason:
        if os.environ.get("DEDISTILL_REQUIRE_SLURM") == "1":  # CI sets it where apt should work: fail, not skip
            pytest.fail(f"DEDISTILL_REQUIRE_SLURM=1 but SLURM is unavailable: {reason}")
        pytest.skip(f"no SLURM: {reason}")
    base = Path(tempfile.mkdtemp(prefix="dedistill-slurm-"))  # not under pytest's 0700 tmp: munge must enter it
    cluster = LocalSlurmCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("DEDISTILL_KEEP_SLURM"):  # set it to keep the logs and state for a post-mortem
            shutil.rmtree(base, ignore_errors=True)
