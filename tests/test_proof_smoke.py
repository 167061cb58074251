"""The toy de-distillation proof (evals/experiments/proof.py) keeps working: every stage runs in --smoke mode."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import tiny_runs

from evals.experiments.proof import load_proof_config, run


@pytest.mark.parametrize("preset", tiny_runs.config_files("proof"), ids=lambda p: p.name)
def test_proof_presets_parse(preset):
    cfg = load_proof_config(preset)
    assert cfg.eval.steps == [4, 28] and cfg.eval.cfg_scales == [1.0, 2.0, 3.5, 5.0]
    with pytest.raises(ValueError, match="dedistill_adapters"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["dedistill_adapters=[dora]"])


def test_proof_smoke_produces_the_table(tmp_path):
    cfg = load_proof_config("configs/proof-cpu.yaml", smoke=True, overrides=[f"out_dir={tmp_path / 'proof'}"])
    assert cfg.out_dir == str(tmp_path / "proof-smoke")  # never where the full run with this config looks
    out = Path(cfg.out_dir)
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
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(models) * len(cfg.eval.steps)
    assert table[0].count("FID") == len(cfg.eval.cfg_scales) and table[0].count("adh.") == len(cfg.eval.cfg_scales)
    for name in ("cfg_curve.png", "samples_grid.png", "results.json"):
        assert (out / name).stat().st_size > 0
    # a rerun resumes: every stage's output is found, nothing retrains
    assert run(cfg)["timings_s"]["teacher"] < 5

    # The old failure: smoke stages sitting where a full run looks. Put them there; the full run refuses them at once,
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
