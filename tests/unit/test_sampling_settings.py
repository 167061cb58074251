# tier: unit
"""One sampling-settings type (train/sampling.py): every knob reaches the sampler from each entry point — a run's
`sample:` config (the end-of-run grid and the export's model card), an eval suite's `sampling:` and the
`dedistill sample` flags. Each entry point is given a value other than the default for every knob, and what the
sampler receives is compared with it field by field."""

from __future__ import annotations

import dataclasses
import types

import pytest
from PIL import Image

import evals.sampler
import train.inference
from evals.suite import SamplingConfig
from launch.cli import main
from launch.export_card import model_card
from train.config import load_config
from train.objective import SamplingSchedule
from train.sampling import MODEL_KNOBS, USER_KNOBS, SamplingSettings, run_sampling_settings
from tiny_runs import CONFIG

SCHEDULE = SamplingSchedule(dynamic=False, shift=2.5)
# a value other than the default for every knob; cfg_scale is the one each entry point's grid chooses
USER = dict(steps=7, cfg_scale=4.5, negative_prompt="blurry", resolution=48, seed=11, noise_temperature=0.5,
            cfg_skip_steps=2, cfg_rescale=0.7, batch_size=3, max_text_tokens=40)
MODEL = dict(masked=True, visible_padding_tokens=1, schedule=SCHEDULE)


def expected() -> SamplingSettings:
    return SamplingSettings(**USER, **MODEL)


def test_every_field_is_a_user_or_a_model_knob_and_the_values_are_not_defaults():
    names = [f.name for f in dataclasses.fields(SamplingSettings)]
    assert sorted(names) == sorted(USER_KNOBS + MODEL_KNOBS)
    assert sorted(USER) == sorted(USER_KNOBS) and sorted(MODEL) == sorted(MODEL_KNOBS)
    default = SamplingSettings()
    # `masked` keeps its default: visible padding tokens need the mask on (the model knobs come from the run anyway)
    same = [n for n in names if getattr(expected(), n) == getattr(default, n)]
    assert same == ["masked"], same


@pytest.fixture
def spy(monkeypatch):
    """Replaces the sampler: records the settings of every call and returns blank images."""
    calls: list[SamplingSettings] = []

    def generate(transformer, vae, text, prompts, s, *, dtype):
        calls.append(s)
        return [Image.new("RGB", (s.resolution, s.resolution)) for _ in prompts]

    monkeypatch.setattr(evals.sampler, "generate", generate)
    return calls


def run_config(tmp_path):
    # the schedule names the model's family (FLUX.2 keeps its own mu): a model dir with its transformer config
    (tmp_path / "model" / "transformer").mkdir(parents=True, exist_ok=True)
    (tmp_path / "model" / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    return load_config(CONFIG, [f"model.path={tmp_path / 'model'}",
        f"run_dir={tmp_path / 'run'}", "sample.steps=7", "sample.negative_prompt=blurry", "sample.resolution=48",
        "sample.seed=11", "sample.noise_temperature=0.5", "sample.cfg_skip_steps=2", "sample.cfg_rescale=0.7",
        "sample.batch_size=3", "sample.cfg_scales=[4.5]", "sample.schedule=constant", "sample.shift=2.5",
        "objective.max_text_tokens=40", "objective.attention_mask=true", "objective.visible_padding_tokens=1",
    ])


def test_run_config_reaches_the_end_of_run_grid(tmp_path, spy):
    cfg = run_config(tmp_path)

    class Transformer:
        training = True

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

    frozen = types.SimpleNamespace(vae=None, text=None, dtype=None)
    evals.sampler.sample_grid_for_run(Transformer(), frozen, cfg, step=1, logger=None, is_main=False)
    assert spy == [expected()]


def test_run_config_reaches_the_export_card(tmp_path):
    cfg = run_config(tmp_path)  # the card names the family from the model dir
    assert run_sampling_settings(cfg, schedule=SCHEDULE) == expected()
    card = model_card(cfg, checkpoint=tmp_path / "ckpt", step=1, ema=False, dtype="fp32", schedule=SCHEDULE)
    for needle in ('negative_prompt="blurry"', "true_cfg_scale=4.5", "num_inference_steps=7", "height=48",
                   "cfg_skip_steps=2", "cfg_rescale=0.7", "noise_temperature=0.5", "manual_seed(11)",
                   "--cfg 4.5 --steps 7 --resolution 48 --seed 11", "--cfg-skip-steps 2 --cfg-rescale 0.7 "
                   "--noise-temperature 0.5"):
        assert needle in card, needle


def test_eval_suite_sampling_reaches_the_sampler():
    sc = SamplingConfig(steps=[7], cfg_scales=[4.5], negative_prompt="blurry", resolution=48, seed=11,
                        noise_temperature=0.5, cfg_skip_steps=2, cfg_rescale=0.7, batch_size=3, max_text_tokens=40)
    # what evals.suite.run_suite passes per (steps, cfg) setting; the run decides the model knobs
    got = SamplingSettings.from_source(sc, steps=7, cfg_scale=4.5, max_text_tokens=sc.max_text_tokens, **MODEL)
    assert got == expected()


def test_cli_flags_reach_the_sampler(tmp_path, monkeypatch, spy):
    loaded = types.SimpleNamespace(transformer=None, vae=None, text=None, dtype=None, schedule=SCHEDULE, config=None)
    monkeypatch.setattr(train.inference, "load_for_inference", lambda *a, **k: loaded)
    monkeypatch.setattr(train.inference, "text_settings", lambda *a, **k: (True, 1))
    main(["sample", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "s.png"),
          "--steps", "7", "--cfg", "4.5", "--negative-prompt", "blurry", "--resolution", "48", "--seed", "11",
          "--noise-temperature", "0.5", "--cfg-skip-steps", "2", "--cfg-rescale", "0.7", "--max-text-tokens", "40"])
    # one prompt per call: the CLI has no batch size, so that knob keeps its default
    assert spy == [dataclasses.replace(expected(), batch_size=SamplingSettings().batch_size)]


def test_image_knobs_are_defined_once():
    """The knobs every entry point shares are one definition (`train.config.ImageKnobs`), with its checks: the run's
    `sample:`, the suite's `sampling:` and the sampler's settings inherit them, and none redeclares one."""
    from train.config import ImageKnobs, SampleConfig

    shared = {f.name for f in dataclasses.fields(ImageKnobs)}
    assert shared <= set(USER_KNOBS)
    for cls, section in ((SampleConfig, "sample."), (SamplingConfig, "sampling."), (SamplingSettings, "")):
        assert issubclass(cls, ImageKnobs)
        # a redeclared field (annotated) or a bare class attribute shadowing a knob's default
        own = set(cls.__dict__.get("__annotations__", {})) | set(vars(cls))
        assert not own & shared, (cls.__name__, own & shared)
        with pytest.raises(ValueError, match=rf"^{section.replace('.', '[.]')}cfg_rescale: must be in \[0, 1\]"):
            cls(cfg_rescale=1.5)
        with pytest.raises(ValueError, match=rf"^{section.replace('.', '[.]')}resolution: must be a multiple of 16"):
            cls(resolution=50)
