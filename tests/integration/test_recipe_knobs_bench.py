"""bench/ot_pairing.py --tiny runs (the in-process recipe-knob tests: tests/unit/test_recipe_knobs.py)."""

import os


def test_ot_bench_tiny_runs():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(repo / "bench" / "ot_pairing.py"), "--tiny", "--reps", "2"], cwd=repo,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4 and all(float(row.split("|")[6]) > 0 for row in rows)  # total ms
    assert float(rows[-1].split("|")[8]) > 0  # batch 8, ot_l2: the assignment beats the identity
