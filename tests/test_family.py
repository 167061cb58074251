"""The model-family table (train/family.py): FLUX and Chroma through the same trainer, sampler and export.

On a tiny Chroma pipeline (`dedistill tiny-model --family chroma`):
- the family is read from transformer/config.json; diffusers' ChromaPipeline loads the dir, and our loader gives its
  weights and its computed buffer (mod_proj) exactly;
- the issue's mask finding, reproduced: changing only masked padding embeddings moves the output with stock
  ChromaPipeline's float mask, and not at all with the same mask as bool; the masked velocity equals the velocity of
  the prompt truncated to its real (plus k visible) tokens;
- LoRA and full fine-tuning train under FSDP2 (world size 1, in process), stopped and resumed bitwise;
- `--format diffusers` of a Chroma run loads in ChromaPipeline; its pipeline.py draws `dedistill sample`'s image
  pixel for pixel, and stock ChromaPipeline's distance from it is measured.
"""

import json
import os
import signal
import sys

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
    """Issue 12 part 5: ChromaPipeline builds its mask in the embeddings' float dtype; the blocks multiply it into
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


@pytest.fixture(scope="module")
def lora_run(chroma_dir, tiny_data_dir, tmp_path_factory):
    """A straight 4-step Chroma LoRA run (lr high enough that the export differs visibly from the base)."""
    run = tmp_path_factory.mktemp("chroma_lora") / "run"
    tiny_runs.train_in_process(_cfg(chroma_dir, tiny_data_dir, run, "lora", **{"optim.lr": 0.02}))
    return run


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


@pytest.mark.slow
def test_chroma_trains_under_torchrun_with_two_ranks(chroma_dir, tiny_data_dir, tmp_path):
    """The same job with 2 gloo ranks under torchrun: the blocks are sharded, and it checkpoints and finishes."""
    over = [f"{k}={v}" for k, v in {
        "model.path": chroma_dir, "data.local": tiny_data_dir, "run_dir": tmp_path / "run", "train.max_steps": 2,
        "model.adapter.kind": "lora", "train.progress_bar": "false", "sample.at_end": "false",
        "checkpoint.every_steps": 2, "objective.visible_padding_tokens": 1}.items()]
    tiny_runs.run(tiny_runs.torchrun_cmd(tiny_runs.CONFIG, *over))
    state = tiny_runs.trainable_state(tiny_runs.ckpt(tmp_path / "run", 2))
    assert any("lora_A" in k for k in state)


# --- export ------------------------------------------------------------------------------------------------------

SETTINGS = dict(steps=4, cfg=3.0, skip=1, res=64, seed=5, tokens=64)
NEG = "blurry noisy"

_PIPELINE_SCRIPT = r"""
import json, sys
for name in ("train", "tools", "evals", "launch", "dataset_tools"):  # users do not have dedistill installed
    sys.modules[name] = None
import numpy as np, torch
from diffusers import ChromaPipeline, DiffusionPipeline

out, args = sys.argv[1], json.loads(sys.argv[2])
s = args["settings"]
pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True, torch_dtype=torch.float32)
assert type(pipe).__name__ == "DedistillChromaPipeline", type(pipe)
stock = ChromaPipeline.from_pretrained(out, torch_dtype=torch.float32)
for i, prompt in enumerate(args["prompts"]):
    for tokens in (s["tokens"], 2 * s["tokens"]):
        img = pipe(prompt, negative_prompt=args["neg"], true_cfg_scale=s["cfg"], num_inference_steps=s["steps"],
                   height=s["res"], width=s["res"], cfg_skip_steps=s["skip"], max_sequence_length=tokens,
                   generator=torch.Generator().manual_seed(s["seed"]), output_type="np").images[0]
        np.save(f"{args['dir']}/custom_{i}_{tokens}.npy", img)
    # stock: same noise, same schedule, CFG from the first step (it has no cfg_skip_steps)
    for name, pipeline in (("stock", stock), ("custom_noskip", pipe)):
        kw = {"guidance_scale": s["cfg"]} if name == "stock" else {"true_cfg_scale": s["cfg"]}
        img = pipeline(prompt, negative_prompt=args["neg"], num_inference_steps=s["steps"], height=s["res"],
                       width=s["res"], max_sequence_length=s["tokens"], output_type="np",
                       generator=torch.Generator().manual_seed(s["seed"]), **kw).images[0]
        img = img if img.dtype == np.uint8 else (img * 255).round().astype(np.uint8)
        np.save(f"{args['dir']}/{name}_{i}.npy", img)
"""


@pytest.fixture(scope="module")
def export(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("chroma_export") / "export"
    tiny_runs.run([sys.executable, "-m", "launch", "export", "--checkpoint", str(lora_run), "--out", str(out),
                   "--format", "diffusers", "--dtype", "fp32"])
    return out


@pytest.fixture(scope="module")
def images(export, tmp_path_factory):
    """ours_<i> (dedistill sample on the export), custom_<i>_<tokens> (its pipeline.py), stock_<i> (ChromaPipeline)."""
    return tiny_runs.pipeline_and_sample_images(export, _PIPELINE_SCRIPT, SETTINGS, PROMPTS, NEG,
                                                tmp_path_factory.mktemp("chroma_images"))


@pytest.mark.slow
def test_chroma_export_is_a_chroma_pipeline_dir(export, lora_run):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(str(export))
    assert type(pipe.transformer).__name__ == "ChromaTransformer2DModel"
    assert not (export / "text_encoder_2").exists()
    meta = json.loads((export / "dedistill_export.json").read_text())
    assert meta["objective"] == {"attention_mask": True, "visible_padding_tokens": 1}
    src = (export / "pipeline.py").read_text()
    assert "class DedistillChromaPipeline(ChromaPipeline)" in src and "\nVISIBLE_PADDING_TOKENS = 1\n" in src
    card = (export / "README.md").read_text()
    assert "ChromaTransformer2DModel" in card and "Stock `ChromaPipeline` builds the mask as float" in card
    with pytest.raises(ValueError, match="--format: bfl is not available for a chroma model"):
        from launch.export import export_checkpoint

        export_checkpoint(lora_run, export.parent / "bfl", fmt="bfl")


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1], ids=["short", "long"])
def test_chroma_pipeline_py_equals_dedistill_sample(images, i):
    ours = images[f"ours_{i}"]
    assert ours.shape == (64, 64, 3) and ours.std() > 0
    custom = images[f"custom_{i}_{SETTINGS['tokens']}"]
    assert np.array_equal(custom, ours), np.abs(custom.astype(int) - ours).max()
    assert np.array_equal(images[f"custom_{i}_{2 * SETTINGS['tokens']}"], ours)  # independent of max tokens


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1], ids=["short", "long"])
def test_stock_chroma_pipeline_distance_is_measured(images, i):
    """Stock ChromaPipeline on the same export, noise and schedule (CFG on every step): its float mask lets every pad
    in, so its image differs from the masked one; recorded in docs/recipes.md."""
    ours, stock = images[f"custom_noskip_{i}"].astype(float), images[f"stock_{i}"].astype(float)
    diff = np.abs(ours - stock)
    print(f"\nstock ChromaPipeline vs masked ({'short' if i == 0 else 'long'} prompt): mean |diff| {diff.mean():.2f}, "
          f"max {diff.max():.0f} of 255")
    assert diff.max() > 0


@pytest.mark.slow
@torch.no_grad()
def test_chroma_lora_export_loads_in_chroma_pipeline(chroma_dir, lora_run, export, tmp_path):
    """`--format lora` of a Chroma run: diffusers' ChromaPipeline.load_lora_weights applies it at the trained scale;
    fused, its transformer equals the merged `--format diffusers` export's."""
    from diffusers import ChromaPipeline

    from launch.export import export_checkpoint

    out = export_checkpoint(lora_run, tmp_path / "lora", fmt="lora", dtype="fp32")
    pipe = ChromaPipeline.from_pretrained(str(chroma_dir))
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, merged = pipe.transformer.state_dict(), ChromaPipeline.from_pretrained(str(export)).transformer.state_dict()
    assert fused.keys() == merged.keys()
    assert max((fused[k] - merged[k]).abs().max().item() for k in merged) < 1e-5
    base = ChromaPipeline.from_pretrained(str(chroma_dir)).transformer.state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in merged)  # the LoRA did change the weights
