"""bench/data_throughput.py in its tiny mode (a few seconds): it runs, and its tables hold sane numbers."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tables(text: str) -> dict[str, list[dict]]:
    out, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            out[title] = []
        elif line.startswith("|") and title and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                out[title].append(dict(zip(header, cells)))
    return out


def test_data_throughput_bench_tiny():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "data_throughput.py"), "--tiny"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    t = tables(r.stdout)
    (check,) = [v for k, v in t.items() if k.startswith("image check")]
    assert [row["format"] for row in check] == ["JPEG", "PNG", "WEBP"]
    assert all(float(row["--check full"]) > 0 for row in check)
    (conv,) = [v for k, v in t.items() if k.startswith("convert")]
    assert [int(row["workers"]) for row in conv] == [1, 2] and all(float(row["samples/s"]) > 0 for row in conv)
    (loader,) = [v for k, v in t.items() if k.startswith("training loader")]
    assert len(loader) == 2 and all(float(row["samples/s per worker"]) > 0 for row in loader)
    (size,) = [v for k, v in t.items() if k.startswith("bytes per sample")]
    by_col = {row["column"]: row for row in size}
    assert by_col["T5 padded to 512 (bf16)"]["MiB/sample"] == "4.00"  # 512 x 4096 x 2 bytes
    assert by_col["T5 unpadded, 80 tokens (bf16)"]["MiB/sample"] == "0.625"
