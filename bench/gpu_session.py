#!/usr/bin/env python
"""The one-shot GPU session: everything GPU-only, in one device-tool call of <= 8 minutes (docs/performance.md).

    python bench/gpu_session.py --out DIR            # on the GPU machine (bench/gpu_session.sh calls this)
    python bench/gpu_session.py --dry --out DIR      # CPU rehearsal: every step's tiny variant, with gloo
    python bench/gpu_session.py --list               # print every command it would run, and check each parses

Steps run in order of value, each under coreutils `timeout` (a hang costs that step, not the session) and within a
total budget (`--budget`, seconds): a step that no longer fits is reported "not run (budget)". Writes into --out:
  gpu_results.md    the dated table (GPU, versions) for docs/performance.md, and each step's status
  gpu_results.json  the same facts, machine-readable (the bench rows as bench/train_step.py --json writes them)
  gpu_session.log   every step's command and full output
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the parsers it checks live in the repo's packages
PY = sys.executable
BENCH = "bench/train_step.py"
DRY_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str
    gpu: list[str]
    """The command on the GPU machine (run from the repository root)."""
    dry: list[str] | None
    """Its tiny CPU variant for --dry (None: only parsed; `why_not_dry` says why)."""
    timeout_s: int
    """This step's own limit on the GPU (--dry allows DRY_TIMEOUT_S: CPUs are slow, and its variant is tiny)."""
    why_not_dry: str = ""
    bench: bool = False
    """A bench/train_step.py run: its --json rows go into the table."""
    options: str = ""
    """What the table's "options" column says for its rows."""
    env: dict = field(default_factory=dict)


def _bench(name: str, gpu_args: list[str], dry_args: list[str], *, timeout_s: int, options: str,
           why_not_dry: str = "") -> Step:
    return Step(name=name, gpu=[PY, BENCH, "--size", "full", *gpu_args],
                dry=None if dry_args is None else [PY, BENCH, "--tiny", "--warmup", "1", "--steps", "1", *dry_args],
                timeout_s=timeout_s, bench=True, options=options, why_not_dry=why_not_dry)


def gpu_test_files() -> list[str]:
    """The test files holding `@pytest.mark.gpu` tests (collecting only these keeps pytest off modules that import
    packages the GPU machine lacks, e.g. moto or deepspeed)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def plan(work: Path) -> list[Step]:
    """Every step, most valuable first. Timeouts are sized for an H100 (80 GB); the sum exceeds the budget on
    purpose: the budget, not the sum, bounds the session, and the later steps are the ones to lose."""
    demo_common = ["--nproc", "1", "train.progress_bar=false"]
    return [
        _bench("bench-512-eager", ["--modes", "lora,baseline", "--resolutions", "512", "--warmup", "2",
                                   "--steps", "5"],
               ["--modes", "lora,baseline", "--resolutions", "64"], timeout_s=150, options="eager"),
        _bench("bench-512-compiled", ["--modes", "lora", "--resolutions", "512", "--compile", "--warmup", "3",
                                      "--steps", "5"],
               None, timeout_s=180, options="compile",
               why_not_dry="inductor needs minutes on CPU; tests/unit/test_bench_train_step.py checks compile (eager "
                           "backend) on CPU"),
        _bench("bench-1024", ["--modes", "lokr,full", "--resolutions", "1024", "--warmup", "2", "--steps", "3"],
               ["--modes", "lokr,full", "--resolutions", "64"], timeout_s=120, options="eager"),
        Step(name="demo-nccl",
             gpu=[PY, "-m", "launch", "demo", "--out", str(work / "demo"), "--n-samples", "64", *demo_common,
                  "parallel.dist_backend=nccl", "train.max_steps=30", "checkpoint.every_steps=15"],
             dry=[PY, "-m", "launch", "demo", "--out", str(work / "demo"), "--n-samples", "16", "--n-prompts", "4",
                  *demo_common,
                  "parallel.dist_backend=gloo", "train.max_steps=2", "checkpoint.every_steps=2"],
             timeout_s=150),
        _bench("bench-512-sync-debug", ["--modes", "lora", "--resolutions", "512", "--warmup", "1", "--steps", "2",
                                        "--sync-debug"],
               ["--modes", "lora", "--resolutions", "64", "--sync-debug"], timeout_s=75, options="sync-debug"),
        _bench("bench-512-grouped", ["--modes", "lora", "--resolutions", "512", "--length-grouping", "--warmup", "2",
                                     "--steps", "5"],
               ["--modes", "lora", "--resolutions", "64", "--length-grouping"], timeout_s=90,
               options="length grouping"),
        _bench("bench-512-int8", ["--modes", "lora", "--resolutions", "512", "--base-quant", "int8", "--warmup", "2",
                                  "--steps", "5"],
               ["--modes", "lora", "--resolutions", "64", "--base-quant", "int8"], timeout_s=90,
               options="base int8"),
        _bench("bench-512-float8", ["--modes", "lora", "--resolutions", "512", "--base-quant", "float8", "--warmup",
                                    "2", "--steps", "5"],
               None, timeout_s=90, options="base float8",
               why_not_dry="the same bench path as bench-512-int8; tests/unit/test_quant.py trains over a float8 base on CPU"),
        Step(name="pytest-gpu", gpu=[PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()],
             dry=[PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()],
             timeout_s=150),
        Step(name="proof-gpu-smoke",
             gpu=[PY, "-m", "evals.experiments.proof", "--config", "configs/proof-gpu.yaml", "--smoke",
                  f"out_dir={work / 'proof'}"],
             dry=None, timeout_s=180,
             why_not_dry="tests/system/test_proof_smoke.py runs the same --smoke stages on CPU"),
    ]


# ------------------------------------------------------------------------------------------------------ checking


def check_parses(step: Step) -> None:
    """Each GPU command goes through its own parser (and config loader) here, so a renamed flag or config key
    fails on CPU, not in the GPU minutes."""
    argv = step.gpu[1:]
    if argv[0] == BENCH:
        from bench.train_step import build_parser

        build_parser().parse_args(argv[1:])
    elif argv[:2] == ["-m", "launch"]:
        from launch.cli import CONFIGS, _load_extensions, build_parser
        from train.config import load_config

        _load_extensions()
        a = build_parser().parse_args(argv[2:])
        load_config(CONFIGS / ("demo.yaml" if a.command == "demo" else "tiny-cpu.yaml"), list(a.overrides))
    elif argv[:2] == ["-m", "evals.experiments.proof"]:
        from evals.experiments.proof import load_proof_config

        i = argv.index("--config")
        load_proof_config(argv[i + 1], smoke="--smoke" in argv, overrides=[a for a in argv if "=" in a])
    elif argv[:2] == ["-m", "pytest"]:
        files = [a for a in argv if a.startswith("tests/")]
        if not files:
            raise ValueError("pytest-gpu: no test file holds a @pytest.mark.gpu test")
    else:
        raise ValueError(f"{step.name}: no parser check for {shlex.join(step.gpu)}")


# ------------------------------------------------------------------------------------------------------ running


def run_step(step: Step, argv: list[str], limit_s: int, log) -> dict:
    cmd = ["timeout", "-k", "10", str(limit_s), *argv]
    log.write(f"\n===== {step.name} (limit {limit_s} s)\n$ {shlex.join(cmd)}\n")
    log.flush()
    print(f"[gpu_session] {step.name}: {shlex.join(argv)}  (limit {limit_s} s)", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    log.write(proc.stdout)
    log.write(f"===== {step.name}: rc {proc.returncode}, {seconds:.1f} s\n")
    log.flush()
    status = "ok" if proc.returncode == 0 else "timeout" if proc.returncode in (124, 137) else f"rc {proc.returncode}"
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-3:]
    print(f"[gpu_session] {step.name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": step.name, "status": status, "seconds": round(seconds, 1), "command": shlex.join(argv),
            "tail": tail, "output": proc.stdout}


def summarise(result: dict, step: Step) -> str:
    """One line of what the step showed (the table's "result" column)."""
    out = result.pop("output", "")
    if result["status"] != "ok" and not step.bench:
        return " / ".join(result["tail"])[-300:]
    if step.name.startswith("pytest"):
        lines = [ln for ln in out.splitlines() if " in " in ln and any(w in ln for w in ("passed", "skipped", "failed"))]
        return lines[-1].strip("= ") if lines else ""
    if step.name.startswith("demo"):
        failed = [ln for ln in out.splitlines() if "eval of step" in ln and "failed" in ln]
        if failed:  # the trainer logs a failed eval and goes on; the session must not call that a pass
            result["status"] = "eval failed"
            return failed[0][failed[0].index("[dedistill]"):][:300]
        done = [ln for ln in out.splitlines() if "finished in" in ln or "metrics.json" in ln]
        return "; ".join(ln.strip() for ln in done)[-300:]
    syncs = [ln for ln in out.splitlines() if ln.startswith("# sync-debug")]
    return "; ".join(syncs) if syncs else ""


def environment() -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("diffusers", "peft", "transformers", "streaming"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError as e:
            facts[name] = f"missing ({e})"
    return facts


def write_results(out: Path, *, facts: dict, results: list[dict], rows: list[dict], dry: bool,
                  started: str, total_s: float) -> None:
    gpu = facts.get("gpu") or "no GPU (dry run on CPU)"
    date = started[:10]
    versions = (f"torch {facts['torch']}, diffusers {facts['diffusers']}, peft {facts['peft']}, "
                f"transformers {facts['transformers']}, python {facts['python']}")
    lines = [
        f"### {'Dry run (CPU, tiny variants)' if dry else 'GPU session'} {started}: {gpu}",
        "",
        f"`bench/gpu_session.py{' --dry' if dry else ''}`, {total_s:.0f} s in all; {versions}.",
        "",
        "| date | GPU | mode | res | batch | options | step_ms | img/s | peak GiB | MFU % | vs baseline | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["res"]: r["img_per_s"] for r in rows if r["mode"] == "baseline" and "img_per_s" in r}
    for r in rows:
        if "img_per_s" not in r:
            why = "OOM" if r.get("oom") else r.get("skipped") or r.get("error") or "?"
            lines.append(f"| {date} | {gpu} | {r['mode']} | {r['res']} | {r['batch']} | {r['options']} | "
                         f"{why} | | | | | |")
            continue
        ratio = r["img_per_s"] / base[r["res"]] if r["res"] in base else None
        mfu = "n/a" if r.get("MFU_%") is None else f"{r['MFU_%']:.1f}"
        lines.append(
            f"| {date} | {gpu} | {r['mode']} | {r['res']} | {r['batch']} | {r['options']} | {r['step_ms']:.1f} | "
            f"{r['img_per_s']:.3f} | {r['peak_mem_GiB']:.2f} | {mfu} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {r['loss']:.4f} |")
    lines += ["", "| step | status | seconds | result |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '')} | "
                     f"{r.get('summary', '').replace('|', '/')} |")
    out.joinpath("gpu_results.md").write_text("\n".join(lines) + "\n")
    out.joinpath("gpu_results.json").write_text(json.dumps(
        {"started": started, "dry": dry, "environment": facts, "steps": results, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_session_out", help="results folder (default $OUT)")
    p.add_argument("--dry", action="store_true", help="CPU rehearsal: run each step's tiny variant with gloo")
    p.add_argument("--list", action="store_true", help="print and check every GPU command, run nothing")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for all steps together (default 420; --dry: 3600)")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--work", default="/tmp/gpu_session", help="scratch folder (demo, proof runs, bench JSON)")
    a = p.parse_args(argv)

    work = Path(a.work)
    steps = plan(work)
    if a.only:
        wanted = a.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            p.error(f"--only: unknown step {unknown[0]!r} (steps: {', '.join(s.name for s in steps)})")
        steps = [s for s in steps if s.name in wanted]
    for step in steps:
        check_parses(step)
        if a.list:
            print(f"{step.name} ({step.timeout_s} s): {shlex.join(step.gpu)}")
    if a.list:
        return 0

    import torch

    if not a.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_session: no CUDA device; use --dry to rehearse on CPU")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("demo", "proof"):  # a fresh demo and proof: a leftover run dir would resume instead of train
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts = environment()
    print(f"[gpu_session] {json.dumps(facts)}", flush=True)
    deadline = time.monotonic() + (a.budget or (3600 if a.dry else 420))
    results, rows = [], []
    t_all = time.perf_counter()
    with out.joinpath("gpu_session.log").open("w") as log:
        log.write(f"gpu_session {'--dry ' if a.dry else ''}{started}\n{json.dumps(facts)}\n")
        for step in steps:
            argv_ = step.dry if a.dry else step.gpu
            if argv_ is None:
                results.append({"name": step.name, "status": "not run in --dry", "summary": step.why_not_dry})
                continue
            left = int(deadline - time.monotonic())
            if left < 20:
                results.append({"name": step.name, "status": "not run (budget)", "summary": ""})
                continue
            json_path = work / f"{step.name}.json"
            if step.bench:
                json_path.unlink(missing_ok=True)
                argv_ = [*argv_, "--json", str(json_path)]
            result = run_step(step, argv_, min(DRY_TIMEOUT_S if a.dry else step.timeout_s, left), log)
            result["summary"] = summarise(result, step)
            results.append(result)
            if step.bench and json_path.is_file():
                rows += [{**r, "options": step.options} for r in json.loads(json_path.read_text())["rows"]]
            write_results(out, facts=facts, results=results, rows=rows, dry=a.dry, started=started,
                          total_s=time.perf_counter() - t_all)  # after every step: a killed session keeps the rest
    write_results(out, facts=facts, results=results, rows=rows, dry=a.dry, started=started,
                  total_s=time.perf_counter() - t_all)
    print(out.joinpath("gpu_results.md").read_text(), flush=True)
    failed = [r["name"] for r in results if r["status"] not in ("ok", "not run in --dry", "not run (budget)")]
    if failed:
        print(f"[gpu_session] failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
