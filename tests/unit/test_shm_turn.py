"""Local leaders take turns registering streaming's shared-memory prefix (train/data.py `shm_registration_turn`):
without it, two jobs starting on one host at the same moment can pick the same free prefix, and one dies with
FileExistsError."""

import threading
import time
from pathlib import Path

import pytest
import torch

from train.data import shm_registration_turn
from train.parallelize import DistInfo


def dist(local_rank: int) -> DistInfo:
    return DistInfo(rank=local_rank, world_size=2, local_rank=local_rank, local_world_size=2,
                    device=torch.device("cpu"))


def test_a_second_local_leader_waits_for_the_first():
    order: list[str] = []
    entered = threading.Event()

    def second():
        with shm_registration_turn(dist(0)):
            order.append("second in")

    with shm_registration_turn(dist(0)):
        order.append("first in")
        t = threading.Thread(target=second)
        t.start()
        entered.wait(0.5)  # time for the second to reach the lock (it must not get in)
        time.sleep(0.2)
        order.append("first out")
    t.join(10)
    assert order == ["first in", "first out", "second in"]


def test_other_ranks_do_not_take_the_lock():
    with shm_registration_turn(dist(0)):
        done = []
        t = threading.Thread(target=lambda: done.append(shm_registration_turn(dist(1)).__enter__()))
        t.start()
        t.join(5)
        assert not t.is_alive()  # rank 1 of the node only looks the prefix up: it never waits here


def test_a_jobs_other_ranks_wait_while_another_job_registers():
    """streaming has every rank compute the first free prefix: job A's rank 1 must not look while job B's leader is
    registering, or it can pick the prefix B takes while A's leader picks the next one. It waits at A's barrier until
    A's leader holds the lock."""
    job_a = threading.Barrier(2)
    order: list[str] = []

    def rank(local_rank: int) -> None:
        with shm_registration_turn(dist(local_rank), wait_for_leader=lambda: job_a.wait(10)):
            order.append(f"A{local_rank} looks")

    with shm_registration_turn(dist(0), wait_for_leader=lambda: None):  # job B's leader registering
        threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        order.append("B done")
    for t in threads:
        t.join(10)
    assert order[0] == "B done" and sorted(order[1:]) == ["A0 looks", "A1 looks"]


def _leftovers(prefix: int) -> tuple[list[str], int]:
    """Two prefixes as torn-down datasets leave them (a killed job's resource tracker unlinks in any order): at
    `prefix` (free for every name) only `barrier`; at the next prefix free for `barrier` (streaming's own scan: stale
    file locks of killed jobs may lie between) only `locals`. streaming then finds `locals` free at `prefix` and
    `barrier` free at the other, takes the larger, and creates `locals` there. Returns the names and that prefix."""
    from multiprocessing import shared_memory

    from streaming.base.constant import BARRIER, LOCALS
    from streaming.base.shared.prefix import _check_and_find, _get_path

    def create(name: str) -> str:
        shared_memory.SharedMemory(name, create=True, size=16).close()
        return name

    names = [create(_get_path(prefix, BARRIER))]
    taken = _check_and_find([], [None], BARRIER)
    names.append(create(_get_path(taken, LOCALS)))
    return names, taken


def _streaming_scan() -> int:
    """streaming's own choice, by its own scan (what `get_shm_prefix` computes before registering)."""
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _check_and_find

    return max(_check_and_find([], [None], name) for name in SHM_TO_CLEAN)


def _unlink(names: list[str]) -> None:
    for name in names:
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_half_freed_prefix_is_released_when_it_outlives_the_wait(tmp_path):
    """The CI failure (FileExistsError '/003941_locals'). Held under the lock, as a local leader would, so no other
    test's dataset registers meanwhile."""
    from streaming.base.shared.prefix import get_shm_prefix
    from streaming.base.world import World

    from train.data import _prefix_streaming_picks, release_half_freed_prefix

    with shm_registration_turn(dist(0), wait_for_leader=lambda: None):
        names, taken = _leftovers(_prefix_streaming_picks())
        try:
            assert _prefix_streaming_picks() == taken == _streaming_scan()
            with pytest.raises(FileExistsError):  # what streaming does on its own
                get_shm_prefix([str(tmp_path)], [None], World.detect())
            t0 = time.monotonic()
            assert release_half_freed_prefix(wait_s=0.3) == [taken]
            assert time.monotonic() - t0 >= 0.3  # its owner's teardown got the wait first
            assert not Path("/dev/shm", names[1]).exists()
            assert _prefix_streaming_picks() == taken  # and now registers there
        finally:
            _unlink(names)


def test_a_prefix_whose_teardown_finishes_is_left_to_its_owner():
    from train.data import _prefix_streaming_picks, release_half_freed_prefix

    with shm_registration_turn(dist(0), wait_for_leader=lambda: None):
        names, _ = _leftovers(_prefix_streaming_picks())
        finisher = threading.Timer(0.2, lambda: _unlink(names[1:]))
        finisher.start()
        try:
            t0 = time.monotonic()
            assert release_half_freed_prefix(wait_s=10) == []
            assert 0.2 <= time.monotonic() - t0 < 10
        finally:
            finisher.join()
            _unlink(names)


def test_a_built_dataset_marks_its_prefix_before_it_is_iterated(tiny_data_dir):
    """streaming only skips a prefix whose temp-dir file lock exists, and creates that lock on first iteration: a
    dataset built and not yet iterated must not look free to the next job while it is torn down."""
    from train.config import DataConfig
    from train.data import _file_locks, build_dataset

    ds = build_dataset(DataConfig(local=str(tiny_data_dir), resolution=64, shuffle=False), batch_size=1)
    assert _file_locks(ds._shm_prefix_int)[0].exists()


@pytest.mark.parametrize("iterate", [False, True])
def test_a_process_leaves_no_file_lock_or_segment_behind(tiny_data_dir, tmp_path, iterate):
    """streaming never removes its temp-dir file locks and skips every prefix that has one: without cleanup each run
    of the suite left ~300 in /tmp, and every dataset after scanned past all of them. At exit, once streaming has
    unlinked the segments, the process removes its prefixes' locks. (Its own TMPDIR: other workers' locks in /tmp
    come and go meanwhile.)"""
    import os
    import subprocess
    import sys

    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    repo = Path(__file__).resolve().parents[2]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = (f"from train.config import DataConfig\nfrom train.data import build_loader\n"
            f"loader = build_loader(DataConfig(local={str(tiny_data_dir)!r}, resolution=64, shuffle=False), "
            f"batch_size=1)\n" + ("next(iter(loader))\n" if iterate else "")
            + "import os, tempfile\nprint(sorted(os.listdir(tempfile.gettempdir())))\n"
            + "print(loader.dataset._shm_prefix_int)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo), "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-3000:]
    prefix = int(r.stdout.split()[-1])
    assert f"{prefix:06}_barrier_filelock" in r.stdout  # it had a lock while it lived ...
    assert not [p.name for p in tmp.iterdir() if p.name.endswith("_filelock")]  # ... and removed it at exit
    locals_ = Path("/dev/shm", _get_path(prefix, LOCALS))
    if locals_.exists():  # another worker's dataset may have taken the freed prefix since: not ours
        assert str(tiny_data_dir) not in _unpack_locals(locals_.read_bytes())[0]
