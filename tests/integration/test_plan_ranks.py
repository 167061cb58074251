"""The plan's communication bytes against a two-rank gloo run (the in-process plan tests: tests/unit/test_plan.py)."""

import json
import os
import subprocess
import sys

import pytest

from test_plan import REPO
from train.config import load_config
from tools.plan import Cluster, make_plan


@pytest.mark.slow
def test_comm_bytes_equal_a_two_rank_gloo_run(tiny_model_dir, tiny_data_dir, tmp_path):
    """All-gather and reduce-scatter buffers of one 2-micro-batch step of `dedistill train` on 2 gloo ranks, counted
    by wrapping torch.distributed's collectives, equal the plan's per-step bytes (before the ring factor)."""
    overrides = [f"model.path={tiny_model_dir}", f"data.local={tiny_data_dir}", f"run_dir={tmp_path / 'run'}",
                 "train.max_steps=1", "train.grad_accum=2", "train.progress_bar=false", "sample.at_end=false"]
    out = tmp_path / "counts.json"
    env = {**os.environ, "COUNT_OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(REPO / "tests" / "_count_collectives.py"), str(REPO / "configs" / "tiny-cpu.yaml"),
                    *overrides], check=True, env=env, cwd=tmp_path, timeout=600)
    measured = json.loads(out.read_text())
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)
    plan = make_plan(cfg, Cluster(nodes=1, gpus_per_node=2, device="cpu"))
    ring = (2 - 1) / 2
    assert measured["all_gather"] == pytest.approx(plan.comm.all_gather / ring, rel=1e-9)
    assert measured["reduce_scatter"] == pytest.approx(plan.comm.reduce_scatter / ring, rel=1e-9)
    assert measured["all_reduce"] == 0 == plan.comm.all_reduce
