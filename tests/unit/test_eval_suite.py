"""Eval suites: presets and config errors, prompts, splitting across ranks, reports and plots, the standalone CLI on
the tiny model, and periodic evals inside a training run (inline, a failing eval, a submitted job)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals.suite import (
    PRESETS, Scorers, SuiteConfig, Target, build_prompts, load_suite, resolve_paths, sample_and_measure,
    setting_name, shard_range,
)
from train.config import from_dict

import tiny_runs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on 2 shared cores: a second intra-op thread mostly waits (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_suite_preset_parses(path):
    suite = load_suite(path)
    assert suite.settings() and suite.grid_images >= 0
    if suite.prompts.file:
        assert Path(suite.prompts.file).is_file()  # {suite_dir} resolved to the shipped prompt list


def test_tiny_preset_is_what_the_demo_needs():
    s = load_suite("tiny")
    assert s.sampling.resolution == 64 and s.sampling.cfg_scales == [1.0, 2.0, 4.0] and s.num_samples == 8
    assert (4, 1.0) in s.settings() and (8, 4.0) in s.settings()  # the schnell-style baseline is one setting


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompts": {"file": "a", "mds": "b"}}, "prompts: set exactly one"),
        ({"prompts": {"file": "a"}, "fid": {"dims": 100}}, "fid.dims: 100"),
        ({"prompts": {"file": "a"}, "fid": {"inception_weights": "w"}}, "fid.reference: must be set"),
        ({"prompts": {"file": "a"}, "sampling": {"mask": "maybe"}}, "sampling.mask"),
        ({"prompts": {"file": "a"}, "sampling": {"steps": [0]}}, r"sampling.steps\[0\]"),
        ({"prompts": {"file": "a"}, "sampling": {"resolution": 100}}, "sampling.resolution"),
        ({"prompts": {"file": "a"}, "sampling": {"cfg_scales": "x"}}, "sampling.cfg_scales"),
        ({"prompts": {"mds": "d"}}, "num_samples: must be > 0"),
        ({"prompts": {"file": "a"}, "fid": {"weights": "w"}}, "unknown config key 'fid.weights'"),
    ],
)
def test_suite_mistakes_are_one_line_value_errors_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message) as e:
        from_dict(SuiteConfig, data)
    assert "\n" not in str(e.value)


def model_target(path) -> Target:
    return Target(Path(path), None, None, None, None)


def test_missing_files_name_the_key(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = {"prompts": {"file": str(tmp_path / "p.txt")}}
    weights = tmp_path / "missing.safetensors"
    suite = from_dict(SuiteConfig, {**base, "fid": {"inception_weights": str(weights), "reference": str(tmp_path)}})
    with pytest.raises(ValueError, match=rf"^fid.inception_weights: file not found: {weights}$"):
        resolve_paths(suite, model_target(tmp_path))
    suite = from_dict(SuiteConfig, {**base, "clip": {"model": "{model}/eval/clip"}})
    with pytest.raises(ValueError, match=rf"^clip.model: model dir not found: {tmp_path}/eval/clip$"):
        resolve_paths(suite, model_target(tmp_path))
    suite = from_dict(SuiteConfig, {"prompts": {"mds": "{data}"}, "num_samples": 2})
    with pytest.raises(ValueError, match=r"^prompts.mds: uses \{data\}"):
        resolve_paths(suite, model_target(tmp_path))
    suite = from_dict(SuiteConfig, {"prompts": {"file": str(tmp_path / "nope.txt")}})
    with pytest.raises(ValueError, match="^prompts.file: file not found"):
        resolve_paths(suite, model_target(tmp_path))


def test_prompts_from_a_file_cycle_and_from_mds_follow_the_seed(tmp_path, tiny_data_dir):
    from evals.suite import PromptsConfig

    (tmp_path / "p.txt").write_text("# comment\na red circle\n\na blue square\n")
    assert build_prompts(PromptsConfig(file=str(tmp_path / "p.txt")), 0) == ["a red circle", "a blue square"]
    assert build_prompts(PromptsConfig(file=str(tmp_path / "p.txt")), 3)[2] == "a red circle"

    a = build_prompts(PromptsConfig(mds=str(tiny_data_dir), seed=0), 6)
    assert a == build_prompts(PromptsConfig(mds=str(tiny_data_dir), seed=0), 6)
    assert a != build_prompts(PromptsConfig(mds=str(tiny_data_dir), seed=1), 6)
    assert len(set(a)) > 1 and all(isinstance(p, str) and p for p in a)


# ---------------------------------------------------------------------------------------------- ranks and seeds


def fake_generate(prompts, s):
    """Image j depends only on (prompt j, seed + j), like the real sampler."""
    out = []
    for j, p in enumerate(prompts):
        rng = np.random.default_rng([s.seed + j, len(p)])
        out.append(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    return out


class MeanPixelScorer:
    """Stands in for CLIP: a per-image number, so the gathered order can be checked."""

    def cosines(self, images, captions, batch_size=64):
        return np.array([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


@dataclasses.dataclass
class FakeSettings:  # what sample_and_measure reads of SamplingSettings (importing the sampler costs seconds)
    seed: int = 5
    batch_size: int = 1


def _split_worker(rank, world, store, weights, prompts, out):
    import torch.distributed as dist

    from evals.inception import load_inception

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        scorers = Scorers(inception=load_inception(weights), dims=64, clip=MeanPixelScorer())
        got = sample_and_measure(fake_generate, prompts, FakeSettings(), scorers,
                                 grid_n=8, rank=rank, world=world)
        if rank == 0:
            np.savez(out, features=got["features"], cosines=got["cosines"],
                     grid=np.stack([np.asarray(im) for im in got["grid"]]))
        else:
            assert got is None
    finally:
        dist.destroy_process_group()


def test_shard_range_covers_everything_once():
    for n in (0, 1, 7, 11):
        for world in (1, 2, 3, 8):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))


def test_preserved_rng_leaves_the_trainer_streams_untouched():
    import random

    from evals.periodic import preserved_rng

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    with preserved_rng():
        torch.rand(5), random.random(), np.random.rand(4)
        torch.nn.Linear(4, 4)  # module init draws from the global generator
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ------------------------------------------------------------------------------------------------ report, plots


def fake_metrics(step, label, fid_base):
    results = [
        {"setting": setting_name(8, c), "steps": 8, "cfg_scale": c, "fid": fid_base + 10 * abs(c - 2),
         "clip": 20 + c, "seconds": 1.0}
        for c in (1.0, 2.0, 4.0)
    ]
    return {"suite": "t", "label": label, "step": step, "num_samples": 8, "resolution": 64, "fid_dims": 192,
            "fid_reference": "ref", "results": results}


def test_run_plots_are_regenerated_from_every_metrics_file(tmp_path):
    from evals.report import run_metrics, update_run_plots, write_report

    for step, fid in ((100, 50.0), (200, 40.0)):
        d = tmp_path / "evals" / f"step_{step:08d}" / "t"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(fake_metrics(step, f"run/step_{step:08d}", fid)))
    (tmp_path / "evals" / "step_00000300" / "t").mkdir(parents=True)  # a failed eval: no metrics.json, error.txt
    (tmp_path / "evals" / "step_00000300" / "t" / "error.txt").write_text("boom")
    assert [m["step"] for m in run_metrics(tmp_path)] == [100, 200]
    # a second suite on the same checkpoint sits beside the first, and both are read
    other = {**fake_metrics(200, "run/step_00000200", 10.0), "suite": "u"}
    (tmp_path / "evals" / "step_00000200" / "u").mkdir()
    (tmp_path / "evals" / "step_00000200" / "u" / "metrics.json").write_text(json.dumps(other))
    assert [(m["step"], m["suite"]) for m in run_metrics(tmp_path)] == [(100, "t"), (200, "t"), (200, "u")]
    plots = update_run_plots(tmp_path)
    assert sorted(p.name for p in plots) == ["fid_vs_clip.png", "fid_vs_step.png"]
    for p in plots:
        assert Image.open(p).size[0] > 200

    (tmp_path / "cmp" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "cmp" / "a" / "grid_cfg2.png")
    report = write_report(tmp_path / "cmp", [("a", fake_metrics(None, "FLUX.1-schnell", 60.0)),
                                             ("b", fake_metrics(None, "dedistilled", 30.0))])
    text = report.read_text()
    assert "| FLUX.1-schnell | steps8_cfg4 | 8 | 4 | 80.000 | 24.000 |" in text
    assert "| dedistilled | steps8_cfg2 | 8 | 2 | 30.000 | 22.000 |" in text
    assert "[cfg 2](a/grid_cfg2.png)" in text and (tmp_path / "cmp" / "fid_vs_clip.png").is_file()


# --------------------------------------------------------------------------------------- end to end, tiny model


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    """One XDG cache for the module: the tiny reference statistics are computed once."""
    return tmp_path_factory.mktemp("xdg-cache")


def grid_tiles(path: Path, n: int, size: int = 64, pad: int = 2) -> list[list[Image.Image]]:
    """Cut evals.sampler.make_grid's layout back into rows of tiles."""
    grid = Image.open(path).convert("RGB")
    rows = (grid.height - pad) // (size + pad)
    return [[grid.crop((pad + j * (size + pad), pad + i * (size + pad), pad + j * (size + pad) + size,
                        pad + i * (size + pad) + size)) for j in range(n)] for i in range(rows)]


@pytest.mark.slow
def test_eval_cli_report_on_the_tiny_model_and_metrics_match_the_grid(
    tiny_model_dir, tiny_data_dir, fid_cache, tmp_path, capsys
):
    """`dedistill eval tiny --checkpoint MODEL_DIR --out DIR`; then FID and CLIP recomputed from the grid PNG's
    tiles (lossless, all 4 images) equal the reported numbers: the metrics measure the images the grid shows."""
    from evals.clip_score import CLIPScorer
    from evals.fid import Stats, fid_from_stats, reference_stats
    from evals.inception import inception_features, load_inception
    from evals.suite import PromptsConfig
    from launch.cli import main

    out, cache = tmp_path / "report", fid_cache / "dedistill" / "fid_stats"
    main(["eval", "tiny", f"prompts.mds={tiny_data_dir}", f"fid.reference={tiny_data_dir}", f"fid.cache_dir={cache}",
          "num_samples=4", "sampling.cfg_scales=[1, 4]", "--checkpoint", str(tiny_model_dir), "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith("report.md")
    sub = out / tiny_model_dir.name
    metrics = json.loads((sub / "metrics.json").read_text())
    assert [r["setting"] for r in metrics["results"]] == ["steps8_cfg1", "steps8_cfg4", "steps4_cfg1"]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["clip"] > 0 for r in metrics["results"])
    assert sorted(p.name for p in sub.glob("grid_cfg*.png")) == ["grid_cfg1.png", "grid_cfg4.png"]
    report = (out / "report.md").read_text()
    assert f"| {tiny_model_dir.name} | steps4_cfg1 | 4 | 1 |" in report and (out / "fid_vs_clip.png").is_file()

    prompts = build_prompts(PromptsConfig(mds=str(tiny_data_dir)), 4)
    rows = grid_tiles(sub / "grid_cfg1.png", 4)
    assert len(rows) == 2  # 4 steps, then 8 steps
    by_name = {r["setting"]: r for r in metrics["results"]}
    scorer = CLIPScorer(tiny_model_dir / "eval" / "clip")
    inception = load_inception(tiny_model_dir / "eval" / "inception.safetensors")
    ref = reference_stats(tiny_data_dir, model=inception, weights=tiny_model_dir / "eval" / "inception.safetensors",
                          dims=192, count=64, resize_to=64, cache_dir=cache)
    for tiles, name in ((rows[0], "steps4_cfg1"), (rows[1], "steps8_cfg1")):
        assert scorer.score(tiles, prompts) == pytest.approx(by_name[name]["clip"], abs=1e-4)
        fid = fid_from_stats(Stats.of(inception_features(inception, tiles, dims=192)), ref)
        assert fid == pytest.approx(by_name[name]["fid"], rel=1e-4)
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[1][0]))  # 4 vs 8 steps differ


def write_suite(path: Path, **changes) -> Path:
    import yaml

    data = yaml.safe_load((PRESETS / "tiny.yaml").read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def train_tiny(model, data, run_dir, *overrides):
    from train.config import load_config

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"model.path={model}", f"data.local={data}", f"run_dir={run_dir}", "train.max_steps=2",
        "checkpoint.every_steps=1", "train.progress_bar=false", "sample.at_end=false", "eval.every_steps=2",
        *overrides,
    ])
    return tiny_runs.train_in_process(cfg)


@pytest.mark.slow
def test_inline_eval_during_training_writes_metrics_grids_plots_and_tensorboard(
    tiny_model_dir, tiny_data_dir, fid_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(fid_cache))  # reference stats go to the default cache
    run = tmp_path / "run"
    state = train_tiny(tiny_model_dir, tiny_data_dir, run, "eval.mode=inline", "eval.suite=tiny")
    assert state.step == 2
    assert not (run / "evals" / "step_00000001").exists()  # only multiples of eval.every_steps
    out = run / "evals" / "step_00000002" / "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["checkpoint"].endswith("checkpoints/step_00000002")
    assert len(metrics["results"]) == 4 and all(r["fid"] is not None and r["clip"] is not None
                                                for r in metrics["results"])
    assert {p.name for p in out.glob("grid_cfg*.png")} == {"grid_cfg1.png", "grid_cfg2.png", "grid_cfg4.png"}
    assert (run / "plots" / "fid_vs_step.png").is_file() and (run / "plots" / "fid_vs_clip.png").is_file()
    assert list(fid_cache.rglob("*.npz"))  # reference statistics cached

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for f in (run / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f)).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"eval/tiny/fid/steps8_cfg2", "eval/tiny/clip/steps4_cfg1"} <= tags["scalars"]
    assert "eval/tiny/grid_cfg4" in tags["images"]

    # A second suite on the same checkpoint (overrides after --checkpoint, as users type them) sits beside the
    # first; re-running the first with fewer CFG scales replaces its files, old grids included.
    from launch.cli import main

    first = (out / "metrics.json").read_text()
    other = write_suite(tmp_path / "other.yaml", name="other", num_samples=2, **{"sampling.cfg_scales": [1.0],
                                                                                  "sampling.extra": []})
    ckpt = run / "checkpoints" / "step_00000002"
    main(["eval", str(other), "--checkpoint", str(ckpt), "fid.reference_count=8"])
    assert (out / "metrics.json").read_text() == first
    second = json.loads((run / "evals" / "step_00000002" / "other" / "metrics.json").read_text())
    assert second["suite"] == "other" and [r["setting"] for r in second["results"]] == ["steps8_cfg1"]
    assert [p.name for p in (out.parent / "other").glob("grid_cfg*.png")] == ["grid_cfg1.png"]
    main(["eval", "tiny", "--checkpoint", str(ckpt), "num_samples=2", "sampling.cfg_scales=[1]",
          "sampling.extra=[]"])
    assert sorted(p.name for p in out.glob("grid_cfg*.png")) == ["grid_cfg1.png"]
    from evals.report import run_metrics

    assert sorted(m["suite"] for m in run_metrics(run)) == ["other", "tiny"]


def test_an_eval_that_cannot_run_stops_training_at_start(tiny_model_dir, tiny_data_dir, tmp_path):
    """A suite naming a file that does not exist is a config error before the first step, naming the key."""
    missing = tmp_path / "nowhere" / "inception.safetensors"
    suite = write_suite(tmp_path / "bad.yaml", **{"fid.inception_weights": str(missing)})
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^eval.suite: .*bad.yaml: fid.inception_weights: file not found: {missing}$"):
        train_tiny(tiny_model_dir, tiny_data_dir, run, "eval.mode=inline", f"eval.suite={suite}")
    assert not (run / "checkpoints").exists()


def _broken_inception(tmp_path: Path) -> Path:
    """A file that exists (so the run starts) but is not Inception weights: the eval itself fails."""
    from safetensors.torch import save_file

    path = tmp_path / "not-inception.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path


@pytest.mark.slow
def test_a_failing_eval_is_recorded_and_training_completes(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    broken = _broken_inception(tmp_path)
    suite = write_suite(tmp_path / "bad.yaml", **{"fid.inception_weights": str(broken)})
    run = tmp_path / "run"
    state = train_tiny(tiny_model_dir, tiny_data_dir, run, "eval.mode=inline", f"eval.suite={suite}",
                       "train.max_steps=1", "eval.every_steps=1")
    assert state.step == 1 and (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    error = (run / "evals" / "step_00000001" / "tiny" / "error.txt").read_text()
    assert f"fid.inception_weights: {broken} does not hold FID Inception weights" in error and "Traceback" in error
    assert "eval of step 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["eval", "tiny", "num_samples=2", "sampling.steps=[2]", "--checkpoint", "CKPT", "--out", "OUT"],
    ["eval", "tiny", "--checkpoint", "CKPT", "num_samples=2", "--out", "OUT", "sampling.steps=[2]"],
    ["eval", "--checkpoint", "CKPT", "tiny", "num_samples=2", "sampling.steps=[2]", "--out", "OUT"],
])
def test_eval_takes_overrides_before_or_after_the_options(argv):
    """`dedistill eval SUITE --checkpoint X key=value` parses like `submit`: overrides anywhere."""
    from launch.cli import _load_extensions, build_parser

    _load_extensions()
    a = build_parser().parse_args(argv)
    assert (a.suite, a.overrides, a.checkpoint, a.out) == ("tiny", ["num_samples=2", "sampling.steps=[2]"],
                                                           ["CKPT"], "OUT")
