"""torchrun for SLURM jobs, and the torchrun arguments a SLURM allocation implies.

`python -m launch.torchrun [torchrun args] -m train CONFIG.yaml [a.b=value ...]` is `torchrun` (the same
`torch.distributed.run.main`), except that its agent process ignores SIGUSR1 and SIGTERM:

SLURM signals every process of a job step — the time-limit warning (`--signal=USR1@T`, or the batch script
forwarding it with `scancel --signal=USR1`), `scontrol requeue`, preemption and `scancel` (SIGTERM). The training
processes handle those signals themselves (train/trainer.py `StopFlag`: finish the step, agree across ranks, save a
checkpoint, exit 0). The agent has to outlive that save: by default SIGUSR1 kills it outright, and on SIGTERM it
SIGKILLs its workers after 30 s, possibly in the middle of a checkpoint. Ignoring both leaves the deadline to SLURM
(KillWait, or the partition's GraceTime on preemption). The workers install their own handlers at start.

Restarts: unless the command line gives `--max-restarts`, the agent restarts the worker group up to the config's
`parallel.max_restarts` times (read from the `-m train CONFIG [a.b=value ...]` it launches), so the sbatch script and
`dedistill submit` take it from the config with everything else. After a worker dies (SIGKILL, OOM, a GPU off the
bus) the agent stops the others and starts the group again on the same nodes, within the allocation; every start
resumes from the newest complete checkpoint. A rank that hangs is ended by `parallel.timeout_s` (train/parallelize.py).

`slurm_torchrun_args()` builds the rendezvous arguments for one torchrun per node from the SLURM environment (used by
`dedistill submit`; slurm/train.sbatch spells out the same steps in bash). The rendezvous host is the first node's
`NodeAddr` from `scontrol show node`: node names need not resolve, NodeAddr is what slurmd itself connects to.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Mapping

from launch.cli import _preset, print_error
from train.config import load_config

DEFAULT_RDZV_PORT_BASE = 29500


def first_node(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def node_addr(node: str) -> str:
    out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        raise RuntimeError(f"`scontrol show node {node}` printed no NodeAddr:\n{out}")
    return m.group(1)


def rdzv_port(job_id: str, env: Mapping[str, str]) -> int:
    """A port per job (same after a requeue): RDZV_PORT, or 29500 + job id mod 1000."""
    if env.get("RDZV_PORT"):
        return int(env["RDZV_PORT"])
    return DEFAULT_RDZV_PORT_BASE + int(job_id) % 1000


def slurm_torchrun_args(nproc_per_node: int, env: Mapping[str, str] | None = None) -> list[str]:
    """torchrun arguments for this node of a SLURM job: one torchrun per node, c10d rendezvous on the first node."""
    env = os.environ if env is None else env
    job_id = env["SLURM_JOB_ID"]
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    head = node_addr(first_node(env["SLURM_JOB_NODELIST"]))
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{rdzv_port(job_id, env)}",
        f"--rdzv-id={job_id}",
    ]


def standalone_torchrun_args(nproc_per_node: int) -> list[str]:
    return ["--standalone", f"--nproc-per-node={nproc_per_node}"]


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, target): the target starts at `-m`/`--module` (then the module name and its arguments)."""
    for i, a in enumerate(args):
        if a in ("-m", "--module"):
            return args[:i], args[i + 1:]
    return args, []


def config_max_restarts(args: list[str]) -> int | None:
    """`parallel.max_restarts` of the job a torchrun command line starts (`-m train CONFIG [a.b=value ...]` or
    `-m launch train ...`); None when the line gives `--max-restarts` itself or starts something else."""
    options, target = _split(args)
    if any(a.startswith(("--max-restarts", "--max_restarts")) for a in options):
        return None
    if target[:1] == ["train"]:
        job = target[1:]
    elif target[:2] == ["launch", "train"]:
        job = target[2:]
    else:
        return None
    if not job:
        return None
    return load_config(_preset(job[0]), job[1:]).parallel.max_restarts


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The agent installs its own handlers when it starts the workers, for the signals in --signals-to-handle
    # (default SIGTERM,SIGINT,SIGHUP,SIGQUIT): leave SIGTERM out so the SIG_IGN above stays; Ctrl-C still stops it.
    # Imported after the SIG_IGN above: torch takes seconds to import, and a TERM meanwhile must not kill the agent.
    from torch.distributed.run import main as torchrun_main

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        restarts = config_max_restarts(args)
    except ValueError as e:  # the same one-line error `dedistill train` would give, before any worker starts
        print_error(e)
        raise SystemExit(2) from None
    extra = [f"--max-restarts={restarts}"] if restarts is not None else []
    # By default the workers' process groups live in the rendezvous' own TCPStore, which outlives a restart with the
    # old group's keys in it: a restarted rank can read a dead peer's address and fail to connect (pytorch#135712,
    # seen here with gloo). Opting out gives every round a fresh store, hosted by its rank 0.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    torchrun_main(["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *extra, *args])


if __name__ == "__main__":
    main()
