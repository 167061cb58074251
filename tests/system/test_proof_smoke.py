"""The toy de-distillation proof (evals/experiments/proof.py) keeps working: every stage runs in --smoke mode."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import tiny_runs

from evals.experiments.proof import dedistill_runs, load_proof_config, run
from train.config import load_run_config


@pytest.mark.parametrize("preset", tiny_runs.config_files("proof"), ids=lambda p: p.name)
def test_proof_presets_parse(preset):
    cfg = load_proof_config(preset)
    assert cfg.eval.steps == [4, 28] and cfg.eval.cfg_scales == [1.0, 2.0, 3.5, 5.0]
    with pytest.raises(ValueError, match="dedistill_adapters"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["dedistill_adapters=[dora]"])
    with pytest.raises(ValueError, match=r"^vae.fg_dilate: must be >= 0, got -1$"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["vae.fg_dilate=-1"])


def test_proof_command_reports_a_bad_setting_in_one_line(capsys):
    from evals.experiments.proof import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/proof-cpu.yaml", "--until", "vae", "vae.fg_dilate=-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "proof: error: vae.fg_dilate: must be >= 0, got -1\n"


def test_proof_smoke_produces_the_table(tmp_path):
    cfg = load_proof_config("configs/proof-cpu.yaml", smoke=True, overrides=[f"out_dir={tmp_path / 'proof'}"])
    assert cfg.out_dir == str(tmp_path / "proof-smoke")  # never where the full run with this config looks
    out = Path(cfg.out_dir)
    results = run(cfg)
    runs = dedistill_runs(cfg)
    seeds = len(cfg.dedistill_seeds)
    # the preset's recipes and seeds, kept by --smoke
    assert cfg.dedistill_recipes and seeds == 2 and any(r.base == "pruned" for r in runs)
    models = {"teacher": 1, "student": 1, "student-pruned": 1, **{r.model: seeds for r in runs}}
    rows = [r for r in results["rows"] if r["steps"]]
    # one row per model x seed x steps x cfg x repeat, each with a finite FID and adherence in [0, 1]
    assert {(r["model"], r["seed"], r["steps"], r["cfg"]) for r in rows} == {
        (m, i, s, c) for m, n in models.items() for i in range(n) for s in cfg.eval.steps for c in cfg.eval.cfg_scales
    }
    assert len(rows) == sum(models.values()) * len(cfg.eval.steps) * len(cfg.eval.cfg_scales) * cfg.eval.repeats
    # each run trained what its recipe says, from the pruned (Chroma) student where it says so
    for r in runs:
        job = load_run_config(out / r.run_dir)
        assert job.seed == r.seed and job.model.adapter.kind == r.adapter
        assert all(getattr(job.objective, k) == v for k, v in r.objective.items())
        family = json.loads((Path(job.model.path) / "transformer" / "config.json").read_text())["_class_name"]
        assert family == ("ChromaTransformer2DModel" if r.base == "pruned" else "FluxTransformer2DModel")
    assert json.loads((out / "student_pruned" / "prune_report.json").read_text())["parameters"]["chroma"] > 0
    for r in rows:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0
        assert 0.0 <= r["acc_mean"] <= 1.0
    assert 0.0 <= results["judge_heldout_accuracy"]["mean"] <= 1.0 and math.isfinite(results["vae"]["mse"])
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(models) * len(cfg.eval.steps)  # seeds pooled into one row
    assert table[0].count("FID") == len(cfg.eval.cfg_scales) and table[0].count("adh.") == len(cfg.eval.cfg_scales)
    for name in ("cfg_curve.png", "samples_grid.png", "results.json"):
        assert (out / name).stat().st_size > 0
    # a rerun resumes: every stage's output is found, nothing retrains
    assert run(cfg)["timings_s"]["teacher"] < 5

    # Smoke stages sitting where a full run looks must not pass for its stages. Put them there; the full run refuses them at once,
    # naming the first stage's directory and what differs, and writes nothing.
    full_dir = tmp_path / "proof"
    shutil.copytree(out, full_dir)
    before = {p: p.stat().st_mtime_ns for p in full_dir.rglob("*")}
    full = load_proof_config("configs/proof-cpu.yaml", overrides=[f"out_dir={full_dir}"])
    with pytest.raises(ValueError, match=rf"^{full_dir / 'data'}: made by an earlier run with other settings "
                                         rf"\(n_train differ\)"):
        run(full)
    assert {p: p.stat().st_mtime_ns for p in full_dir.rglob("*")} == before
    # one later stage's settings changed: that stage's directory is named, with the key
    changed = load_proof_config("configs/proof-cpu.yaml", smoke=True,
                                overrides=[f"out_dir={tmp_path / 'proof'}", "dedistill.steps=3"])
    with pytest.raises(ValueError, match=r"dedistill-full: made by .*\(dedistill.steps differ\)"):
        run(changed)


def test_stage_outputs_without_a_settings_record_are_not_reused(tmp_path):
    from evals.experiments.proof import StageRecord

    (tmp_path / "judge.pt").write_bytes(b"")
    record = StageRecord(tmp_path)
    record.claim("world", {"n_train": 8}, [tmp_path / "data"])  # nothing there yet: recorded
    assert json.loads((tmp_path / "stages.json").read_text()) == {"world": {"n_train": 8}}
    with pytest.raises(ValueError, match=r"judge.pt: exists, but .*stages.json does not say which settings made it"):
        record.claim("judge", {"steps": 5}, [tmp_path / "judge.pt"])
    (tmp_path / "data").mkdir()
    StageRecord(tmp_path).claim("world", {"n_train": 8}, [tmp_path / "data"])  # same settings: reused
    with pytest.raises(ValueError, match=r"data: made by an earlier run with other settings \(n_train differ\)"):
        StageRecord(tmp_path).claim("world", {"n_train": 64}, [tmp_path / "data"])


@pytest.mark.parametrize("preset", ["proof-cpu", "proof-dev-cpu"])
def test_proof_cpu_starts_from_the_toy_schnell_build(preset):
    """configs/proof-cpu.yaml and proof-dev-cpu.yaml say a run can start from `python -m
    evals.experiments.toy_schnell`'s stages: every stage up to the student must have the same recorded settings
    (stages.json would refuse them otherwise)."""
    from evals.experiments.proof import stage_settings

    proof, toy = (stage_settings(load_proof_config(f"configs/{n}.yaml")) for n in (preset, "toy-schnell"))
    assert {k: proof[k] for k in ("world", "judge", "vae", "teacher", "distill")} == \
        {k: toy[k] for k in ("world", "judge", "vae", "teacher", "distill")}


def test_vae_loss_weights_object_pixels():
    """vae.fg_weight: an error on the object costs 1 + fg_weight times one on the background; 0 is plain MSE."""
    import torch

    from evals.experiments.proof import reconstruction_loss

    x = torch.full((1, 3, 8, 8), -0.5)
    x[..., 2:4, 2:4] = 0.8  # a 2x2 object on a plain background
    on_object, on_background = x.clone(), x.clone()
    on_object[0, 0, 2, 2] += 0.3
    on_background[0, 0, 6, 6] += 0.3
    assert reconstruction_loss(on_object, x, 0.0) == reconstruction_loss(on_background, x, 0.0)
    assert torch.isclose(reconstruction_loss(on_object, x, 20.0), 21 * reconstruction_loss(on_background, x, 20.0))
    # vae.fg_dilate: the background next to the object (its outline) is weighted too, farther pixels are not
    beside = x.clone()
    beside[0, 0, 4, 4] += 0.3  # one pixel diagonal to the object's corner (3, 3)
    assert reconstruction_loss(beside, x, 20.0) == reconstruction_loss(on_background, x, 20.0)
    assert torch.isclose(reconstruction_loss(beside, x, 20.0, 1), 21 * reconstruction_loss(on_background, x, 20.0, 1))
    assert torch.isclose(reconstruction_loss(on_object, x, 20.0, 1), reconstruction_loss(beside, x, 20.0, 1))


def test_judge_smooth_noise_fields_are_smooth_and_bounded():
    """judge.smooth_noise: per-image fields of peak |value| <= the amplitude, varying slowly across pixels (a tint or
    a faint outline, not pixel noise); 0 keeps the judge's stage record as before the key existed."""
    import torch

    from evals.experiments.judge import smooth_fields
    from evals.experiments.proof import stage_settings

    f = smooth_fields((64, 3, 64, 64), 0.3, torch.Generator().manual_seed(0))
    assert f.shape == (64, 3, 64, 64)
    peak = f.flatten(1).abs().amax(1)
    assert float(peak.max()) <= 0.3 + 1e-6 and float(peak.min()) < float(peak.max()) / 2  # peak ~ U(0, 0.3)
    step = (f[..., 1:] - f[..., :-1]).abs().mean() / f.abs().mean()
    assert step < 0.5, step  # neighbours close: white noise gives ~1.4
    with pytest.raises(ValueError, match=r"^judge.smooth_noise: must be >= 0, got -0.1$"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["judge.smooth_noise=-0.1"])
    plain = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=["judge.smooth_noise=0"]))
    assert "smooth_noise" not in plain["judge"]["judge"]
    noisy = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=["judge.smooth_noise=0.3"]))
    assert noisy["judge"]["judge"]["smooth_noise"] == 0.3 and noisy["vae"] == plain["vae"]


def test_proof_dev_smoke_runs_both_objectives_on_the_toy_dev(tmp_path):
    """configs/proof-dev-cpu.yaml: the toy dev has a guidance embedder; each objective de-distills it as its recipe
    says (teacher: the dev itself at w ~ U(dev.guidance)) into a schnell-shaped model; the dev is evaluated both
    bypassed with real CFG and fed each scale through its embedder."""
    from train.inference import load_for_inference

    cfg = load_proof_config("configs/proof-dev-cpu.yaml", smoke=True, overrides=[
        f"out_dir={tmp_path / 'proof'}", "dedistill_adapters=[]", "dedistill_recipes=[dev-data,dev-teacher]",
        "dedistill_seeds=[0]", "eval.steps=[4]"])
    out = Path(cfg.out_dir)
    rows = [r for r in run(cfg)["rows"] if r["steps"]]
    dev = out / "dev_pipeline"
    assert json.loads((dev / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    kinds = {}
    for r in dedistill_runs(cfg):
        job = load_run_config(out / r.run_dir)
        assert Path(job.model.path) == dev and job.model.guidance == "bypass"
        kinds[r.model] = job.objective.kind
        if job.objective.kind == "teacher":
            assert job.objective.teacher_guidance == cfg.dev.guidance
        assert not load_for_inference(out / r.run_dir, dtype="fp32").transformer.config.guidance_embeds
    assert kinds == {"dedistilled-dev-data": "data", "dedistilled-dev-teacher": "teacher"}
    models = {r["model"] for r in rows}
    assert models == {"teacher", "student", "dev", "dev-embedded", *kinds}
    assert {r["cfg"] for r in rows if r["model"] == "dev-embedded"} == set(cfg.eval.cfg_scales)
