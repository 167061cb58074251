from pathlib import Path

import pytest

import tiny_runs

from train.config import JobConfig, apply_overrides, from_dict, load_config

# Training-job presets; the proof experiment's presets (proof-*.yaml, toy-schnell.yaml) have their own schema and
# are parsed in tests/system/test_proof_smoke.py, eval suites (configs/evals/) in tests/unit/test_eval_suite.py.
PRESETS = tiny_runs.config_files("job")
REQUIRED = [
    "run_dir", "seed", "model.path", "model.adapter.kind", "objective.timestep_sampler", "objective.caption_dropout",
    "objective.max_text_tokens", "objective.attention_mask", "data.remote", "data.local", "train.max_steps",
    "train.batch_size", "optim.lr", "parallel.backend", "checkpoint.every_steps", "checkpoint.keep_last",
    "checkpoint.resume", "eval.every_steps", "eval.mode",
]


def test_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"tiny-cpu.yaml", "lora-1gpu.yaml", "libreflux.yaml", "openflux.yaml", "full-fsdp-multinode.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_parses_and_has_the_contract_keys(path):
    import yaml

    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    raw = yaml.safe_load(path.read_text())
    for key in REQUIRED:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # resolves on the typed config
    assert raw.get("run_dir")


def test_libreflux_preset_is_the_published_recipe():
    cfg = load_config(Path(PRESETS[0]).parent / "libreflux.yaml")
    assert cfg.model.adapter.kind == "lokr" and cfg.model.adapter.lokr_factor == 2
    assert (cfg.objective.timestep_sampler, cfg.objective.beta_alpha, cfg.objective.beta_beta) == ("beta", 2.0, 1.6)
    assert cfg.objective.max_text_tokens == 512 and cfg.objective.attention_mask
    a = cfg.model.adapter  # LyCORIS: full_matrix, linear_alpha 1 and LyCORIS's scale rule (scale 1, not alpha / r)
    assert a.lokr_full_matrix and a.alpha == 1.0 and a.scale_convention == "lycoris"
    # ~1.33 MP images in aspect buckets, lr 1e-5, batch 1 per GPU, ~16k steps (docs/recipes.md)
    assert cfg.data.buckets and cfg.data.resolution == 1152
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.max_steps) == (1e-5, 1, 16000)


def test_overrides_typed():
    cfg = load_config(None, ["train.max_steps=7", "optim.lr=3e-4", "objective.attention_mask=false",
                             "sample.cfg_scales=[1, 2.5]", "data.remote=null", "model.adapter.kind=lora"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.objective.attention_mask is False
    assert cfg.sample.cfg_scales == [1.0, 2.5] and cfg.data.remote is None and cfg.model.adapter.kind == "lora"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("nope=1", "nope"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("objective.timestep_sampler=gauss", "objective.timestep_sampler"),
        ("objective.caption_dropout=1.5", "objective.caption_dropout"),
        ("model.adapter.kind=dora", "model.adapter.kind"),
        ("parallel.backend=ddp", "parallel.backend"),
        ("data.resolution=500", "data.resolution"),
        ("train.max_steps.x=1", "train.max_steps"),
        ("objective.attention_mask=maybe", "objective.attention_mask"),
        ("eval.every_steps=100", "eval.suite"),  # evals configured but no suite: not a silent no-op
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match="train.bogus"):
        load_config(p)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="c.yaml"):
        load_config(p)
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_from_dict_roundtrip():
    import dataclasses

    cfg = JobConfig()
    assert from_dict(JobConfig, dataclasses.asdict(cfg)) == cfg
    assert apply_overrides({}, ["seed=3"]) == {"seed": 3}


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_has_evals_off_or_a_suite_that_works(path, tiny_model_dir, tmp_path):
    """A preset either turns periodic evals off (every_steps 0) or names a suite that parses and, once the one thing
    its comment says to set is set, resolves every path against a real model dir; before that, training stops at
    start with one line naming that key (not a run whose evals silently never happen)."""
    import yaml

    from evals.periodic import check_suite_for_run
    from evals.suite import resolve_suite_path

    cfg = load_config(path, [f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'run'}"])
    raw = yaml.safe_load(path.read_text())
    if cfg.eval.every_steps == 0:
        assert raw["eval"]["every_steps"] == 0  # off explicitly, not by a missing key
        return
    suite_path = resolve_suite_path(cfg.eval.suite)
    if path.name == "tiny-cpu.yaml":  # the tiny suite's paths all live in the tiny model and data
        check_suite_for_run(cfg)
        return
    assert suite_path.name == "prompts.yaml" and "clip.model" in path.read_text()  # the comment names the key
    with pytest.raises(ValueError, match=r"^eval.suite: .*prompts.yaml: clip.model: model dir not found"):
        check_suite_for_run(cfg)
    suite = yaml.safe_load(suite_path.read_text())
    suite["clip"]["model"] = str(tiny_model_dir / "eval" / "clip")  # what a user sets
    suite["prompts"]["file"] = str(suite_path.parent / "prompts" / "showcase.txt")
    mine = tmp_path / "prompts.yaml"
    mine.write_text(yaml.safe_dump(suite))
    cfg = load_config(path, [f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'run'}", f"eval.suite={mine}"])
    assert check_suite_for_run(cfg) == mine.resolve()


def test_run_recorded_before_scale_convention_keeps_peft_scale(tmp_path):
    """Checkpoints of LoKr runs recorded before model.adapter.scale_convention existed were trained with peft's
    alpha / r: reading the run back (sample, eval, export) keeps that update; new configs get LyCORIS's rule."""
    import yaml

    from train.config import load_run_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"adapter": {"kind": "lokr", "rank": 4}}}))
    assert load_run_config(tmp_path).model.adapter.scale_convention == "peft"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"adapter": {"kind": "lokr", "rank": 4, "scale_convention": "lycoris"}}}))
    assert load_run_config(tmp_path).model.adapter.scale_convention == "lycoris"
    assert load_config(None).model.adapter.scale_convention == "lycoris"
