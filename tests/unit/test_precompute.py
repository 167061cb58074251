"""`dedistill data precompute`: the loss on precomputed shards equals the loss on the raw ones; unpadded storage;
aspect buckets; resumable slices; the settings training checks."""

import json

import numpy as np
import pytest
import torch

from mds_read import open_mds

from dataset_tools.buckets import BucketSpec, assign_bucket
from dataset_tools.precompute import PrecomputeOptions, precompute, to_store
from train.config import DataConfig, ObjectiveConfig
from train.data import Collate, _tensor, build_dataset, build_loader


@pytest.fixture(scope="module")
def frozen_and_transformer(tiny_model_dir):
    from train.model import load_transformer, load_vae
    from train.step import Encoders
    from train.text import TextEncoder

    cpu = torch.device("cpu")
    frozen = Encoders(vae=load_vae(tiny_model_dir, dtype=torch.float32, device=cpu),
                    text=TextEncoder(tiny_model_dir, dtype=torch.float32, device=cpu), dtype=torch.float32, device=cpu)
    return frozen, load_transformer(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def precomputed_square(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The tiny set precomputed like the raw trainer sees it: one square 64 px bucket, fp32 storage."""
    out = tmp_path_factory.mktemp("pre") / "square"
    precompute(tiny_model_dir, tiny_data_dir, out, spec=BucketSpec(resolution=64, square=True),
               opts=PrecomputeOptions(dtype="fp32", batch_size=16, max_text_tokens=512), progress_bar=False)
    return out


def _raw_sample_index(ds) -> dict[str, int]:
    from streaming import StreamingDataset

    return {StreamingDataset.__getitem__(ds, i)["key"]: i for i in range(ds.num_samples)}


def test_precomputed_loss_equals_raw_loss(precomputed_square, tiny_data_dir, frozen_and_transformer):
    """Same seed, same samples: raw shards (VAE + T5 + CLIP in the step) vs precomputed shards give the same loss,
    with no caption dropout, some, and all (the stored empty prompt vs the text encoder's)."""
    from train.step import forward_backward_step

    frozen, transformer = frozen_and_transformer
    raw = build_dataset(DataConfig(local=str(tiny_data_dir), resolution=64, shuffle=False), batch_size=4)
    loader = build_loader(DataConfig(local=str(precomputed_square), resolution=64, shuffle=False), batch_size=4)
    pre = loader.dataset
    by_key = _raw_sample_index(raw)
    from streaming import StreamingDataset

    # Four samples with different caption lengths, so padding and trimming are exercised.
    keys = [StreamingDataset.__getitem__(pre, i)["key"] for i in range(pre.num_samples)]
    lengths = {k: StreamingDataset.__getitem__(pre, i)["t5_len"] for i, k in enumerate(keys)}
    chosen = sorted(keys, key=lambda k: lengths[k])[::40][:4]
    assert len({lengths[k] for k in chosen}) == 4
    pre_batch = loader.collate_fn([pre[keys.index(k)] for k in chosen])
    raw_batch = Collate()([raw[by_key[k]] for k in chosen])
    assert pre_batch["caption"] == raw_batch["caption"]
    assert pre_batch["t5"].shape[1] == max(lengths[k] for k in chosen)  # padded to the batch's longest only

    losses = []
    for dropout in (0.0, 0.5, 1.0):
        cfg = ObjectiveConfig(caption_dropout=dropout, max_text_tokens=512)
        a = forward_backward_step(transformer, raw_batch, frozen, cfg, generator=torch.Generator().manual_seed(7),
                                  backward=False)
        b = forward_backward_step(transformer, pre_batch, frozen, cfg, generator=torch.Generator().manual_seed(7),
                                  backward=False)
        assert torch.equal(a["dropped"], b["dropped"])
        assert a["text_tokens"] == b["text_tokens"]
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
        losses.append(a["loss"].item())
        if dropout == 0.5:
            assert 0 < int(a["dropped"].sum()) < 4
    assert len(set(losses)) == 3  # dropout changed the loss: the comparison is not vacuous
    # Another seed draws another latent sample from the stored posterior (mean + std * eps), as the raw path does.
    cfg = ObjectiveConfig(caption_dropout=0.0, max_text_tokens=512)
    c = forward_backward_step(transformer, pre_batch, frozen, cfg, generator=torch.Generator().manual_seed(8),
                              backward=False)
    assert c["loss"].item() != losses[0]

    with pytest.raises(ValueError, match="objective.max_text_tokens: 256, but .* precomputed with --max-text-tokens 512"):
        forward_backward_step(transformer, pre_batch, frozen, ObjectiveConfig(max_text_tokens=256),
                              generator=torch.Generator().manual_seed(0), backward=False)
    with pytest.raises(ValueError, match="objective.attention_mask"):
        forward_backward_step(transformer, pre_batch, frozen, ObjectiveConfig(attention_mask=False),
                              generator=torch.Generator().manual_seed(0), backward=False)


def test_stored_text_states_are_unpadded_and_match_the_encoder(precomputed_square, frozen_and_transformer):
    frozen, _ = frozen_and_transformer
    ds = open_mds(precomputed_square / "b000")
    samples = [ds[i] for i in range(8)]
    enc = frozen.text.encode([s["caption"] for s in samples], max_tokens=512, masked=True)
    for i, s in enumerate(samples):
        n = int(enc.mask[i].sum())
        assert s["t5"].shape == (n, enc.t5.shape[2]) == (s["t5_len"], enc.t5.shape[2])  # no padding rows
        torch.testing.assert_close(torch.tensor(s["t5"]), enc.t5[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(s["pooled"]), enc.pooled[i], rtol=1e-5, atol=1e-5)
        assert s["latent_mean"].shape == (4, 8, 8) and s["latent_std"].shape == (4, 8, 8)
        assert (s["latent_std"] > 0).all()
        assert "image" not in s
    layout = json.loads((precomputed_square / "buckets.json").read_text())
    assert layout["kind"] == "precomputed" and layout["samples"] == 128
    from safetensors.torch import load_file

    empty = load_file(str(precomputed_square / "empty_prompt.safetensors"))
    ref = frozen.text.empty(max_tokens=512, masked=True)
    torch.testing.assert_close(empty["t5"], ref.t5[0, : int(ref.mask.sum())], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_storage_dtypes_round_trip(dtype):
    x = torch.randn(3, 5) * 7
    stored = to_store(x, dtype)
    back = _tensor(stored, dtype)
    expected = x.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).float()
    assert torch.equal(back, expected)
    assert stored.dtype == {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[dtype]


def test_bucketed_precompute_resumes_and_trains_one_bucket_per_batch(tiny_model_dir, tmp_path):
    from test_buckets import make_aspect_mds

    raw, sizes = make_aspect_mds(tmp_path, n=32)
    n_shards = len(json.loads((raw / "index.json").read_text())["shards"])
    assert n_shards >= 3
    spec = BucketSpec(resolution=64)
    table = spec.table()
    out = tmp_path / "pre"
    opts = PrecomputeOptions(dtype="bf16", latents="mean", batch_size=5, max_text_tokens=64)
    first = precompute(tiny_model_dir, raw, out, spec=spec, opts=opts, shard_index=0, num_shards=2,
                       progress_bar=False)
    assert not first["finalized"] and not (out / "buckets.json").exists()
    done = sorted((out / "parts").glob("part_*/report.json"))
    assert len(done) == (n_shards + 1) // 2
    stamps = {p: p.stat().st_mtime_ns for p in done}
    # Slice 1 was killed half-way: a part directory without its report, and half-written shards.
    (out / "parts" / "part_00001").mkdir()
    (out / "b001" / "part_00001").mkdir(parents=True)
    (out / "b001" / "part_00001" / "shard.00000.mds").write_bytes(b"garbage")
    second = precompute(tiny_model_dir, raw, out, spec=spec, opts=opts, shard_index=1, num_shards=2,
                        progress_bar=False)
    assert second["finalized"]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in done)  # slice 0's parts were not redone
    again = precompute(tiny_model_dir, raw, out, spec=spec, opts=opts, progress_bar=False)  # all done: no work
    assert again["finalized"] and again["samples"] == 32

    layout = json.loads((out / "buckets.json").read_text())
    expected = [0] * len(table)
    for w, h in sizes.values():
        expected[assign_bucket(w, h, table)] += 1
    assert [b["samples"] for b in layout["buckets"]] == expected
    assert layout["precompute"]["dtype"] == "bf16" and layout["precompute"]["latents"] == "mean"

    with pytest.raises(ValueError, match="data.buckets: false, but .* 3 aspect buckets"):
        build_loader(DataConfig(local=str(out), resolution=64), batch_size=2)
    loader = build_loader(DataConfig(local=str(out), resolution=64, buckets=True), batch_size=2)
    shapes = set()
    for batch in loader:
        assert "latent_std" not in batch and batch["t5_mask"].dtype == torch.bool
        assert batch["t5_mask"].sum(1).max() == batch["t5"].shape[1]
        c, h, w = batch["latent_mean"].shape[1:]
        assert (w * 8, h * 8) in table and c == 4
        shapes.add((w * 8, h * 8))
    assert shapes == set(table)

    with pytest.raises(ValueError, match=r"settings \(precompute.dtype differ\)"):
        precompute(tiny_model_dir, raw, out, spec=spec, opts=PrecomputeOptions(dtype="fp16", latents="mean",
                   max_text_tokens=64), progress_bar=False)
    with pytest.raises(ValueError, match="--model: .* is not a directory"):
        precompute(tmp_path / "nope", raw, tmp_path / "o", spec=spec, progress_bar=False)
