"""The toy de-distillation proof (evals/experiments/proof.py) keeps working: every stage runs in --smoke mode."""

from __future__ import annotations

import math

import pytest

from evals.experiments.proof import load_proof_config, run


@pytest.mark.parametrize("preset", ["configs/proof-cpu.yaml", "configs/proof-gpu.yaml"])
def test_proof_presets_parse(preset):
    cfg = load_proof_config(preset)
    assert cfg.eval.steps == [4, 28] and cfg.eval.cfg_scales == [1.0, 2.0, 3.5, 5.0]
    with pytest.raises(ValueError, match="dedistill_adapters"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["dedistill_adapters=[dora]"])


def test_proof_smoke_produces_the_table(tmp_path):
    cfg = load_proof_config("configs/proof-cpu.yaml", smoke=True, overrides=[f"out_dir={tmp_path}"])
    results = run(cfg)
    models = ["teacher", "student", *(f"dedistilled-{a}" for a in cfg.dedistill_adapters)]
    rows = [r for r in results["rows"] if r["steps"]]
    # one row per model x steps x cfg x repeat, each with a finite FID and adherence in [0, 1]
    assert {(r["model"], r["steps"], r["cfg"]) for r in rows} == {
        (m, s, c) for m in models for s in cfg.eval.steps for c in cfg.eval.cfg_scales
    }
    assert len(rows) == len(models) * len(cfg.eval.steps) * len(cfg.eval.cfg_scales) * cfg.eval.repeats
    for r in rows:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0
        assert 0.0 <= r["acc_mean"] <= 1.0
    assert 0.0 <= results["judge_heldout_accuracy"]["mean"] <= 1.0 and math.isfinite(results["vae"]["mse"])
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(models) * len(cfg.eval.steps)
    assert table[0].count("FID") == len(cfg.eval.cfg_scales) and table[0].count("adh.") == len(cfg.eval.cfg_scales)
    for name in ("cfg_curve.png", "samples_grid.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    # a rerun resumes: every stage's output is found, nothing retrains
    assert run(cfg)["timings_s"]["teacher"] < 5
