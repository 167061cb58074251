"""The run directory's layout, in one place: every module that reads or writes a run asks `RunDir` for its paths.

```
<run>/config.yaml                          resolved config, written once at the first start
<run>/config.resumed_step_<N:08d>.yaml     the config of a resume that changed it (the original stays)
<run>/checkpoints/step_<N:08d>/            DCP shards; counts only once its completion marker exists
<run>/checkpoints/step_<N:08d>.corrupt     a checkpoint a resume found bad and moved aside
<run>/evals/step_<N:08d>/<suite>/          metrics.json, grids (evals/suite.py); evals/submitit/ the eval jobs
<run>/samples/grid_step_<N:08d>.png        the end-of-run CFG grid
<run>/tb/                                  TensorBoard events
<run>/plots/                               loss and FID plots (evals/report.py)
<run>/submitit/                            the training job's own submitit folder (launch/submit.py)
```
"""

from __future__ import annotations

import re
from pathlib import Path

_STEP = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    """The directory name of step `step`: `step_<N:08d>` (checkpoints and evals alike)."""
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a `step_<N:08d>` name, None for any other name (`step_<N>.corrupt` included)."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def checkpoint_step(path: str | Path) -> int:
    """The step of checkpoint dir `path`; ValueError when its name is not `step_<N:08d>`."""
    step = parse_step(Path(path).name)
    if step is None:
        raise ValueError(f"'{path}' is not a checkpoint dir (step_<N:08d>)")
    return step


def is_checkpoint_dir(path: str | Path) -> bool:
    path = Path(path)
    return parse_step(path.name) is not None and path.is_dir()


def step_dirs(folder: str | Path) -> list[tuple[int, Path]]:
    """Every `step_<N:08d>` directory directly in `folder` (a run's checkpoints/), complete or not, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in folder.iterdir()]
    return sorted((s, p) for s, p in found if s is not None and p.is_dir())


class RunDir:
    """One run's directory. Paths only: nothing here creates, reads or checks a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir":
        """The run a checkpoint dir (`<run>/checkpoints/step_N`) belongs to."""
        return cls(Path(path).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def resumed_config(self, step: int) -> Path:
        return self.root / f"config.resumed_{step_name(step)}.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Every `checkpoints/step_<N:08d>` directory, complete or not, by step."""
        return step_dirs(self.checkpoints)

    def checkpoint_entries(self) -> list[Path]:
        """Every directory under checkpoints/ that is a step dir or a quarantined one (`step_N.corrupt`), by name."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step_"))

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    def eval_dir(self, step: int, suite: str) -> Path:
        """`suite`: the suite's directory name (evals/suite.py `suite_dirname`)."""
        return self.evals / step_name(step) / suite

    def eval_files(self, name: str) -> list[Path]:
        """`evals/step_N/<suite>/<name>` of every eval of the run, by step then suite."""
        return sorted(self.evals.glob(f"step_*/*/{name}"))

    @property
    def eval_jobs(self) -> Path:
        return self.evals / "submitit"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def grid(self, step: int) -> Path:
        return self.samples / f"grid_{step_name(step)}.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def jobs(self) -> Path:
        return self.root / "submitit"
