"""Faults at cluster scale, caused for real on this machine (docs/reliability.md).

- A lost worker: one of 2 gloo ranks SIGKILLs itself in the middle of a step; torchrun (`--max-restarts`) restarts
  the group, which resumes from the newest checkpoint and ends bitwise equal to the uninterrupted reference run.
- A hung rank: one rank stalls before a collective; the other fails after `parallel.timeout_s` with an error naming
  the collective, and the job ends.
- A flaky object store: shards stream from the local S3 server through a proxy that resets connections and adds
  latency; the batches equal a fault-free run's and the retries are counted in the log.
"""

import re
import subprocess
import sys
import time

import pytest

import tiny_runs
from test_s3 import s3_endpoint  # noqa: F401  (the local S3 server fixture)

FAULT_TRAIN = str(tiny_runs.REPO / "tests" / "_fault_train.py")


def _launch(*torchrun_args, fault: str, overrides: list[str]) -> list[str]:
    """`python -m launch.torchrun` (what slurm/train.sbatch and `dedistill submit` run) over the fault script."""
    return [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=2", *torchrun_args,
            FAULT_TRAIN, fault, str(tiny_runs.CONFIG), *overrides]


# ---------------------------------------------------------------------------------------------------- lost worker


def test_max_restarts_comes_from_the_config(monkeypatch):
    from launch.torchrun import config_max_restarts, slurm_torchrun_args

    cfg = str(tiny_runs.CONFIG)
    assert config_max_restarts(["--standalone", "-m", "train", cfg, "parallel.max_restarts=3"]) == 3
    assert config_max_restarts(["--nnodes=2", "--module", "launch", "train", cfg]) == 0  # the default
    assert config_max_restarts(["--max-restarts=1", "-m", "train", cfg, "parallel.max_restarts=3"]) is None  # flag wins
    assert config_max_restarts(["script.py", cfg]) is None  # not our job: torchrun's own default
    with pytest.raises(ValueError, match="parallel.max_restarts"):
        config_max_restarts(["-m", "train", cfg, "parallel.max_restarts=-1"])
    # the SLURM arguments (no scontrol here: the head node's address is given) leave restarts to the config
    monkeypatch.setattr("launch.torchrun.first_node", lambda nodelist: "n1")
    monkeypatch.setattr("launch.torchrun.node_addr", lambda node: "10.0.0.1")
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "RDZV_PORT": "1234"}
    assert not any("restarts" in a for a in slurm_torchrun_args(2, env))
    assert "--max-restarts" not in (tiny_runs.REPO / "slurm" / "train.sbatch").read_text().split("# ---")[-1]


@pytest.mark.slow
def test_lost_worker_restarts_in_place_and_resumes_bitwise(tiny_model_dir, tiny_data_dir, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    over = tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir)
    t0 = time.monotonic()
    r = tiny_runs.run(_launch("--max-restarts=2", fault="kill:1:5", overrides=over), timeout=300, check=False)
    out = r.stdout + r.stderr
    (tmp_path / "torchrun.log").write_text(out)
    assert r.returncode == 0, f"the restarted run failed; log: {tmp_path / 'torchrun.log'}"
    print(f"lost worker: {time.monotonic() - t0:.1f} s")
    assert "FAULT kill rank 1 in the forward of step 5" in out, out[-3000:]
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out)  # torchrun's agent saw the SIGKILL ...
    assert "torchrun restart 1 of 2" in out  # ... and started the group again, in place
    assert re.search(r"resumed from \S*step_00000004", out), out[-3000:]  # the newest of steps 2 and 4
    reference, resumed = (tiny_runs.ckpt(r, tiny_runs.STEPS) for r in (reference_run, run_dir))
    tiny_runs.assert_same_state(reference, resumed)


# ------------------------------------------------------------------------------------------------------- hung rank


@pytest.mark.slow
def test_hung_rank_ends_the_job_within_the_timeout_naming_the_collective(tiny_model_dir, tiny_data_dir, tmp_path):
    timeout_s = 12
    over = tiny_runs.overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run", **{"parallel.timeout_s": timeout_s})
    proc = subprocess.Popen(_launch(fault="stall:1:3:600", overrides=over), cwd=tiny_runs.REPO, env=tiny_runs.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            tiny_runs.kill_tree(proc)
    ended = time.time()
    assert proc.returncode != 0, out[-3000:]
    stalled = float(re.search(r"FAULT stall rank 1 .* at ([0-9.]+)", out).group(1))
    m = re.search(r"CollectiveError: (stop-flag all_reduce \S+ once per step\)) failed on rank 0 after ([0-9.]+) s "
                  rf"\(parallel.timeout_s={timeout_s}\)", out)
    assert m, out[-4000:]
    waited = float(m.group(2))
    assert timeout_s - 1 <= waited <= timeout_s + 5, waited
    # rank 0 fails at the timeout; torchrun then stops the stuck rank (SIGTERM, SIGKILL 30 s later: a rank stuck in
    # a call cannot act on SIGTERM) and exits non-zero
    print(f"hung rank: failed after {waited:.1f} s, job ended {ended - stalled:.1f} s after the stall")
    assert ended - stalled <= timeout_s + 30 + 40, ended - stalled


# --------------------------------------------------------------------------------------------- flaky object store


@pytest.fixture
def flaky_s3(s3_endpoint, tiny_data_dir):
    """The tiny dataset on the local S3 server, and a FlakyProxy in front of the server."""
    from flaky_proxy import FlakyProxy
    from test_s3 import BUCKET, upload

    env, client = s3_endpoint
    upload(client, tiny_data_dir, "flaky/raw")
    host, port = env["S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    with FlakyProxy((host, int(port)), every=3, max_resets=8, latency_s=0.02) as proxy:
        yield env, proxy, f"s3://{BUCKET}/flaky/raw"


def _batches(remote, local, data_dir=None):
    from train.config import DataConfig
    from train.data import build_loader

    cfg = DataConfig(remote=remote, local=str(local), resolution=64, shuffle=True, download_retry=2,
                     download_timeout=20)
    return list(build_loader(cfg, batch_size=8))


@pytest.mark.slow
def test_flaky_object_store_gives_the_same_batches_and_counts_retries(flaky_s3, tiny_data_dir, tmp_path, caplog,
                                                                     monkeypatch):
    import torch

    from train import remote

    env, proxy, url = flaky_s3
    reference = _batches(None, tiny_data_dir)  # fault-free: the shards on local disk
    before = dict(remote.RETRIES)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    with caplog.at_level("WARNING", logger="train.remote"):
        got = _batches(url, tmp_path / "cache")
    retries = {k: remote.RETRIES[k] - before[k] for k in before}
    print(f"proxy: {proxy.connections} connections, resets {proxy.resets}; retries {retries}")
    assert proxy.total_resets >= 4 and proxy.resets["request"] and proxy.resets["body"], proxy.resets
    assert proxy.refused == 0
    assert [b["caption"] for b in got] == [b["caption"] for b in reference]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(got, reference)) and len(got) == 16
    lines = [r.getMessage() for r in caplog.records if "data.remote: retry #" in r.getMessage()]
    assert len(lines) == sum(retries.values()) >= proxy.total_resets, (lines, proxy.resets)
    assert retries["botocore"] and retries["s3transfer"], retries


@pytest.mark.slow
def test_training_through_a_flaky_object_store_completes_like_a_fault_free_run(flaky_s3, tiny_model_dir,
                                                                               tiny_data_dir, tmp_path):
    """The trainer (one process) streams through the proxy: it completes, its losses equal a run on the same shards
    from local disk, and its log counts the retries."""
    from test_s3 import run_train

    env, proxy, url = flaky_s3
    common = [f"model.path={tiny_model_dir}", "parallel.dist_backend=gloo", "train.max_steps=3",
              "data.download_timeout=20"]
    clean = run_train(env, tmp_path / "clean", [*common, f"data.local={tiny_data_dir}"])
    flaky = run_train({**env, "S3_ENDPOINT_URL": proxy.endpoint}, tmp_path / "flaky",
                      [*common, f"data.remote={url}", f"data.local={tmp_path / 'cache'}"])
    print(f"proxy: {proxy.connections} connections, resets {proxy.resets}; log: {flaky['retry_lines'][-1:]}")
    assert flaky["step"] == clean["step"] == 3
    assert flaky["losses"] == clean["losses"]  # the same batches, bit for bit
    assert proxy.total_resets >= 3, proxy.resets
    assert len(flaky["retry_lines"]) >= proxy.total_resets
    assert flaky["retry_lines"][-1].startswith(f"data.remote: retry #{len(flaky['retry_lines'])} ")


@pytest.mark.slow
def test_resets_past_botocores_retries_are_retried_by_streaming(s3_endpoint, tiny_data_dir, tmp_path, caplog,
                                                                monkeypatch):
    """Three resets in a row exhaust botocore's 3 attempts of one request: the download fails, streaming (or our
    optional-file fetch) retries it, the batches are still the fault-free ones, and the log says so."""
    from flaky_proxy import FlakyProxy
    from test_s3 import BUCKET, upload

    env, client = s3_endpoint
    upload(client, tiny_data_dir, "dense/raw")
    host, port = env["S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    reference = _batches(None, tiny_data_dir)
    with FlakyProxy((host, int(port)), every=1, max_resets=3, kinds=("request",)) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        with caplog.at_level("WARNING", logger="train.remote"):
            got = _batches(f"s3://{BUCKET}/dense/raw", tmp_path / "cache")
    lines = [r.getMessage() for r in caplog.records if "data.remote: retry #" in r.getMessage()]
    assert proxy.resets == {"request": 3, "body": 0}
    assert [b["caption"] for b in got] == [b["caption"] for b in reference]
    assert any("(streaming) download of s3://" in line and "failed" in line for line in lines), lines
