"""The model-family table (train/family.py): FLUX and Chroma through the same trainer, sampler and export.

On a tiny Chroma pipeline (`dedistill tiny-model --family chroma`):
- the family is read from transformer/config.json; diffusers' ChromaPipeline loads the dir, and our loader gives its
  weights and its computed buffer (mod_proj) exactly;
- why the mask is bool: changing only masked padding embeddings moves the output with stock
  ChromaPipeline's float mask, and not at all with the same mask as bool; the masked velocity equals the velocity of
  the prompt truncated to its real (plus k visible) tokens;
- LoRA and full fine-tuning train under FSDP2 (world size 1, in process), stopped and resumed bitwise;
- through the CLI (torchrun on two ranks, the export, its pipeline.py and stock ChromaPipeline):
  tests/integration/test_family_cli.py.
"""

import json
import os
import signal

import numpy as np
import pytest
import torch

import tiny_runs
from train.config import load_config

PROMPTS = ["a red circle", "a large green triangle at the bottom right next to a small blue square at the top left"]


@pytest.fixture(scope="module")
def chroma_dir(tiny_chroma_dir):
    return tiny_chroma_dir


# --- the table ---------------------------------------------------------------------------------------------------


def test_family_is_read_from_the_transformer_class(chroma_dir, tiny_model_dir, tmp_path):
    from train.family import FAMILIES, family_of_dir
    from train.model import check_model_dir

    assert family_of_dir(tiny_model_dir) is FAMILIES["flux"]
    assert family_of_dir(chroma_dir) is FAMILIES["chroma"]
    assert check_model_dir(chroma_dir) == chroma_dir  # no CLIP, no text_encoder_2: a complete Chroma dir
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match=r"model.path: .*'SD3Transformer2DModel' is not one of"):
        check_model_dir(tmp_path)


def test_tiny_chroma_loads_in_chroma_pipeline_and_ours(chroma_dir):
    from diffusers import ChromaPipeline

    from train.model import load_transformer
    from train.text import TextEncoder

    pipe = ChromaPipeline.from_pretrained(str(chroma_dir))
    ours = load_transformer(chroma_dir, dtype=torch.float32)
    theirs = dict(pipe.transformer.named_buffers()) | pipe.transformer.state_dict()
    mine = dict(ours.named_buffers()) | ours.state_dict()
    assert "time_text_embed.mod_proj" in mine and mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    enc = TextEncoder(chroma_dir, dtype=torch.float32, device=torch.device("cpu")).encode(PROMPTS, max_tokens=64)
    assert enc.pooled.shape == (2, 0)  # no CLIP: nothing pooled to condition on


def test_fsdp_blocks_and_adapter_targets_come_from_the_table(chroma_dir):
    from train.adapters import target_module_names
    from train.config import AdapterConfig
    from train.family import FAMILIES
    from train.model import load_transformer
    from train.parallelize import _blocks

    m = load_transformer(chroma_dir, dtype=torch.float32)
    assert [type(b).__name__ for b in _blocks(m)] == ["ChromaTransformerBlock"] * 2 + ["ChromaSingleTransformerBlock"] * 2
    assert set(FAMILIES["chroma"].block_classes) == {type(b).__name__ for b in _blocks(m)}
    names = target_module_names(m, AdapterConfig(kind="lora"))
    assert "transformer_blocks.0.attn.add_q_proj" in names and "single_transformer_blocks.1.proj_mlp" in names
    # Chroma's blocks have no modulation Linears (pruned into the approximator): FLUX's norm1.linear is an error
    with pytest.raises(ValueError, match=r"'norm1.linear' matches no module .* in a chroma transformer"):
        target_module_names(m, AdapterConfig(kind="lora", target_modules=["norm1.linear"]))


# --- the mask ----------------------------------------------------------------------------------------------------


def _tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    from dataset_tools.tiny_model import chroma_transformer_dims

    torch.manual_seed(0)
    return ChromaTransformer2DModel(**chroma_transformer_dims("tiny")).eval()


@torch.no_grad()
def test_float_mask_leaks_padding_and_bool_does_not():
    """ChromaPipeline builds its mask in the embeddings' float dtype; the blocks multiply it into
    (B, 1, S, S) and SDPA adds it to the scores. Changing only the masked padding embeddings then changes the output;
    with the same mask as bool it changes nothing."""
    m = _tiny_chroma()
    g = torch.Generator().manual_seed(1)
    b, length, n = 2, 12, 16
    x, t5 = torch.randn(b, n, 16, generator=g), torch.randn(b, length, 32, generator=g)
    text = torch.zeros(b, length, dtype=torch.bool)
    text[0, :4], text[1, :7] = True, True
    mask = torch.cat([text, torch.ones(b, n, dtype=torch.bool)], 1)  # [text; image], as ChromaPipeline concatenates
    other = t5.clone()
    other[~text] = torch.randn(int((~text).sum()), 32, generator=g)  # only the masked padding embeddings differ

    def run(emb, attention_mask):
        return m(hidden_states=x, encoder_hidden_states=emb, timestep=torch.tensor([0.3, 0.8]),
                 img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(length, 3), attention_mask=attention_mask,
                 return_dict=False)[0]

    float_gap = (run(t5, mask.float()) - run(other, mask.float())).abs().max().item()
    bool_gap = (run(t5, mask) - run(other, mask)).abs().max().item()
    print(f"\nmasked padding changed: max |Δv| {float_gap:.4f} with the float mask, {bool_gap} with bool")
    assert float_gap > 1e-2 and bool_gap == 0.0


@torch.no_grad()
def test_no_fully_masked_query_row_reaches_sdpa_and_outputs_do_not_change(chroma_dir, monkeypatch):
    """Chroma's query-AND-key mask leaves masked text queries nothing to attend to (NaN in some CUDA kernels); the
    family's processor lets those rows attend everywhere, and no output that is read changes, bit for bit."""
    from diffusers import ChromaTransformer2DModel
    from tiny_nets import spy_attention_masks

    from train.flux import image_ids, predict_velocity
    from train.model import load_transformer
    from train.text import TextEncoder

    ours = load_transformer(chroma_dir, dtype=torch.float32)
    stock = ChromaTransformer2DModel.from_pretrained(str(chroma_dir / "transformer"))  # diffusers' own processors
    enc = TextEncoder(chroma_dir, dtype=torch.float32, device=torch.device("cpu")).encode(
        PROMPTS, max_tokens=64, visible_padding=1)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(4))
    t, ids = torch.tensor([0.4, 0.6]), image_ids(8, 8, device="cpu", dtype=torch.float32)
    seen = spy_attention_masks(monkeypatch)
    a = predict_velocity(ours, x, t, enc, ids)
    assert len(seen) == 4 and all(m.dtype == torch.bool and m.any(-1).all() for m in seen)
    seen.clear()
    b = predict_velocity(stock, x, t, enc, ids)
    assert any(not m.any(-1).all() for m in seen)  # stock: the pad query rows are empty
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 1])
@torch.no_grad()
def test_masked_chroma_velocity_equals_truncated_prompt(chroma_dir, k):
    """Reference comparison: predict_velocity on padded, masked prompts (k visible pads) equals each prompt run alone,
    cut to its real tokens plus k, with no mask at all."""
    from train.flux import image_ids, predict_velocity
    from train.model import load_transformer
    from train.text import TextEncoder

    m = load_transformer(chroma_dir, dtype=torch.float32)
    enc = TextEncoder(chroma_dir, dtype=torch.float32, device=torch.device("cpu")).encode(
        PROMPTS, max_tokens=64, visible_padding=k)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2))
    t, ids = torch.tensor([0.25, 0.75]), image_ids(8, 8, device="cpu", dtype=torch.float32)
    batch = predict_velocity(m, x, t, enc, ids)
    for i in range(2):
        n = int(enc.mask[i].sum())
        alone = enc.select(torch.tensor([i])).pad_to(n)
        ref = predict_velocity(m, x[i : i + 1], t[i : i + 1], alone, ids, masked=False)
        torch.testing.assert_close(batch[i : i + 1], ref, atol=2e-6, rtol=0)


# --- training ----------------------------------------------------------------------------------------------------


def _cfg(model, data, run, kind, **over):
    items = {
        "model.path": model, "data.local": data, "run_dir": run, "model.adapter.kind": kind, "train.max_steps": 4,
        "train.batch_size": 2, "train.progress_bar": False, "sample.at_end": False, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 10, "train.log_every": 1, "optim.warmup_steps": 1, "ema.decay": 0.5,
        "objective.timestep_sampler": "chroma", "objective.noise_pairing": "ot_cosine",
        "objective.visible_padding_tokens": 1, **over,
    }
    return load_config(tiny_runs.CONFIG, [f"{k}={v}" for k, v in items.items()])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_chroma_run_stopped_and_resumed_is_bitwise(chroma_dir, tiny_data_dir, tmp_path, kind):
    """FSDP2 (world size 1, the torchrun code path): a Chroma run stopped by SIGTERM after step 2 and resumed ends
    with the uninterrupted run's losses, weights, optimizer moments and EMA, bitwise."""
    straight = tiny_runs.train_in_process(_cfg(chroma_dir, tiny_data_dir, tmp_path / "straight", kind))
    assert all(np.isfinite(h["loss"]) for h in straight.history)

    def stop_after_two(step, path):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's StopFlag: finish the step, save, return

    cfg = _cfg(chroma_dir, tiny_data_dir, tmp_path / "resumed", kind)
    first = tiny_runs.train_in_process(cfg, on_checkpoint=stop_after_two)
    assert first.stopped_by_signal and first.step < 4
    second = tiny_runs.train_in_process(cfg)
    assert second.step == 4
    losses = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert losses == [h["loss"] for h in straight.history]
    state = tiny_runs.assert_same_state(tiny_runs.ckpt(tmp_path / "straight", 4), tiny_runs.ckpt(tmp_path / "resumed", 4))
    trained = {k for k in state if k.startswith("model.")}
    if kind == "full":  # the approximator trains with everything else
        assert any("distilled_guidance_layer" in k for k in trained)
    else:
        assert trained and all("lora_" in k for k in trained)


# --- export ------------------------------------------------------------------------------------------------------
