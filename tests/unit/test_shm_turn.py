"""Local leaders take turns registering streaming's shared-memory prefix (train/data.py `shm_registration_turn`):
without it, two jobs starting on one host at the same moment can pick the same free prefix, and one dies with
FileExistsError."""

import threading
import time

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
