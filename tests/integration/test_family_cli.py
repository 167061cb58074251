"""Chroma through the CLI: two gloo ranks train under torchrun; `--format diffusers` of a Chroma run loads in
ChromaPipeline, its pipeline.py draws `dedistill sample`'s image pixel for pixel, stock ChromaPipeline's distance from
it is measured, and the LoRA export loads in ChromaPipeline (the in-process checks: tests/unit/test_family.py)."""

import json

import numpy as np
import pytest
import torch

import tiny_runs
from test_family import PROMPTS, _cfg, chroma_dir  # noqa: F401  (chroma_dir: a module fixture)


@pytest.fixture(scope="module")
def lora_run(chroma_dir, tiny_data_dir, tmp_path_factory):
    """A straight 4-step Chroma LoRA run (lr high enough that the export differs visibly from the base)."""
    run = tmp_path_factory.mktemp("chroma_lora") / "run"
    tiny_runs.train_in_process(_cfg(chroma_dir, tiny_data_dir, run, "lora", **{"optim.lr": 0.02}))
    return run

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
                   generator=torch.Generator().manual_seed(s["seed"])).images[0]
        np.save(f"{args['dir']}/custom_{i}_{tokens}.npy", np.asarray(img))
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
    tiny_runs.cli("export", "--checkpoint", lora_run, "--out", out, "--format", "diffusers", "--dtype", "fp32")
    return out

@pytest.fixture(scope="module")
def images(export, tmp_path_factory):
    """ours_<i> (dedistill sample on the export), custom_<i>_<tokens> (its pipeline.py), stock_<i> (ChromaPipeline)."""
    return tiny_runs.pipeline_and_sample_images(export, _PIPELINE_SCRIPT, SETTINGS, PROMPTS, NEG,
                                                tmp_path_factory.mktemp("chroma_images"))


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
