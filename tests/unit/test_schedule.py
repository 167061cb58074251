"""The sampling schedule follows the model, as diffusers does (train.objective.SamplingSchedule).

`dedistill tiny-model` writes FLUX.1-schnell's scheduler config (no shift, no dynamic shifting). On that pipeline, and
on a copy whose scheduler config is FLUX.1-dev's (dynamic shifting), `dedistill sample --no-mask` draws the same
image as diffusers' own `FluxPipeline`, pixel for pixel without CFG; with true CFG a rare pixel may differ by one level
(cond+uncond batched vs two forwards). A run records the schedule its
model samples with (`sample.schedule`, dynamic by default) and `dedistill sample` on its checkpoints follows that.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main as cli
from train.objective import DEV_SCHEDULE, SCHNELL_SCHEDULE, SamplingSchedule

PROMPT = "a small blue square at the top left on a yellow background"
NEGATIVE = "blurry noisy"


def test_tiny_model_writes_schnells_scheduler_config(tiny_model_dir):
    from train.inference import model_schedule

    cfg = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert cfg["shift"] == 1.0 and cfg["use_dynamic_shifting"] is False
    assert model_schedule(tiny_model_dir) == SCHNELL_SCHEDULE


@pytest.fixture(scope="module")
def dev_scheduled_dir(tiny_model_dir, tmp_path_factory):
    """The tiny pipeline with FLUX.1-dev's scheduler config instead of schnell's."""
    out = tmp_path_factory.mktemp("devsched") / "model"
    shutil.copytree(tiny_model_dir, out)
    f = out / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **DEV_SCHEDULE.scheduler_config()}))
    return out


def _ours(model, tmp_path, *args) -> np.ndarray:
    out = tmp_path / "ours.png"
    cli(["sample", "--model", str(model), "--prompt", PROMPT, "--steps", "3", "--resolution", "64", "--seed", "5",
         "--max-text-tokens", "64", "--dtype", "fp32", "--out", str(out), *map(str, args)])
    return np.asarray(Image.open(out).convert("RGB"))


def _diffusers(model, cfg: float) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    kwargs = {"negative_prompt": NEGATIVE, "true_cfg_scale": cfg} if cfg != 1.0 else {}
    (img,) = pipe(PROMPT, height=64, width=64, num_inference_steps=3, max_sequence_length=64,
                  generator=torch.Generator().manual_seed(5), **kwargs).images
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("which", ["schnell", "dev"])
def test_sample_no_mask_equals_flux_pipeline(which, cfg, tiny_model_dir, dev_scheduled_dir, tmp_path):
    model = tiny_model_dir if which == "schnell" else dev_scheduled_dir
    args = ["--no-mask", "--cfg", cfg] + (["--negative-prompt", NEGATIVE] if cfg != 1.0 else [])
    ours = _ours(model, tmp_path, *args)
    theirs = _diffusers(model, cfg)
    assert ours.shape == (64, 64, 3) and ours.std() > 0
    diff = np.abs(ours.astype(int) - theirs)
    if cfg == 1.0:
        assert diff.max() == 0, f"max |diff| {diff.max()}"
    else:
        # Our sampler runs cond and uncond as one batch of 2, FluxPipeline as two forwards of 1; CPU GEMMs round a
        # batch of 2 differently (~1e-6 in the latents; run one at a time, our steps equal FluxPipeline's bit for
        # bit), which flips a rare pixel by one level.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max |diff| {diff.max()}, {(diff > 0).mean():.2%} differ"


def test_schedule_override_changes_the_image_and_is_validated(tiny_model_dir, tmp_path):
    as_model = _ours(tiny_model_dir, tmp_path, "--no-mask")
    assert np.array_equal(_ours(tiny_model_dir, tmp_path, "--no-mask", "--schedule", "model"), as_model)
    assert np.array_equal(_ours(tiny_model_dir, tmp_path, "--no-mask", "--schedule", "constant", "--shift", 1.0),
                          as_model)
    assert not np.array_equal(_ours(tiny_model_dir, tmp_path, "--no-mask", "--schedule", "dynamic"), as_model)
    with pytest.raises(SystemExit) as e:
        cli(["sample", "--model", str(tiny_model_dir), "--prompt", "x", "--schedule", "constant", "--out",
             str(tmp_path / "x.png")])
    assert e.value.code == 2 and not (tmp_path / "x.png").exists()


def test_a_runs_schedule_comes_from_its_config(tiny_model_dir):
    from train.config import JobConfig, from_dict
    from train.inference import sampling_schedule

    def run(**sample):
        return from_dict(JobConfig, {"model": {"path": str(tiny_model_dir)}, "sample": sample})

    assert run().sample.schedule == "dynamic"  # a de-distilled model samples like FLUX.1-dev
    assert sampling_schedule(tiny_model_dir, run()) == DEV_SCHEDULE
    assert sampling_schedule(tiny_model_dir, run(schedule="model")) == SCHNELL_SCHEDULE
    assert sampling_schedule(tiny_model_dir, run(schedule="constant", shift=3.0)) == SamplingSchedule(dynamic=False,
                                                                                                      shift=3.0)
    assert sampling_schedule(tiny_model_dir, run(), override="model") == SCHNELL_SCHEDULE
    assert sampling_schedule(tiny_model_dir, None) == SCHNELL_SCHEDULE  # a plain dir: its own config
    with pytest.raises(ValueError, match="sample.schedule"):
        run(schedule="karras")
