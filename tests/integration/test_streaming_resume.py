"""Deterministic resume of the training loader on 2 gloo ranks: stop mid-epoch (and exactly at an epoch's end),
restore loader.state_dict() in fresh processes, and get the batches an uninterrupted pair gets. Plus the
stale-shared-memory case: a killed process must not block the next loader on the same cache directory."""

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset_tools.buckets import BucketSpec, bucket_dataset
from test_buckets import make_aspect_mds

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOTAL = 22  # batches per rank: crosses an epoch boundary for both datasets below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fingerprint(batch) -> list:
    """What a batch is: its captions and a checksum of its pixels (and their shape: the bucket)."""
    px = batch["pixels"]
    return [list(batch["caption"]), list(px.shape), round(float(px.double().sum()), 3)]


def _rank_main(rank: int, world: int, port: int, jobs: list[dict], result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from train.config import DataConfig
    from train.data import build_loader, forever

    results = []
    for job in jobs:
        loader = build_loader(DataConfig(**job["data"]), batch_size=job["batch_size"])
        if job.get("state") is not None:
            loader.load_state_dict(job["state"][rank])
        batches = forever(loader)
        fps, states = [], {}
        for i in range(job["take"]):
            fps.append(_fingerprint(next(batches)))
            if i + 1 in job.get("save_at", ()):
                states[i + 1] = loader.state_dict()
        results.append({"batches": fps, "states": states})
        del batches, loader
    Path(f"{result_path}.{rank}").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
    # A multiprocessing child ends in os._exit, skipping atexit, where streaming unlinks its shared memory: run the
    # handlers now, or every run of this test leaves segments in /dev/shm.
    import atexit

    atexit._run_exitfuncs()


def run_pair(jobs: list[dict], tmp: Path, name: str) -> list[list[dict]]:
    """Both ranks' results per job: out[job][rank]."""
    import torch.multiprocessing as tmp_mp

    path = str(tmp / name)
    # forkserver with the heavy modules preloaded: children start in milliseconds (spawn re-imports torch and
    # streaming per process), and unlike fork they do not inherit the locks of this session's live loader threads.
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "streaming", "train.data", __name__])
    tmp_mp.start_processes(_rank_main, args=(2, _free_port(), jobs, path), nprocs=2, join=True,
                           start_method="forkserver")
    per_rank = [json.loads(Path(f"{path}.{r}").read_text()) for r in range(2)]
    return [[per_rank[r][j] for r in range(2)] for j in range(len(jobs))]


def test_resume_gives_the_uninterrupted_batches_on_two_ranks(tmp_path, tiny_data_dir):
    raw, _ = make_aspect_mds(tmp_path, n=48)
    bucketed = tmp_path / "bucketed"
    bucket_dataset(raw, bucketed, spec=BucketSpec(resolution=64), progress_bar=False)
    datasets = {
        # 128 samples / (4 x 2 ranks) = 16 batches an epoch: stop mid-epoch (6) and exactly at its end (16).
        "raw": dict(data=dict(local=str(tiny_data_dir), resolution=64, shuffle_seed=11), batch_size=4, cuts=(6, 16)),
        # Aspect buckets, every global batch from one bucket; 10 batches an epoch with 2 x 2 ranks.
        "buckets": dict(data=dict(local=str(bucketed), resolution=64, buckets=True, shuffle_seed=5), batch_size=2,
                        cuts=(7,)),
    }
    straight_jobs = [dict(data=d["data"], batch_size=d["batch_size"], take=TOTAL, save_at=d["cuts"])
                     for d in datasets.values()]
    straight = run_pair(straight_jobs, tmp_path, "straight")

    resumed_jobs, expect = [], []
    for (name, d), res in zip(datasets.items(), straight):
        for cut in d["cuts"]:
            state = [res[r]["states"][str(cut)] for r in range(2)]
            resumed_jobs.append(dict(data=d["data"], batch_size=d["batch_size"], take=TOTAL - cut, state=state))
            expect.append((name, cut, [res[r]["batches"][cut:] for r in range(2)]))
    resumed = run_pair(resumed_jobs, tmp_path, "resumed")

    for (name, cut, want), got in zip(expect, resumed):
        for r in range(2):
            assert [b for b in got[r]["batches"]] == want[r], f"{name}: rank {r} resumed at {cut} differs"
    # The comparison has teeth: ranks see different samples, and batches change from step to step.
    raw_straight = straight[0]
    assert raw_straight[0]["batches"][0][0] != raw_straight[1]["batches"][0][0]
    assert len({json.dumps(b[0]) for b in raw_straight[0]["batches"]}) > 16
    # Bucketed: both ranks are in the same bucket at every step, and more than one bucket occurs.
    b_straight = straight[1]
    shapes = [(b0[1], b1[1]) for b0, b1 in zip(b_straight[0]["batches"], b_straight[1]["batches"])]
    assert all(s0 == s1 for s0, s1 in shapes) and len({tuple(s0) for s0, _ in shapes}) == 3


_SCRIPT = """
import sys, time
mode, remote, local = sys.argv[1:4]
if mode == "hold":
    from train.config import DataConfig
    from train.data import build_loader
    loader = build_loader(DataConfig(remote=remote, local=local, resolution=64), batch_size=2)
    next(iter(loader))
    print("holding", flush=True)
    time.sleep(600)
else:  # the requeued job: first streaming on its own, then our loader
    from streaming import StreamingDataset
    try:
        StreamingDataset(remote=remote, local=local, batch_size=2)
        print("plain: ok", flush=True)
    except ValueError as e:
        print("plain:", str(e).splitlines()[0][:40], flush=True)
    from train.config import DataConfig
    from train.data import build_loader
    loader = build_loader(DataConfig(remote=remote, local=local, resolution=64), batch_size=2)
    print("loader:", len(next(iter(loader))["caption"]))
"""


def test_a_killed_loader_does_not_block_the_next_one(tmp_path, tiny_data_dir):
    """A requeued job on the same node: the first was SIGKILLed with its whole process group (Python's resource
    tracker too, as an OOM kill or scancel --signal=KILL does), so its streaming shared memory is still in
    /dev/shm; the new job has a fresh job-private /tmp (SLURM's tmpfs), so streaming reaches the leaked
    registration and refuses the cache dir ("Reused local directory"). build_loader releases exactly that
    registration: another live dataset on the node keeps working."""
    from streaming import StreamingDataset

    cache = tmp_path / "cache"

    def run(mode, job, **kw):
        tmp = tmp_path / f"{job}_tmp"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
        args = [sys.executable, "-c", _SCRIPT, mode, str(tiny_data_dir), str(cache)]
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kw)

    holder = run("hold", "job1", start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()[-2000:]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    other = StreamingDataset(remote=str(tiny_data_dir), local=str(tmp_path / "other_cache"), batch_size=2)

    out, err = run("next", "job2").communicate(timeout=300)
    lines = out.strip().splitlines()
    assert lines[0].startswith("plain: Reused local directory"), (out, err[-2000:])  # streaming alone refuses
    assert lines[1] == "loader: 2", (out, err[-2000:])
    assert "released stale streaming shared memory" in err
    assert other[0]["caption"]  # the other dataset's shared memory was left alone


def test_rank_0_fetches_every_stream_index_before_the_dataset_is_built(tmp_path, tiny_data_dir, monkeypatch):
    """Nodes that share data.local raced on streaming's index.json.tmp rename (the 2-node SLURM docs case failed with
    FileNotFoundError): global rank 0 now puts each stream's index in place first, replacing a stale one; other
    ranks fetch nothing and find it there."""
    from train.config import DataConfig
    from train.data import fetch_indexes

    remote, local = tmp_path / "remote", tmp_path / "cache"
    shutil.copytree(tiny_data_dir, remote / "b001")
    shutil.copytree(tiny_data_dir, remote / "b002")
    cfg = DataConfig(remote=str(remote), local=str(local), resolution=64)
    monkeypatch.setenv("RANK", "1")
    fetch_indexes(cfg, ["b001", "b002"])
    assert not local.exists()
    (local / "b002").mkdir(parents=True)
    (local / "b002" / "index.json").write_text("{}")  # a stale cache
    monkeypatch.setenv("RANK", "0")
    fetch_indexes(cfg, ["b001", "b002"])
    for sub in ("b001", "b002"):
        assert (local / sub / "index.json").read_bytes() == (remote / sub / "index.json").read_bytes()
    assert sorted(p.name for p in local.rglob("*")) == ["b001", "b002", "index.json", "index.json"]  # no temp files
