"""`make demo`: its training command is the one docs/quickstart.md shows it running, and its results keep their
schema, per attribute (the demo itself runs end to end in tests/system/test_docs_commands.py's `make demo` case)."""

import shlex
import sys
from pathlib import Path

from doc_commands import collect
from dataset_tools.tiny_data import WorldSpec
from evals.experiments.demo import CFG_SCALES, REPO, STEPS, attribute_table, results_by_model, train_command
from evals.experiments.judge import ATTRS

QUICKSTART = ("torchrun --standalone --nproc_per_node 2 -m train configs/demo.yaml model.path=demo/model "
              "data.local=demo/data run_dir=demo/run")


def _normalised(argv: list[str]) -> list[str]:
    """torchrun's spellings made one: `python -m torch.distributed.run` is `torchrun`, `--opt=v` is `--opt v`, and a
    path under the repository is relative to it (the documented commands run from its root)."""
    if argv[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        argv = ["torchrun", *argv[3:]]
    out = []
    for a in argv:
        out += a.split("=", 1) if a.startswith("--") and "=" in a else [a]
    return [str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in out]


def test_demo_trains_with_the_quickstart_torchrun_command():
    assert QUICKSTART in {c.text for c in collect()}, "docs/quickstart.md no longer shows the demo's command"
    argv = train_command(model=Path("demo/model"), data=Path("demo/data"), run=Path("demo/run"), nproc=2,
                         overrides=[])
    assert _normalised(argv) == shlex.split(QUICKSTART)


def _acc(attribute: int, model: int, steps: int, cfg: float) -> float:
    """A distinct accuracy per (attribute, model, step count, cfg), on the 0.001 grid (no .3f rounding ties)."""
    return round(0.1 * attribute + 0.02 * model + 0.001 * steps + 0.002 * cfg, 4)


def _rows() -> list[dict]:
    """What evals.experiments.proof.evaluate returns for the demo: the real images' row, then one row per model, step
    count and cfg, with the judge's accuracy per attribute (each value made unique: attribute, model, steps, cfg)."""
    rows = [{"model": "real", "steps": 0, "cfg": 0.0, "fid": 3447.0, "acc_mean": 1.0, **{f"acc_{k}": 1.0 for k in ATTRS}}]
    for m, name in enumerate(("student", "de-distilled")):
        for steps in STEPS:
            for c in CFG_SCALES:
                acc = {k: _acc(a, m, STEPS.index(steps), c) for a, k in enumerate(ATTRS)}
                rows.append({"model": name, "steps": steps, "cfg": c, "fid": 100.0 * c,
                             "acc_mean": sum(acc.values()) / len(acc), **{f"acc_{k}": v for k, v in acc.items()}})
    return rows


def test_results_hold_every_attribute_per_model_step_count_and_cfg():
    models = results_by_model(_rows())
    assert list(models) == ["student", "de-distilled"]
    for m, v in enumerate(models.values()):
        assert v["cfg"] == CFG_SCALES and list(v["steps"]) == [str(s) for s in STEPS]
        for i, (steps, cell) in enumerate(v["steps"].items()):
            assert set(cell) == {"adherence", "fid", "per_attribute"}
            assert list(cell["per_attribute"]) == list(ATTRS)  # the judge's five, in its order
            for a, (k, values) in enumerate(cell["per_attribute"].items()):
                assert values == [_acc(a, m, i, c) for c in CFG_SCALES]
            assert len(cell["adherence"]) == len(cell["fid"]) == len(CFG_SCALES)


def test_attribute_table_reads_cfg_1_to_the_highest_cfg_for_each_attribute():
    table = attribute_table(results_by_model(_rows())).splitlines()
    header = next(line for line in table if line.startswith("| model |"))
    assert "colour (chance 0.083)" in header and "size (chance 0.500)" in header and "shape (chance 0.143)" in header
    row = next(line for line in table if line.startswith("| de-distilled | 28 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    lo, hi = CFG_SCALES[0], CFG_SCALES[-1]
    assert cells == [f"{_acc(a, 1, 1, lo):.3f} → {_acc(a, 1, 1, hi):.3f}" for a in range(len(ATTRS))]
    # a split-palette world draws each colour role from 6 words: chance 1/6 there, the heads still read 12
    split = attribute_table(results_by_model(_rows()), WorldSpec(palettes="split", objects=[1])).splitlines()
    header = next(line for line in split if line.startswith("| model |"))
    assert "colour (chance 0.167)" in header and "background (chance 0.167)" in header
    assert "shape (chance 0.143)" in header
