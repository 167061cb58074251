"""`--format diffusers` samples outside dedistill as it was trained.

On a trained tiny LoKr run (one process, 8 steps):
- the export's `pipeline.py`, loaded by diffusers' own `DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR)`
  offline in a process where dedistill's packages cannot be imported, draws `dedistill sample --model DIR`'s image
  pixel for pixel (masked, real CFG with a negative prompt and cfg_skip_steps), for a short and a long prompt;
- stock `FluxPipeline` on the same export draws a different image (it passes no mask): the gap is measured;
- the export carries the run's sampling schedule (FLUX.1-dev's dynamic shift; the tiny base is schnell's, no shift)
  and a README.md model card.
"""

import ast
import json
import sys

import numpy as np
import pytest

import tiny_runs

pytestmark = pytest.mark.slow

SHORT = "a red circle"
LONG = ("a large green triangle at the bottom right on a white background next to a small blue square at the top "
        "left, with a yellow circle in the middle and a dark outline around every shape")
NEG = "blurry noisy"
SETTINGS = dict(steps=4, cfg=3.0, skip=1, res=64, seed=5, tokens=64)

_PIPELINE_SCRIPT = r"""
import json, sys
# Users do not have dedistill installed: make its packages unimportable before anything loads.
for name in ("train", "tools", "evals", "launch", "dataset_tools"):
    sys.modules[name] = None
import numpy as np, torch
from diffusers import DiffusionPipeline, FluxPipeline

out, args = sys.argv[1], json.loads(sys.argv[2])
s = args["settings"]
pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True, torch_dtype=torch.float32)
assert type(pipe).__name__ == "DedistillFluxPipeline", type(pipe)
result = {}
for i, prompt in enumerate(args["prompts"]):
    for tokens in (s["tokens"], 2 * s["tokens"]):
        img = pipe(prompt, negative_prompt=args["neg"], true_cfg_scale=s["cfg"], num_inference_steps=s["steps"],
                   height=s["res"], width=s["res"], cfg_skip_steps=s["skip"], max_sequence_length=tokens,
                   generator=torch.Generator().manual_seed(s["seed"])).images[0]
        np.save(f"{args['dir']}/custom_{i}_{tokens}.npy", np.asarray(img))
stock = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32)
for i, prompt in enumerate(args["prompts"]):
    img = stock(prompt, negative_prompt=args["neg"], true_cfg_scale=s["cfg"], num_inference_steps=s["steps"],
                height=s["res"], width=s["res"], max_sequence_length=s["tokens"],
                generator=torch.Generator().manual_seed(s["seed"])).images[0]
    np.save(f"{args['dir']}/stock_{i}.npy", np.asarray(img.convert("RGB")))
"""


@pytest.fixture(scope="module")
def export(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """(trained run dir, its --format diffusers export in fp32)."""
    base = tmp_path_factory.mktemp("export_pipeline")
    run_dir, out = base / "run", base / "export"
    tiny_runs.cli("train", tiny_runs.CONFIG, *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir, steps=8,
                                                                 **{"optim.lr": 0.01, "ema.decay": 0.0}))
    tiny_runs.cli("export", "--checkpoint", run_dir, "--out", out, "--format", "diffusers", "--dtype", "fp32")
    return run_dir, out


@pytest.fixture(scope="module")
def images(export, tmp_path_factory):
    """{name: uint8 image}: ours_<i> (dedistill sample), custom_<i>_<tokens> (pipeline.py), stock_<i> (FluxPipeline)."""
    _, out = export
    return tiny_runs.pipeline_and_sample_images(out, _PIPELINE_SCRIPT, SETTINGS, [SHORT, LONG], NEG,
                                                tmp_path_factory.mktemp("images"))


def test_long_prompt_is_long_and_short_is_short(tiny_model_dir):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(tiny_model_dir / "tokenizer_2"))
    n_short, n_long = (len(tok(p).input_ids) for p in (SHORT, LONG))
    assert n_short < 8 and 30 < n_long <= SETTINGS["tokens"]


@pytest.mark.parametrize("i", [0, 1], ids=["short", "long"])
def test_custom_pipeline_equals_dedistill_sample(images, i):
    ours = images[f"ours_{i}"]
    assert ours.shape == (64, 64, 3) and ours.std() > 0
    custom = images[f"custom_{i}_{SETTINGS['tokens']}"]
    assert custom.dtype == np.uint8 and np.array_equal(custom, ours), np.abs(custom.astype(int) - ours).max()
    # and, masked, the image does not depend on max_sequence_length (the text is trimmed to the prompt)
    assert np.array_equal(images[f"custom_{i}_{2 * SETTINGS['tokens']}"], ours)


@pytest.mark.parametrize("i", [0, 1], ids=["short", "long"])
def test_stock_flux_pipeline_samples_a_different_image(images, i):
    ours, stock = images[f"ours_{i}"].astype(float), images[f"stock_{i}"].astype(float)
    diff = np.abs(ours - stock)
    psnr = 10 * np.log10(255.0**2 / np.mean((ours - stock) ** 2))
    print(f"\nstock FluxPipeline vs masked ({'short' if i == 0 else 'long'} prompt): mean |diff| {diff.mean():.2f}, "
          f"max {diff.max():.0f}, PSNR {psnr:.1f} dB")
    assert diff.mean() > 1.0, "stock FluxPipeline should not match the masked image"


def test_export_carries_the_schedule_card_and_pipeline(export, tiny_model_dir):
    from diffusers import FluxPipeline

    from launch.export_card import TEMPLATE
    from train.inference import model_schedule
    from train.objective import DEV_SCHEDULE, SCHNELL_SCHEDULE

    run_dir, out = export
    assert model_schedule(tiny_model_dir) == SCHNELL_SCHEDULE  # the base (schnell-like) samples unshifted ...
    assert model_schedule(out) == DEV_SCHEDULE  # ... the de-distilled export with dev's dynamic shift
    sched = FluxPipeline.from_pretrained(str(out)).scheduler.config
    assert sched.use_dynamic_shifting is True and sched.base_shift == 0.5 and sched.max_shift == 1.15
    meta = json.loads((out / "dedistill_export.json").read_text())
    assert meta["step"] == 8 and meta["schedule"]["use_dynamic_shifting"] is True

    card = (out / "README.md").read_text()
    for needle in (str(tiny_model_dir), "step 8", "LoKr, factor 2", "Beta(2, 1.6)", "caption dropout", "0.1",
                   "T5 padding mask | on", "max_text_tokens | 64", "training steps | 8", "dynamic shift",
                   "custom_pipeline=export", "true_cfg_scale=", "dedistill sample --model"):
        assert needle in card, needle

    src = (out / "pipeline.py").read_text()
    assert "\nATTENTION_MASK = True\n" in src and "\nMAX_TEXT_TOKENS = 64\n" in src
    # self-contained: nothing but the standard library, torch, numpy, PIL and diffusers (users have no dedistill)
    imported = set()
    for node in ast.walk(ast.parse(TEMPLATE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported - sys.stdlib_module_names <= {"numpy", "torch", "diffusers", "PIL"}, imported


def test_pipeline_encodes_visible_padding_as_training_does(tiny_model_dir, tmp_path):
    """A Chroma-style run (objective.visible_padding_tokens=1): the exported pipeline.py's text encoding equals the
    trainer's TextEncoder's (states and mask), so the export keeps its one visible pad."""
    import importlib.util

    import torch

    from launch.export_card import pipeline_source
    from train.config import load_config
    from train.text import TextEncoder

    cfg = load_config(tiny_runs.CONFIG, [f"model.path={tiny_model_dir}", "objective.visible_padding_tokens=1"])
    (tmp_path / "pipeline.py").write_text(pipeline_source(cfg))
    spec = importlib.util.spec_from_file_location("exported_pipeline", tmp_path / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.VISIBLE_PADDING_TOKENS == 1
    pipe = mod.DedistillFluxPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    ours = TextEncoder(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")).encode(
        [SHORT, LONG], max_tokens=64, visible_padding=1)
    t5, mask, pooled = pipe.encode_masked([SHORT, LONG], max_tokens=64, masked=True, device=torch.device("cpu"))
    assert torch.equal(mask, ours.mask)
    assert mask[0].sum() == pipe.tokenizer_2([SHORT], return_tensors="pt").attention_mask.sum() + 1
    assert torch.equal(t5, ours.t5) and torch.equal(pooled, ours.pooled)
