"""`make demo`'s training command is the one docs/quickstart.md shows it running (the demo itself runs end to end in
tests/system/test_docs_commands.py's `make demo` case)."""

import shlex
import sys
from pathlib import Path

from doc_commands import collect
from evals.experiments.demo import REPO, train_command

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
