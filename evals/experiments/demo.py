"""`dedistill demo` (what `make demo` runs): the mission end to end, in minutes, on the shipped toy schnell.

1. `DIR/model`: the shipped toy schnell (launch/assets/toy_schnell/pipeline), a reflow-distilled student whose CFG
   is baked in; `DIR/data`: the toy world it was distilled on, as MDS shards (seed 0, as the proof's).
2. De-distill it with the real trainer: torchrun, 2 gloo processes, FSDP2, masked T5, caption dropout, adapter
   `full` (configs/demo.yaml; why `full`: see there and docs/proof.md) -> `DIR/run`.
3. Evaluate student vs de-distilled at cfg 1, 2, 3.5, 5 with 4 and 28 steps on held-out prompts, with the shipped
   judge: prompt adherence and toy FID. Writes `DIR/demo_results.json`, `DIR/before_after.png` (rows: prompts;
   columns: cfg; the student's rows above the de-distilled ones) and `DIR/cfg_curve.png`, and prints the table.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from dataset_tools.tiny_data import write_tiny_data
from dataset_tools.tiny_data import DEFAULT_WORLD, WorldSpec
from evals.experiments.judge import ATTRS, chance, load_judge, single_object_samples, to_tensor
from evals.experiments.proof import evaluate, held_out_world, plot
from evals.experiments.toy_schnell import asset_dir, load_asset_config

REPO = Path(__file__).resolve().parents[2]
DEMO_PRESET = REPO / "configs" / "demo.yaml"
CFG_SCALES = [1.0, 2.0, 3.5, 5.0]
STEPS = [4, 28]


def log(msg: str) -> None:
    print(msg, flush=True)


def train_command(*, model: Path, data: Path, run: Path, nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "train", str(DEMO_PRESET), f"model.path={model}", f"data.local={data}", f"run_dir={run}",
            *overrides]


def results_by_model(rows: list[dict]) -> dict:
    """demo_results.json's `models`: per model, the cfg list and, per step count, adherence and toy FID per cfg."""
    out: dict = {}
    for name in dict.fromkeys(r["model"] for r in rows if r["steps"]):
        m = out[name] = {"cfg": CFG_SCALES, "steps": {}}
        for steps in STEPS:
            sel = [next(r for r in rows if r["model"] == name and r["steps"] == steps and r["cfg"] == c)
                   for c in CFG_SCALES]
            m["steps"][str(steps)] = {"adherence": [round(r["acc_mean"], 4) for r in sel],
                                      "fid": [round(r["fid"], 2) for r in sel],
                                      "per_attribute": {k[4:]: [round(r[k], 4) for r in sel]
                                                        for k in sel[0] if k.startswith("acc_") and k != "acc_mean"}}
    return out


def table(models: dict) -> str:
    head = ("| model | steps | " + " | ".join(f"adh. cfg {c:g}" for c in CFG_SCALES) + " | "
            + " | ".join(f"FID cfg {c:g}" for c in CFG_SCALES) + " |")
    lines = [head, "|---|---|" + "---|" * (2 * len(CFG_SCALES))]
    for name, m in models.items():
        for steps, v in m["steps"].items():
            lines.append(f"| {name} | {steps} | " + " | ".join(f"{a:.3f}" for a in v["adherence"]) + " | "
                         + " | ".join(f"{f:.0f}" for f in v["fid"]) + " |")
    return "\n".join(lines)


def attribute_table(models: dict, world: WorldSpec = DEFAULT_WORLD) -> str:
    """Per attribute (the judge's five, with their chance level in `world`), each model's adherence at cfg 1 -> its
    highest cfg: what the one-number table averages away, e.g. whether colour comes back with CFG or only position
    does."""
    lo, hi = CFG_SCALES[0], CFG_SCALES[-1]
    p = chance(world)
    head = "| model | steps | " + " | ".join(f"{k} (chance {p[k]:.3f})" for k in ATTRS) + " |"
    lines = [f"Per attribute, cfg {lo:g} -> {hi:g}:", "", head, "|---|---|" + "---|" * len(ATTRS)]
    for name, m in models.items():
        for steps, v in m["steps"].items():
            per = v["per_attribute"]
            lines.append(f"| {name} | {steps} | " + " | ".join(f"{per[k][0]:.3f} → {per[k][-1]:.3f}" for k in ATTRS)
                         + " |")
    return "\n".join(lines)


def before_after_grid(cells: dict, prompts: list[str], path: Path, *, steps: dict[str, int]) -> None:
    """Rows: prompts (the student's block above the de-distilled one); columns: cfg; same noise in every cell."""
    names = list(steps)
    n_rows, n_cols = len(names) * len(prompts), len(CFG_SCALES)
    cell = 1.6  # inches at dpi 100: each 64 px image drawn at 160 px, large enough to see an object's shape
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 3.6, cell * n_rows), squeeze=False)
    for b, name in enumerate(names):
        for i, prompt in enumerate(prompts):
            for j, c in enumerate(CFG_SCALES):
                ax = axes[b * len(prompts) + i][j]
                ax.imshow(cells[name, steps[name], c][i])
                ax.set_xticks([])
                ax.set_yticks([])
                if b * len(prompts) + i == 0:
                    ax.set_title(f"cfg {c:g}", fontsize=10)
                if j == 0:
                    ax.set_ylabel(f"{name}, {steps[name]} st.", fontsize=8)
                if j == n_cols - 1:
                    ax.text(1.08, 0.5, prompt.replace(" on ", "\non "), transform=ax.transAxes, fontsize=8,
                            va="center")
    fig.subplots_adjust(left=0.05, right=0.66, top=0.96, bottom=0.01, wspace=0.04, hspace=0.06)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out: Path, *, nproc: int = 2, n_samples: int = 2000, n_prompts: int = 128, grid_prompts: int = 4,
             overrides: list[str] = ()) -> dict:
    torch.set_num_threads(1)  # the proof's setting: 2 OpenMP threads on a loaded 2-core box ran slower
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    asset, cfg = asset_dir(), load_asset_config()
    model, data, run = out / "model", out / "data", out / "run"
    out.mkdir(parents=True, exist_ok=True)
    if not (model / "model_index.json").is_file():
        shutil.copytree(asset / "pipeline", model, dirs_exist_ok=True)
    if not (data / "index.json").is_file():  # the world the student was distilled on (same seed, the first n)
        write_tiny_data(data, n=n_samples, size=cfg.resolution, seed=cfg.seed, world=cfg.world)
    timings["setup"] = round(time.perf_counter() - t0, 1)

    t = time.perf_counter()
    # The resolution is the world's (the asset's config), so the student is never trained on resized images.
    res = [f"data.resolution={cfg.resolution}", f"sample.resolution={cfg.resolution}"]
    cmd = train_command(model=model, data=data, run=run, nproc=nproc, overrides=[*res, *overrides])
    log("[demo] de-distilling the toy schnell: " + shlex.join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(rc)
    timings["dedistill"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    cfg.eval.n_prompts, cfg.eval.repeats, cfg.eval.steps, cfg.eval.cfg_scales = n_prompts, 1, STEPS, CFG_SCALES
    cfg.eval.grid_prompts = grid_prompts
    world = held_out_world(cfg)
    judge = load_judge(asset / "judge.safetensors")
    # FID floor: an independent set of real renders (the judge's test seed) against the eval prompts' renders
    real_x = to_tensor([im for im, _ in single_object_samples(n_prompts, size=cfg.resolution, seed=cfg.seed + 20_000,
                                                                  world=cfg.world)])
    cells: dict = {}
    rows = evaluate(cfg, {"student": model, "de-distilled": run}, judge, world, out, real_x, cells=cells,
                    write_grid=False)
    timings["eval"] = round(time.perf_counter() - t, 1)
    models = results_by_model(rows)
    real = rows[0]
    before_after_grid(cells, world["eval_prompts"][:grid_prompts], out / "before_after.png",
                      steps={"student": 4, "de-distilled": 28})
    plot(rows, cfg, out / "cfg_curve.png")
    timings["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "cfg": CFG_SCALES, "steps": STEPS, "n_prompts": len(world["eval_prompts"]), "models": models,
        "real_images": {"adherence": round(real["acc_mean"], 4), "fid_floor": round(real["fid"], 2)},
        "chance_adherence": round(chance(cfg.world)["mean"], 4), "training_overrides": list(overrides), "nproc": nproc,
        "timings_s": timings,
        "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    log("\n" + table(models) + "\n\n" + attribute_table(models, cfg.world))
    for name, steps in (("student", "4"), ("de-distilled", "28")):
        a = models[name]["steps"][steps]["adherence"]
        log(f"[demo] {name} ({steps} steps): adherence cfg 1 -> 5: {a[0]:.3f} -> {a[-1]:.3f} ({a[-1] - a[0]:+.3f})")
    log(f"[demo] real images: adherence {real['acc_mean']:.3f}, FID floor {real['fid']:.0f}; chance adherence "
        f"{results['chance_adherence']:.3f}")
    log(f"[demo] finished in {timings['total']:.0f} s (setup {timings['setup']:.0f}, de-distill "
        f"{timings['dedistill']:.0f}, eval {timings['eval']:.0f}); load average {os.getloadavg()[0]:.1f}\n"
        f"  toy schnell (student) : {model}\n  toy world (MDS)       : {data}\n  de-distill run        : {run}\n"
        f"  results               : {out / 'demo_results.json'}\n  before/after grid     : {out / 'before_after.png'}\n"
        f"  CFG curves            : {out / 'cfg_curve.png'}")
    return results
