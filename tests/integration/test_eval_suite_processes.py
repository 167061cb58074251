"""The eval suite across processes: two ranks give the images and metrics of one, and `eval.mode=job` submits a
job that training does not wait for (the in-process eval tests: tests/unit/test_eval_suite.py)."""

import time

import numpy as np
import pytest

from evals.suite import Scorers, sample_and_measure
from test_eval_suite import (
    FakeSettings, MeanPixelScorer, _broken_inception, _split_worker, fake_generate, train_tiny, write_suite,
)


@pytest.mark.slow
def test_two_ranks_give_the_images_and_metrics_of_one(tmp_path):
    """Each rank samples a contiguous block with seeds seed + global index; rank 0 gathers in order."""
    import torch.multiprocessing as mp

    from evals.assets import write_random_inception
    from evals.inception import load_inception

    weights = write_random_inception(tmp_path / "w.safetensors")
    prompts = [f"prompt {'x' * i}" for i in range(11)]  # 11 over 2 ranks, batch 1: uneven blocks, several chunks
    mp.spawn(_split_worker, args=(2, tmp_path / "store", weights, prompts, tmp_path / "two.npz"), nprocs=2)
    one = sample_and_measure(fake_generate, prompts, FakeSettings(),
                             Scorers(inception=load_inception(weights), dims=64, clip=MeanPixelScorer()), grid_n=8)
    two = np.load(tmp_path / "two.npz")
    assert two["features"].shape == (11, 64)
    np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(two["cosines"], one["cosines"])
    np.testing.assert_array_equal(two["grid"], np.stack([np.asarray(im) for im in one["grid"]]))
    assert len(set(np.round(one["cosines"], 6))) == 11  # distinct images: an order mix-up would show


@pytest.mark.slow
def test_job_mode_submits_and_training_does_not_wait(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """mode=job through submitit's local executor (not under SLURM): the job's failure lands in error.txt."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    broken = _broken_inception(tmp_path)
    suite = write_suite(tmp_path / "bad.yaml", **{"fid.inception_weights": str(broken)})
    run = tmp_path / "run"
    t0 = time.perf_counter()
    state = train_tiny(tiny_model_dir, tiny_data_dir, run, "eval.mode=job", f"eval.suite={suite}",
                       "train.max_steps=1", "eval.every_steps=1")
    assert state.step == 1
    error = run / "evals" / "step_00000001" / "tiny" / "error.txt"
    deadline = time.perf_counter() + 120
    while not error.is_file() and time.perf_counter() < deadline:
        time.sleep(0.5)
    assert error.is_file(), list((run / "evals").rglob("*"))
    assert "does not hold FID Inception weights" in error.read_text()
    assert list((run / "evals" / "submitit").glob("*_log.*")), "submitit wrote no job logs"
    assert time.perf_counter() - t0 < 150
