"""Read an MDS directory back with streaming's StreamingDataset, registered as the trainer registers its datasets.

pytest-xdist runs tests in parallel processes on one host, and a StreamingDataset claims a shared-memory prefix in
the host's /dev/shm: built bare, it can pick the prefix a trainer in another worker is registering (FileExistsError
'/NNNNNN_locals'). Through `register_dataset` it takes its turn like the rest.
"""

from train.data import register_dataset


def open_mds(path):
    from streaming import StreamingDataset

    return register_dataset(lambda: StreamingDataset(local=str(path), shuffle=False, batch_size=1))


def read_mds(path) -> list[dict]:
    ds = open_mds(path)
    return [ds[i] for i in range(len(ds))]
