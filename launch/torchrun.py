"""torchrun for SLURM jobs, and the torchrun arguments a SLURM allocation implies.

`python -m launch.torchrun [torchrun args] -m train CONFIG.yaml [a.b=value ...]` is `torchrun` (the same
`torch.distributed.run.main`), except that its agent process ignores SIGUSR1 and SIGTERM:

SLURM signals every process of a job step — the time-limit warning (`--signal=USR1@T`, or the batch script
forwarding it with `scancel --signal=USR1`), `scontrol requeue`, preemption and `scancel` (SIGTERM). The training
processes handle those signals themselves (train/loop.py `StopFlag`: finish the step, agree across ranks, save a
checkpoint, exit 0). The agent has to outlive that save: by default SIGUSR1 kills it outright, and on SIGTERM it
SIGKILLs its workers after 30 s, possibly in the middle of a checkpoint. Ignoring both leaves the deadline to SLURM
(KillWait, or the partition's GraceTime on preemption). The workers install their own handlers at start.

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
        "--max-restarts=0",
    ]


def standalone_torchrun_args(nproc_per_node: int) -> list[str]:
    return ["--standalone", f"--nproc-per-node={nproc_per_node}"]


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The agent installs its own handlers when it starts the workers, for the signals in --signals-to-handle
    # (default SIGTERM,SIGINT,SIGHUP,SIGQUIT): leave SIGTERM out so the SIG_IGN above stays; Ctrl-C still stops it.
    from torch.distributed.run import main as torchrun_main

    args = sys.argv[1:] if argv is None else list(argv)
    torchrun_main(["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *args])


if __name__ == "__main__":
    main()
