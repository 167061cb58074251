"""Read an MDS directory back with streaming's StreamingDataset, registered as the trainer registers its datasets.

pytest-xdist runs tests in parallel processes on one host, and a StreamingDataset claims a shared-memory prefix in
the host's /dev/shm: built bare, it can pick the prefix a trainer in another worker is registering (FileExistsError
'/NNNNNN_locals'). Under `shm_registration_turn` and with its prefix marked used, it takes its turn like the rest.
"""

from train.data import mark_prefix_used, shm_registration_turn
from train.parallelize import process_dist


def open_mds(path):
    from streaming import StreamingDataset

    with shm_registration_turn(process_dist()):
        ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
        mark_prefix_used(ds._shm_prefix_int)
    return ds


def read_mds(path) -> list[dict]:
    ds = open_mds(path)
    return [ds[i] for i in range(len(ds))]
