"""A real, throw-away SLURM cluster on this machine: munged + slurmctld + two slurmd "nodes" on localhost.

Used by the tests (the `slurm_cluster` fixture in tests/conftest.py) and runnable by hand:

    python tests/slurm_cluster.py start   # prints `export SLURM_CONF=...`; the cluster stays up
    python tests/slurm_cluster.py stop BASE_DIR

Setup follows the verified recipe in shared/notes/local-slurm.md (Debian's slurm-wlm 22.05 and munge): no cgroups,
no accounting, ProctrackType=proctrack/linuxproc. Everything lives in one temporary base directory; daemons are
stopped by the PIDs in their pid files — never by name, since other clusters may run on the same machine.

When the binaries are missing and we are root with apt, `ensure_installed()` installs the four Debian packages
(about 7 s after `apt-get update`); otherwise it returns the reason the caller should skip with.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    extra = ["/usr/sbin"]  # daemons live in sbin, which a non-login PATH may lack
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed() -> str | None:
    """Install SLURM + munge from Debian packages if needed. Returns None when ready, else why it cannot be."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"SLURM binaries missing ({', '.join(missing_binaries())}) and not root, so cannot apt-get install them"
    if shutil.which("apt-get") is None:
        return f"SLURM binaries missing ({', '.join(missing_binaries())}) and no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    )
    for cmd in steps:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd)}` failed (rc {r.returncode}): {' | '.join(tail)}"
    if missing_binaries():
        return f"installed {PACKAGES} but still missing {missing_binaries()}"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


SLURM_CONF = """\
ClusterName=dedistilltest
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket.2,cred_expire={cred_expire}
StateSaveLocation={base}/state/ctld
SlurmdSpoolDir={base}/state/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={base}/log/jobcomp.txt
ReturnToService=2
MinJobAge=300
KillWait=30
SchedulerParameters=batch_sched_delay=0,bf_interval=2,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=n[1-{nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port_lo}-{node_port_hi}] CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


@dataclass
class LocalSlurmCluster:
    base: Path
    nodes: int = 2
    cpus: int = 2
    cred_expire: int = 5
    """Also the delay before a requeued job may start again (minimum 5 s)."""
    env: dict = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket.2"

    def pid_files(self) -> list[Path]:
        run = self.base / "run"
        return [*(run / f"slurmd-n{i}.pid" for i in range(1, self.nodes + 1)), run / "slurmctld.pid", run / "munged.pid"]

    # ------------------------------------------------------------------------------------------------------ start

    def start(self, timeout: float = 60.0) -> "LocalSlurmCluster":
        base = self.base
        for d in ("etc", "run", "log", "state/ctld", *(f"state/spool/n{i}" for i in range(1, self.nodes + 1))):
            (base / d).mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # munged refuses group/world-writable directories; user munge must traverse it
        munge_dir = base / "munge"
        munge_dir.mkdir(exist_ok=True)
        shutil.chown(munge_dir, "munge", "munge")
        os.chmod(munge_dir, 0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
        # munged writes its pid file as user munge: give it a directory it owns, then link it into run/
        self._run(
            ["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
        )
        self._wait(lambda: (munge_dir / "munged.pid").is_file() and self.munge_socket.exists(), timeout, "munged")
        shutil.copy(munge_dir / "munged.pid", base / "run" / "munged.pid")

        (ctld_port,) = _free_ports(1)
        # slurmd ports must be a contiguous range; find one that is free on loopback
        node_lo = self._free_range(self.nodes)
        self.conf.write_text(
            SLURM_CONF.format(
                base=base, ctld_port=ctld_port, nodes=self.nodes, node_port_lo=node_lo,
                first_job_id=random.randrange(1000, 900_000),  # clusters started side by side get distinct ids
                node_port_hi=node_lo + self.nodes - 1, cpus=self.cpus, cred_expire=self.cred_expire,
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = self.env.get("PATH", "") + os.pathsep + "/usr/sbin"
        self._run(["slurmctld", "-i", "-f", str(self.conf)])
        for i in range(1, self.nodes + 1):
            self._run([*self._private_shm(), "slurmd", "-N", f"n{i}", "-f", str(self.conf)])
        self._wait(self._all_idle, timeout, "nodes to become idle")
        return self

    @staticmethod
    def _private_shm() -> list[str]:
        """Start a slurmd with its own /dev/shm (a mount namespace), as if each node were its own host.

        Without it, two "nodes" on one host share /dev/shm, and libraries that keep one shared-memory registry per
        host collide (MosaicML Streaming's node leaders both claim the same prefix: FileExistsError '/000000_locals').
        Jobs inherit the namespace from their slurmd. Falls back to the shared /dev/shm where unshare is refused.
        """
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm"],
            capture_output=True, timeout=30,
        ) if shutil.which("unshare") else None
        if probe is None or probe.returncode != 0:
            return []
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm && exec "$@"', "sh"]

    @staticmethod
    def _free_range(n: int) -> int:
        for _ in range(50):
            (lo,) = _free_ports(1)
            if lo + n > 65535:
                continue
            try:
                socks = []
                for p in range(lo, lo + n):
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", p))
                return lo
            except OSError:
                continue
            finally:
                for s in socks:
                    s.close()
        raise RuntimeError("no free contiguous port range for slurmd")

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run(cmd, env=self.env or {**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin"},
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed (rc {r.returncode}): {r.stderr.strip()}\n{self.logs()}")

    def _all_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = {}
        for line in r.stdout.split("\n"):
            if line.strip():
                name, state = line.split()
                states[name] = state
        return len(states) == self.nodes and all(s == "idle" for s in states.values())

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for f in sorted([*(self.base / "log").glob("*.log"), *(self.base / "munge").glob("*.log")]):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------------------------------------ job helpers

    def cmd(self, *args: str, check: bool = True, cwd: str | Path | None = None, env: dict | None = None):
        r = subprocess.run(list(args), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=120,
                           cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{shlex_join(args)} failed (rc {r.returncode}): {r.stderr.strip()}")
        return r

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once the job is purged."""
        r = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        info = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s (last: {info.get('JobState')})\n"
                           f"{self.logs()}")

    # ------------------------------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """scancel what is left, then SIGTERM every daemon by the PID in its pid file, and wait for them to go."""
        if self.env:
            subprocess.run(["scancel", "--user", "root", "--full"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 45  # let slurmstepd end the jobs' processes (KillWait) while it still can
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        pids = []
        for f in self.pid_files():
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        # with proctrack/linuxproc a cancelled job's orphans survive it: the test fixture stops those by PID
        for pid in pids:
            _terminate(pid)
        deadline = time.monotonic() + 15
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                _terminate(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def shlex_join(args) -> str:
    import shlex

    return shlex.join([str(a) for a in args])


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="start/stop a throw-away local SLURM cluster")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--nodes", type=int, default=2)
    s = sub.add_parser("stop")
    s.add_argument("base")
    a = p.parse_args(argv)
    if a.cmd == "start":
        reason = ensure_installed()
        if reason:
            raise SystemExit(reason)
        base = Path(tempfile.mkdtemp(prefix="dedistill-slurm-"))
        LocalSlurmCluster(base, nodes=a.nodes).start()
        print(f"export SLURM_CONF={base / 'etc' / 'slurm.conf'}  # stop with: python {__file__} stop {base}")
    else:
        base = Path(a.base)
        nodes = len(list((base / "run").glob("slurmd-n*.pid")))
        cluster = LocalSlurmCluster(base, nodes=nodes)
        cluster.env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
        cluster.stop()


if __name__ == "__main__":
    main()
