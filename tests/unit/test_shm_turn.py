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
