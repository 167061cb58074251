"""The tiny run on a real local SLURM cluster (tests/slurm_cluster.py): 2 "nodes" x 1 process, HSDP across them.

1. `sbatch --nodes 2 slurm/train.sbatch CONFIG ...` finishes; its step-6 checkpoint is the reference for the others.
   The run dir contains spaces, `;` and `$(...)`: arguments reach the training verbatim, no shell runs them.
2. The same job, `scontrol requeue`d once training runs: SIGTERM -> checkpoint -> requeue -> resume, and every tensor
   equals the reference.
3. `dedistill submit --nodes 2` (submitit) of the same run, preempted by a job in the higher-priority partition: USR1
   -> checkpoint -> requeue -> resume, equal to the reference (without HSDP: on 2 x 1 ranks HSDP's arithmetic is
   FSDP's, bitwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import tiny_runs

pytestmark = pytest.mark.slow
SBATCH = tiny_runs.REPO / "slurm" / "train.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
HOSTILE = "run with spaces; touch PWNED $(touch PWNED2)"


def _sbatch(cluster, cwd, run_dir, model, data, **extra) -> str:
    args = tiny_runs.overrides(model, data, run_dir, **{"parallel.hsdp": "true", **extra})
    # PYTHON: the job inherits this environment, but pytest may run from an unactivated venv
    r = cluster.cmd("sbatch", "--parsable", "--nodes", "2", str(SBATCH), str(tiny_runs.CONFIG), *args, cwd=cwd,
                    env=_job_env(PYTHON=sys.executable))
    return r.stdout.strip().split(";")[0]


def _job_env(**extra) -> dict:
    """The environment jobs inherit. RDZV_PORT: a free port rather than 29500 + job id, so that test sessions
    running side by side on one machine (each with its own cluster) never share a rendezvous port."""
    from slurm_cluster import _free_ports

    return tiny_runs.env(RDZV_PORT=str(_free_ports(1)[0]), **extra)


def _logs(cwd, job_id) -> str:
    files = sorted((cwd / "slurm-logs").glob(f"*-{job_id}/*.log")) + sorted(cwd.glob(f"*-{job_id}.out"))
    return "\n".join(f"==> {f.name}\n{f.read_text(errors='replace')}" for f in files)


def _training_started(log_glob) -> bool:
    """Rank 0 printed its start line: every rank's SIGTERM/USR1 handler is installed by then (it is installed before
    setup), so a signal from now on checkpoints instead of killing; and the 6 steps are still ahead."""
    return any("fresh start" in p.read_text(errors="replace") for p in log_glob())


def _finished(cluster, job_id, cwd, timeout=240) -> dict:
    info = cluster.wait_state(job_id, DONE, timeout)
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{_logs(cwd, job_id)[-6000:]}"
    return info


@pytest.fixture(scope="module")
def slurm_reference(slurm_cluster, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sbatch")
    run_dir = cwd / HOSTILE
    job = _sbatch(slurm_cluster, cwd, run_dir, tiny_model_dir, tiny_data_dir)
    info = _finished(slurm_cluster, job, cwd)
    return cwd, job, run_dir, info


def test_sbatch_two_nodes_hsdp_finishes(slurm_reference):
    cwd, job, run_dir, info = slurm_reference
    assert info["NumNodes"] == "2" and info["Restarts"] == "0"
    assert (tiny_runs.ckpt(run_dir, tiny_runs.STEPS) / "COMPLETE").is_file()
    assert not list(cwd.rglob("PWNED*")) and not list(tiny_runs.REPO.glob("PWNED*")), "an argument was run by a shell"
    node_logs = sorted((cwd / "slurm-logs" / f"dedistill-{job}").glob("attempt0-node*.log"))
    assert [p.name for p in node_logs] == ["attempt0-node0.log", "attempt0-node1.log"]
    log = _logs(cwd, job)
    assert "world=2" in log and "backend=fsdp2-hsdp(2x1)" in log and "fresh start" in log
    assert "rendezvous 127.0.0.1:" in log  # the first node's NodeAddr, not its (unresolvable) name


def test_scontrol_requeue_resumes_bitwise(slurm_cluster, slurm_reference, tiny_model_dir, tiny_data_dir, tmp_path):
    _, _, ref_dir, _ = slurm_reference
    run_dir = tmp_path / "requeued"
    job = _sbatch(slurm_cluster, tmp_path, run_dir, tiny_model_dir, tiny_data_dir)
    logs = lambda: (tmp_path / "slurm-logs").glob(f"*-{job}/attempt0-node*.log")  # noqa: E731
    tiny_runs.wait_until(lambda: _training_started(logs), 180, "training to start")
    slurm_cluster.cmd("scontrol", "requeue", job)
    info = _finished(slurm_cluster, job, tmp_path)
    log = _logs(tmp_path, job)
    assert info["Restarts"] == "1", log[-6000:]
    assert "SIGTERM: SLURM is stopping the job" in log and "stop signal: checkpoint saved at step" in log
    assert "SignalException" not in log  # the torchrun agents ignored the SIGTERM and waited for the save
    assert "resumed from" in log and "attempt1-node0.log" in log
    tiny_runs.assert_same_state(tiny_runs.ckpt(ref_dir, tiny_runs.STEPS), tiny_runs.ckpt(run_dir, tiny_runs.STEPS))


def test_dedistill_submit_preempted_resumes_bitwise(slurm_cluster, slurm_reference, tiny_model_dir, tiny_data_dir,
                                                    tmp_path):
    _, _, ref_dir, _ = slurm_reference
    run_dir = tmp_path / HOSTILE
    cmd = [sys.executable, "-m", "launch", "submit", str(tiny_runs.CONFIG), "--nodes", "2", "--name", "tiny; true",
           "--signal-grace", "30", *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir)]
    r = slurm_cluster.cmd(*cmd, cwd=tmp_path, env=_job_env())
    assert "slurm job" in r.stdout, r.stdout + r.stderr
    job = r.stdout.split("slurm job ")[1].split(":")[0]
    assert slurm_cluster.cmd("squeue", "-h", "-j", job, "-o", "%j").stdout.strip() == "tiny; true"

    task_logs = lambda: (run_dir / "submitit").glob(f"{job}/*_log.out")  # noqa: E731
    tiny_runs.wait_until(lambda: _training_started(task_logs), 180, "training to start")
    # A whole-cluster job in the higher-priority partition preempts ours (PreemptMode=REQUEUE, GraceTime=10).
    slurm_cluster.cmd("sbatch", "--parsable", "--partition", "high", "--nodes", "2", "--exclusive",
                      "--output", str(tmp_path / "high-%j.out"), "--wrap", "sleep 1", cwd=tmp_path)
    info = _finished(slurm_cluster, job, tmp_path, timeout=300)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "submitit").rglob("*_log.*")))
    assert int(info["Restarts"]) >= 1, logs[-6000:]
    assert "Caught signal SIGUSR1" in logs and "stop signal: checkpoint saved at step" in logs
    assert "resumed from" in logs
    assert not list(tmp_path.rglob("PWNED*"))
    tiny_runs.assert_same_state(tiny_runs.ckpt(ref_dir, tiny_runs.STEPS), tiny_runs.ckpt(run_dir, tiny_runs.STEPS))


def test_submit_without_slurm_ran_the_reference_locally(reference_run):
    """`dedistill submit --cluster local` (no SLURM) produced the reference run: submitit's job folder, the torchrun
    command it ran, a complete final checkpoint."""
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((reference_run / "submitit").rglob("*_log.out")))
    assert "launch.torchrun" in logs and "--standalone" in logs and "--nproc-per-node=2" in logs
    assert (tiny_runs.ckpt(reference_run, tiny_runs.STEPS) / "COMPLETE").is_file()
    # submitit's local job process would mkdir a folder named by the unexpanded "%j" tag: none may be left
    assert not [p for p in (reference_run / "submitit").rglob("*") if "%" in p.name]


def test_submit_where_sbatch_exists_but_no_cluster_answers(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                           capsys):
    """`dedistill submit CONFIG` in its documented form on a machine with the SLURM client but no configured
    cluster: one line that points to --cluster local, no submitit traceback, no sbatch noise."""
    import os
    import shutil

    from launch.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("sbatch")
    if real and not Path("/etc/slurm/slurm.conf").exists():
        # the real client with no configuration at all (SLURM_CONF unset, no default file): it looks for a controller
        # in DNS SRV records and fails at once. (A SLURM_CONF naming a missing file would instead make sbatch retry
        # the stat for 60 s; glibc's 5 s x 2 tries per DNS lookup are cut to one 1 s try.)
        monkeypatch.delenv("SLURM_CONF", raising=False)
        monkeypatch.setenv("RES_OPTIONS", "timeout:1 attempts:1")
    else:  # what Debian's sbatch 22.05 prints without a slurm.conf or a DNS SRV record
        (bin_dir / "sbatch").write_text(
            "#!/bin/sh\necho 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host' >&2\n"
            "echo 'sbatch: error: fetch_config: DNS SRV lookup failed' >&2\n"
            "echo 'sbatch: fatal: Could not establish a configuration source' >&2\nexit 1\n")
        (bin_dir / "sbatch").chmod(0o755)
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # the client package ships both
        (bin_dir / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["submit", str(tiny_runs.CONFIG), "--nodes", "1", *tiny_runs.overrides(tiny_model_dir, tiny_data_dir,
                                                                                    run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("dedistill: error: --cluster: sbatch failed (sbatch: ") and "--cluster local" in err[0]


def test_submit_and_export_cli_surface():
    """The options docs/cluster.md and DESIGN.md promise (a rename must update them)."""
    import argparse

    from launch.cli import _load_extensions, build_parser

    _load_extensions()  # every subcommand (a command run in this process before may have registered only its own)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    assert {"--nodes", "--gpus-per-node", "--nproc-per-node", "--partition", "--time", "--account", "--qos", "--name",
            "--cpus-per-task", "--mem-gb", "--signal-grace", "--sbatch", "--cluster", "--wait"} <= options["submit"]
    assert {"--checkpoint", "--out", "--format", "--dtype", "--ema"} <= options["export"]

