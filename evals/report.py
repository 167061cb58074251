"""Plots and reports, always regenerated from metrics.json files (never from in-memory state), so a plot shows every
eval that finished, whichever process ran it.

- `fid_vs_step.png`: FID against training step, one line per (steps, cfg) setting.
- `fid_vs_clip.png`: the CFG trade-off: one point per CFG scale (annotated), one line per checkpoint (and step count).
  Lower-right is better: low FID (realistic, diverse) with high CLIP score (follows the prompt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from train.run_dir import RunDir  # noqa: E402


def load_metrics(paths) -> list[dict]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a metrics.json being written right now; the next regeneration picks it up
    return out


def run_metrics(run_dir: str | Path) -> list[dict]:
    """Every finished eval of a run: <run_dir>/evals/step_N/<suite>/metrics.json, by step then suite."""
    found = RunDir(run_dir).eval_files("metrics.json")
    return sorted(load_metrics(found), key=lambda m: (m.get("step") or 0, m.get("suite", "")))


def _suite_prefix(metrics: list[dict]):
    """Labels name the suite only when several suites are plotted together (their settings may share names)."""
    several = len({m.get("suite") for m in metrics}) > 1
    return (lambda m: f"{m.get('suite')}: ") if several else (lambda m: "")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # atomic: two eval jobs finishing together never leave a half-written plot
    return path


def plot_fid_vs_step(metrics: list[dict], path: str | Path) -> Path | None:
    lines: dict[str, list[tuple[int, float]]] = {}
    prefix = _suite_prefix(metrics)
    for m in metrics:
        for r in m["results"]:
            if r.get("fid") is not None and m.get("step") is not None:
                lines.setdefault(prefix(m) + r["setting"], []).append((m["step"], r["fid"]))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_fid_vs_clip(metrics: list[dict], path: str | Path) -> Path | None:
    series = []
    prefix = _suite_prefix(metrics)
    for m in metrics:
        by_steps: dict[int, list[dict]] = {}
        for r in m["results"]:
            if r.get("fid") is not None and r.get("clip") is not None:
                by_steps.setdefault(r["steps"], []).append(r)
        for steps, rs in sorted(by_steps.items()):
            label = prefix(m) + m["label"] + (f", {steps} steps" if len(by_steps) > 1 else "")
            series.append((label, sorted(rs, key=lambda r: r["cfg_scale"])))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cmap = plt.get_cmap("viridis")
    for i, (label, rs) in enumerate(series):
        color = cmap(i / max(len(series) - 1, 1))
        xs, ys = [r["clip"] for r in rs], [r["fid"] for r in rs]
        ax.plot(xs, ys, marker="o", color=color, label=label)
        for r in rs:
            ax.annotate(f"cfg {r['cfg_scale']:g}", (r["clip"], r["fid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel("CLIP score (higher: follows the prompt)")
    ax.set_ylabel("FID (lower: closer to real images)")
    ax.set_title("CFG trade-off: one point per CFG scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def update_run_plots(run_dir: str | Path) -> list[Path]:
    """<run_dir>/plots/fid_vs_step.png and fid_vs_clip.png from every <run_dir>/evals/step_*/*/metrics.json."""
    metrics = run_metrics(run_dir)
    plots = RunDir(run_dir).plots
    made = [plot_fid_vs_step(metrics, plots / "fid_vs_step.png"), plot_fid_vs_clip(metrics, plots / "fid_vs_clip.png")]
    return [p for p in made if p is not None]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_report(out_dir: str | Path, entries: list[tuple[str, dict]], *, title: str = "") -> Path:
    """`entries`: (subdir of out_dir holding that model's metrics.json and grids, metrics). Writes report.md with one
    table row per (model, setting), the FID-vs-CLIP plot and links to the grids."""
    out_dir = Path(out_dir)
    metrics = [m for _, m in entries]
    plot = plot_fid_vs_clip(metrics, out_dir / "fid_vs_clip.png")
    first = metrics[0] if metrics else {}
    lines = [
        f"# {title or 'Eval report'}: suite `{first.get('suite', '')}`",
        "",
        f"{first.get('num_samples', 0)} samples per setting at {first.get('resolution', 0)} px; FID on Inception "
        f"{first.get('fid_dims') or '–'}-d features vs `{first.get('fid_reference') or '–'}`. "
        "FID: lower is better. CLIP: higher is better.",
        "",
        "| model | setting | steps | cfg | FID | CLIP | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for _, m in entries:
        for r in m["results"]:
            lines.append(
                f"| {m['label']} | {r['setting']} | {r['steps']} | {r['cfg_scale']:g} | {_fmt(r['fid'])} | "
                f"{_fmt(r['clip'])} | {r['seconds']:.1f} |"
            )
    if plot is not None:
        lines += ["", "## FID vs CLIP (one point per CFG scale)", "", f"![FID vs CLIP]({plot.name})"]
    lines += ["", "## Grids (rows: step counts; columns: the first prompts, same seeds in every grid)", ""]
    for sub, m in entries:
        grids = sorted((out_dir / sub).glob("grid_cfg*.png"), key=lambda p: float(p.stem[len("grid_cfg"):]))
        links = ", ".join(f"[cfg {p.stem[len('grid_cfg'):]}]({sub}/{p.name})" for p in grids)
        lines.append(f"- {m['label']}: {links or '–'}")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
