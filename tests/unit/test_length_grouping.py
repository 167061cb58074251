"""data.length_grouping: captions of similar T5 length share a batch inside each aspect bucket; the order is
deterministic, every sample is still seen once per epoch, and a resumed loader continues exactly."""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
import torch

from train.config import DataConfig, load_config
from train.data import build_loader, forever, group_by_length


def _sample(i: int, length: int, shape=(3, 4, 4)) -> dict:
    return {"caption": f"c{i}", "pixels": torch.full(shape, float(i)), "n": length}


def _padding(batches, length_of) -> float:
    """Fraction of the processed text tokens (batch x its longest) that are padding."""
    total = sum(len(b) * max(length_of(s) for s in b) for b in batches)
    return 1 - sum(length_of(s) for b in batches for s in b) / total


def test_group_by_length_keeps_buckets_and_samples():
    rng = random.Random(0)
    shapes = [(3, 4, 4), (3, 4, 8)]
    samples = []
    for slot in range(8):  # 8 batches of 4, each from one bucket (as per_stream batching hands them out)
        shape = shapes[rng.random() < 0.4]
        samples += [_sample(slot * 4 + j, rng.randint(8, 200), shape) for j in range(4)]
    length_of = lambda s: s["n"]  # noqa: E731
    out = group_by_length(samples, batch_size=4, length_of=length_of)
    assert [len(b) for b in out] == [4] * 8
    assert sorted(s["caption"] for b in out for s in b) == sorted(s["caption"] for s in samples)
    for slot, batch in enumerate(out):  # slot i keeps its bucket, and never mixes two
        assert {tuple(s["pixels"].shape) for s in batch} == {tuple(samples[slot * 4]["pixels"].shape)}
    before = _padding([samples[i : i + 4] for i in range(0, 32, 4)], length_of)
    assert _padding(out, length_of) < before / 2
    assert [[s["caption"] for s in b] for b in out] == [
        [s["caption"] for s in b] for b in group_by_length(samples, batch_size=4, length_of=length_of)]


def test_config_keys():
    cfg = load_config(None, ["data.length_grouping=true", "data.length_window=8"])
    assert cfg.data.length_grouping and cfg.data.length_window == 8
    assert load_config(None).data.length_grouping is False
    with pytest.raises(ValueError, match="data.length_window"):
        DataConfig(length_window=-1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dataset_tools.tiny_data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("lg") / "mds", n=40, size=16, seed=3)


def _words(caption: str) -> int:
    return len(caption.split())


_copies = itertools.count()


def _loader(shards, *, grouping=True, window=3, workers=0):
    # Each loader reads its own copy: streaming registers a local directory in shared memory, and a loader left for
    # the garbage collector could release the registration of a live one on the same directory.
    local = shards.parent / f"copy{next(_copies)}"
    shutil.copytree(shards, local)
    cfg = DataConfig(local=str(local), resolution=16, shuffle=True, num_workers=workers, length_grouping=grouping,
                     length_window=window)
    return build_loader(cfg, batch_size=4, caption_length=_words)


def _take(loader, n: int) -> list[list[str]]:
    it = forever(loader)
    return [list(next(it)["caption"]) for _ in range(n)]


def test_an_epoch_sees_every_sample_once_and_is_deterministic(shards):
    plain = _take(_loader(shards, grouping=False), 10)
    grouped = _take(_loader(shards), 10)  # 40 samples / batch 4: one epoch
    assert sorted(c for b in grouped for c in b) == sorted(c for b in plain for c in b)
    assert len({c for b in grouped for c in b}) == 40
    assert grouped == _take(_loader(shards), 10)
    spread = lambda bs: sum(max(map(_words, b)) - min(map(_words, b)) for b in bs)  # noqa: E731
    assert spread(grouped) < spread(plain)


@pytest.mark.parametrize("stop", [2, 3, 4, 10])  # inside a window, at its end, inside the next, at the epoch's end
def test_resume_continues_exactly(shards, stop):
    straight = _take(_loader(shards), 16)  # crosses into the second epoch
    first = _loader(shards)
    it = forever(first)
    head = [list(next(it)["caption"]) for _ in range(stop)]
    state = first.state_dict()
    resumed = _loader(shards)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 16 - stop) == straight


def test_raw_shards_need_a_length_function(shards):
    cfg = DataConfig(local=str(shards), resolution=16, length_grouping=True)
    with pytest.raises(ValueError, match="data.length_grouping"):
        build_loader(cfg, batch_size=4)


def test_resume_with_loader_workers(shards):
    """Two loader processes interleave batches; the window is regrouped in the main process, so resume holds."""
    straight = _take(_loader(shards, workers=2), 8)
    assert straight == _take(_loader(shards), 8)  # the workers change nothing about the order
    first = _loader(shards, workers=2)
    it = forever(first)
    head = [list(next(it)["caption"]) for _ in range(5)]
    state = first.state_dict()
    del it
    resumed = _loader(shards, workers=2)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 3) == straight


def test_padding_bench_measures_the_real_grouping():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.length_grouping import measure, stream

    samples = stream(1024, batch=4, buckets=5, median=96, seed=0)
    off, on = measure(samples, batch=4, window=1), measure(samples, batch=4, window=16)
    assert 0.2 < off["text_pad"] < 0.5 and on["text_pad"] < off["text_pad"] / 1.5
    assert on["text_per_sample"] < off["text_per_sample"] and on[512] < off[512]


def test_precomputed_samples_group_by_stored_t5_length():
    from train.data import _stored_t5_length

    samples = [{"caption": f"c{i}", "latent_mean": torch.zeros(4, 2, 2), "t5": torch.zeros(n, 8)}
               for i, n in enumerate([3, 40, 5, 38, 4, 39, 6, 41])]
    out = group_by_length(samples, batch_size=4, length_of=_stored_t5_length)
    assert sorted(sorted(_stored_t5_length(s) for s in b) for b in out) == [[3, 4, 5, 6], [38, 39, 40, 41]]
