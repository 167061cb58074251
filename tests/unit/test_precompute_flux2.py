# tier: unit
"""`dedistill data precompute` for FLUX.2 (the tiny [dev]-shaped model): the latents are the 32-channel VAE's posterior
normalised by its BatchNorm statistics, the text the stacked hidden layers of the chat-wrapped prompt, unpadded, and
no pooled vector; the loss on the precomputed shards equals the raw shards' within float rounding (the std is
stored already scaled, and the text model runs at the batch's longest prompt instead of max_text_tokens)."""

import pytest
import torch

from dataset_tools.buckets import BucketSpec
from dataset_tools.precompute import PrecomputeOptions, precompute
from train.config import DataConfig, ObjectiveConfig
from train.data import Collate, build_dataset, build_loader

TOKENS = 128  # the tiny [dev]'s chat wrapping (FLUX.2's system message) takes about 60


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("flux2") / "model", family="flux2")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from dataset_tools.tiny_data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("data") / "data", n=8, size=64, seed=0)


@pytest.fixture(scope="module")
def frozen(flux2_dir):
    from train.model import load_transformer, load_vae
    from train.step import Encoders
    from train.text import TextEncoder

    cpu = torch.device("cpu")
    enc = Encoders(vae=load_vae(flux2_dir, dtype=torch.float32, device=cpu),
                   text=TextEncoder(flux2_dir, dtype=torch.float32, device=cpu), dtype=torch.float32, device=cpu)
    return enc, load_transformer(flux2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def precomputed(flux2_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "flux2"
    precompute(flux2_dir, small_data, out, spec=BucketSpec(resolution=64, square=True),
               opts=PrecomputeOptions(dtype="fp32", batch_size=4, max_text_tokens=TOKENS), progress_bar=False)
    return out


def _pairs(precomputed, small_data):
    """(precomputed batch, raw batch) of the same four samples."""
    from streaming import StreamingDataset

    raw = build_dataset(DataConfig(local=str(small_data), resolution=64, shuffle=False), batch_size=4)
    loader = build_loader(DataConfig(local=str(precomputed), resolution=64, shuffle=False), batch_size=4)
    pre = loader.dataset
    by_key = {StreamingDataset.__getitem__(raw, i)["key"]: i for i in range(raw.num_samples)}
    keys = [StreamingDataset.__getitem__(pre, i)["key"] for i in range(4)]
    return loader.collate_fn([pre[i] for i in range(4)]), Collate()([raw[by_key[k]] for k in keys])


def test_stored_columns_are_flux2s(precomputed, small_data, frozen):
    enc, _ = frozen
    pre_batch, raw_batch = _pairs(precomputed, small_data)
    assert pre_batch["latent_mean"].shape[1] == 32 and pre_batch["pooled"].shape == (4, 0)
    assert pre_batch["t5"].shape[2] == 3 * 16  # three stacked layers of the 16-wide text model
    ours = enc.text.encode(raw_batch["caption"], max_tokens=TOKENS)
    lengths = pre_batch["t5_mask"].sum(1).tolist()
    assert lengths == list(ours.lengths) and len(set(lengths)) > 1
    for i, n in enumerate(lengths):
        torch.testing.assert_close(pre_batch["t5"][i, :n], ours.t5[i, :n], rtol=1e-5, atol=1e-6)
    # the mean is the BatchNorm-normalised posterior mean the raw path would draw around
    from train.flux import normalise_latents

    dist = enc.vae.encode(raw_batch["pixels"]).latent_dist
    torch.testing.assert_close(pre_batch["latent_mean"], normalise_latents(enc.vae, dist.mean), rtol=1e-5, atol=1e-5)


def test_precomputed_loss_equals_raw_loss(precomputed, small_data, frozen):
    from train.step import forward_backward_step

    enc, transformer = frozen
    pre_batch, raw_batch = _pairs(precomputed, small_data)
    assert pre_batch["caption"] == raw_batch["caption"]
    losses = []
    for dropout in (0.0, 1.0):
        cfg = ObjectiveConfig(caption_dropout=dropout, max_text_tokens=TOKENS)
        a = forward_backward_step(transformer, raw_batch, enc, cfg, generator=torch.Generator().manual_seed(7),
                                  backward=False)
        b = forward_backward_step(transformer, pre_batch, enc, cfg, generator=torch.Generator().manual_seed(7),
                                  backward=False)
        assert a["text_tokens"] == b["text_tokens"]
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
        losses.append(a["loss"].item())
    assert losses[0] != losses[1]  # the text reaches the loss: the comparison is not vacuous
