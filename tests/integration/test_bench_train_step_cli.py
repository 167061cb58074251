"""bench/train_step.py as a command: its CI mode (--tiny, CPU) prints a consistent table, and its full size runs on
a GPU (the speed options it benchmarks, in process: tests/unit/test_bench_train_step.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.mfu import flops_model

REPO = Path(__file__).resolve().parents[2]


COLUMNS = ["mode", "res", "batch", "tokens", "step_ms", "img_per_s", "peak_mem_GiB", "TFLOP_per_s", "MFU_%", "loss",
           "vs_baseline"]

def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"bench failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r

def parse_table(stdout: str) -> tuple[list[str], list[dict]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}, lines[1]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    return header, rows


def test_tiny_bench_prints_a_consistent_table():
    """The CI run: every mode at one resolution; the numbers must agree with each other and with train/mfu.py."""
    from bench.train_step import SIZES

    peak_tflops = 0.01  # a made-up CPU "peak", so the MFU column is computed and can be checked
    r = run_bench("--tiny", "--resolutions", "64", "--peak-tflops", str(peak_tflops))
    assert "# torch " in r.stdout and "diffusers" in r.stdout  # the header the docs record
    header, rows = parse_table(r.stdout)
    assert header == COLUMNS
    assert [row["mode"] for row in rows] == ["lora", "lokr", "full", "baseline"]

    from train.model import build_transformer_meta

    fm = flops_model(build_transformer_meta(SIZES["tiny"].arch))
    image_tokens = (64 // 16) ** 2
    by_mode = {row["mode"]: row for row in rows}
    for mode, row in by_mode.items():
        assert row["res"] == "64" and row["batch"] == str(SIZES["tiny"].batch[64])
        tokens, step_s = float(row["tokens"]), float(row["step_ms"]) / 1e3
        batch = int(row["batch"])
        assert torch.isfinite(torch.tensor(float(row["loss"])))
        assert float(row["img_per_s"]) == pytest.approx(batch / step_s, rel=2e-2)
        # TFLOP/s from the formula at the mean token count (the per-step lengths vary a little: T² is not linear)
        expected = batch * fm.per_sample(tokens, full=mode == "full") / step_s / 1e12
        assert float(row["TFLOP_per_s"]) == pytest.approx(expected, rel=5e-2)
        assert float(row["MFU_%"]) == pytest.approx(100 * float(row["TFLOP_per_s"]) / peak_tflops, rel=2e-3)
        ratio = float(row["img_per_s"]) / float(by_mode["baseline"]["img_per_s"])
        assert float(row["vs_baseline"]) == pytest.approx(ratio, abs=0.011)
    # The baseline runs the example's unmasked, untrimmed 512 T5 tokens; ours trims to the batch's longest prompt.
    assert float(by_mode["baseline"]["tokens"]) == image_tokens + 512
    for mode in ("lora", "lokr", "full"):
        assert image_tokens < float(by_mode[mode]["tokens"]) < image_tokens + 512
    assert by_mode["baseline"]["vs_baseline"] == "1.00"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_bench_on_gpu():
    """docs/performance.md's measurement, short: full FLUX.1-schnell size, LoRA and the baseline at 512²."""
    r = run_bench("--size", "full", "--modes", "lora,baseline", "--resolutions", "512", "--steps", "3")
    _, rows = parse_table(r.stdout)
    assert [row["mode"] for row in rows] == ["lora", "baseline"]
    assert all(row["step_ms"] not in ("OOM", "n/a") for row in rows)
