# tier: integration
"""`--format diffusers` of a tiny FLUX.2 [dev] and [klein] LoRA run (2 steps, in process):

- the export's `pipeline.py`, loaded by diffusers' own `DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR)`
  offline in a process where dedistill's packages cannot be imported, draws `dedistill sample --model DIR`'s image
  pixel for pixel: masked, real CFG with a negative prompt and cfg_skip_steps, for a short and a long prompt, and
  (masked) whatever `max_sequence_length`;
- the stock pipeline (Flux2Pipeline / Flux2KleinPipeline) loads the export dir; a bypassed [dev] exports its
  transformer without the guidance embedder (`guidance_embeds` false);
- the export carries the FLUX.2 schedule (dynamic, empirical mu) and the family's constants in `pipeline.py`.
"""

import json

import numpy as np
import pytest

import tiny_runs
from test_flux2_train import _cfg, model_dir  # noqa: F401  (model_dir: the tiny [dev] / [klein] pipeline fixture)

SHORT = "a red circle"
LONG = ("a large green triangle at the bottom right on a white background next to a small blue square at the top "
        "left, with a yellow circle in the middle")
NEG = "blurry noisy"
SETTINGS = dict(steps=3, cfg=3.0, skip=1, res=64, seed=5, tokens=96)  # [dev]'s system message needs ~60 tokens

_PIPELINE_SCRIPT = r"""
import json, sys
# Users do not have dedistill installed: make its packages unimportable before anything loads.
for name in ("train", "tools", "evals", "launch", "dataset_tools"):
    sys.modules[name] = None
import numpy as np, torch
import diffusers
from diffusers import DiffusionPipeline

out, args = sys.argv[1], json.loads(sys.argv[2])
s = args["settings"]
pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=out, trust_remote_code=True, torch_dtype=torch.float32)
assert type(pipe).__name__ == "DedistillFlux2Pipeline", type(pipe)
for i, prompt in enumerate(args["prompts"]):
    for tokens in (s["tokens"], 2 * s["tokens"]):
        img = pipe(prompt, negative_prompt=args["neg"], true_cfg_scale=s["cfg"], num_inference_steps=s["steps"],
                   height=s["res"], width=s["res"], cfg_skip_steps=s["skip"], max_sequence_length=tokens,
                   generator=torch.Generator().manual_seed(s["seed"])).images[0]
        np.save(f"{args['dir']}/custom_{i}_{tokens}.npy", np.asarray(img))
index = json.load(open(f"{out}/model_index.json"))
stock = getattr(diffusers, index["_class_name"]).from_pretrained(out, torch_dtype=torch.float32)
np.save(f"{args['dir']}/stock_guidance_embeds.npy", np.array(bool(stock.transformer.config.guidance_embeds)))
"""


@pytest.fixture(scope="module")
def export(model_dir, tiny_data_dir, tmp_path_factory):  # noqa: F811
    """(run dir, its --format diffusers export in fp32) of a 2-step LoRA run."""
    from launch.export import export_checkpoint

    base = tmp_path_factory.mktemp("flux2_export")
    run = base / "run"
    tiny_runs.train_in_process(_cfg(model_dir, tiny_data_dir, run, "lora",
                                    **{"optim.lr": 0.02, "train.max_steps": 2, "ema.decay": 0.0}))
    return run, export_checkpoint(run, base / "export", fmt="diffusers", dtype="fp32")


@pytest.fixture(scope="module")
def images(export, tmp_path_factory):
    """{name: uint8 image}: ours_<i> (dedistill sample), custom_<i>_<tokens> (pipeline.py)."""
    _, out = export
    return tiny_runs.pipeline_and_sample_images(out, _PIPELINE_SCRIPT, SETTINGS, [SHORT, LONG], NEG,
                                                tmp_path_factory.mktemp("images"))


def test_pipeline_py_equals_dedistill_sample(images):
    for i in (0, 1):
        ours = images[f"ours_{i}"]
        assert ours.shape == (64, 64, 3) and ours.std() > 0
        custom = images[f"custom_{i}_{SETTINGS['tokens']}"]
        assert custom.dtype == np.uint8 and np.array_equal(custom, ours), np.abs(custom.astype(int) - ours).max()
        # masked, the image does not depend on max_sequence_length (the text is trimmed to the prompts)
        assert np.array_equal(images[f"custom_{i}_{2 * SETTINGS['tokens']}"], ours)
    assert not np.array_equal(images["ours_0"], images["ours_1"])  # the prompt reaches the image


def test_stock_pipeline_loads_the_export(export, images, model_dir):  # noqa: F811
    run, out = export
    dev = "klein" not in str(model_dir)
    # a bypassed [dev] (model.guidance default) exports no guidance embedder; [klein] never had one
    assert bool(images["stock_guidance_embeds"]) is False
    assert json.loads((out / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    src = (out / "pipeline.py").read_text()
    stock = "Flux2Pipeline" if dev else "Flux2KleinPipeline"
    assert f"\nSTOCK_PIPELINE = '{stock}'\n" in src and "\nMAX_TEXT_TOKENS = 96\n" in src
    assert f"\nTEXT_LAYERS = {(10, 20, 30) if dev else (9, 18, 27)}\n" in src
    meta = json.loads((out / "dedistill_export.json").read_text())
    assert meta["format"] == "diffusers" and meta["schedule"]["use_dynamic_shifting"] is True
    assert "compute_empirical_mu" in meta["schedule"]["describe"]
