"""Preemption and crashes on 2 gloo ranks, ending bitwise equal to the uninterrupted reference run.

One run, three starts:
1. SIGKILL (kill -9, every process) while the step-4 checkpoint is being written: its shards and metadata are on
   disk, its COMPLETE marker is not. The step-2 checkpoint must stay the one that counts.
2. The restart resumes from step 2 — not from the half-written step 4 — and gets SIGTERM (what SLURM sends on
   requeue, preemption or scancel) right after it resumed: every rank finishes its step, a checkpoint is saved, the
   job exits 0 with `stopped_by_signal`.
3. The next start resumes from that checkpoint and trains to step 6: every tensor equals the reference's.
"""

import signal
import subprocess

import pytest

import tiny_runs

pytestmark = pytest.mark.slow


def _popen(cmd):
    return subprocess.Popen(cmd, cwd=tiny_runs.REPO, env=tiny_runs.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _read_until(proc, needle: str, lines: list[str]) -> str:
    for line in proc.stdout:  # the reader blocks; the job prints the needle within seconds or dies
        lines.append(line)
        if needle in line:
            return line
    raise AssertionError(f"process ended before printing {needle!r}:\n{''.join(lines)[-4000:]}")


def test_kill_mid_save_then_sigterm_then_resume_is_bitwise(tiny_model_dir, tiny_data_dir, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = [tiny_runs.CONFIG, *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir)]
    ckpts = run_dir / "checkpoints"

    # 1. killed in the middle of saving step 4
    proc = _popen(tiny_runs.torchrun_cmd("4", *args, script=str(tiny_runs.REPO / "tests" / "_slow_save_train.py")))
    lines: list[str] = []
    try:
        _read_until(proc, "SHARDS_WRITTEN", lines)
    finally:
        tiny_runs.kill_tree(proc)
    half = tiny_runs.ckpt(run_dir, 4)
    assert (half / ".metadata").is_file() and list(half.glob("*.distcp")), "the save was killed too early"
    assert not (half / "COMPLETE").exists()
    from train.checkpoint import latest_checkpoint

    assert latest_checkpoint(ckpts) == tiny_runs.ckpt(run_dir, 2)

    # 2. restart: resumes from step 2, then SIGTERM to the training processes (as SLURM delivers it)
    proc = _popen(tiny_runs.torchrun_cmd(*args))
    lines = []
    try:
        resumed = _read_until(proc, "resumed from", lines)
        tiny_runs.signal_tree(proc, signal.SIGTERM, include_root=False)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            tiny_runs.kill_tree(proc)
    out = "".join(lines) + out
    assert resumed.rstrip().endswith("step_00000002"), resumed
    assert proc.returncode == 0, out[-4000:]
    assert "stop signal: checkpoint saved at step" in out, out[-4000:]
    stopped_at = int(out.split("stop signal: checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= stopped_at < tiny_runs.STEPS
    assert (tiny_runs.ckpt(run_dir, stopped_at) / "COMPLETE").is_file()

    # 3. the next start finishes the run; the half-written step-4 dir was replaced by a complete one
    r = tiny_runs.run(tiny_runs.torchrun_cmd(*args))
    assert f"step_{stopped_at:08d}" in r.stdout and "resumed from" in r.stdout
    assert (tiny_runs.ckpt(run_dir, 4) / "COMPLETE").is_file()
    tiny_runs.assert_same_state(tiny_runs.ckpt(reference_run, tiny_runs.STEPS), tiny_runs.ckpt(run_dir, tiny_runs.STEPS))


def test_train_sbatch_requeues_itself_on_usr1_and_leaves_sigterm_to_slurm(tmp_path):
    """slurm/train.sbatch's one requeue path, with fake srun/scontrol/scancel (no SLURM needed): on USR1 (time limit
    near) it forwards the signal to the job steps, waits for the training to exit, then `scontrol requeue`s itself;
    on SIGTERM (SLURM is requeueing, preempting or cancelling) it waits and does not requeue."""
    import os
    import time

    from test_security_cli import fake_slurm

    script = tiny_runs.REPO / "slurm" / "train.sbatch"
    for sig, requeues in ((signal.SIGUSR1, 1), (signal.SIGTERM, 0)):
        work = tmp_path / sig.name
        work.mkdir()
        env = {**fake_slurm(work), "FAKE_SRUN_WAIT": "1"}
        proc = subprocess.Popen(["bash", str(script), "cfg.yaml"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        srun_pid = tiny_runs.wait_until(lambda: (work / "srun.pid").is_file() and (work / "srun.pid").read_text(),
                                        30, "the fake srun")
        time.sleep(0.3)  # the batch shell reaches `wait`
        os.kill(proc.pid, sig)
        if sig == signal.SIGTERM:  # SLURM signals every process of the job, srun included
            os.kill(int(srun_pid), signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        log = (work / "scontrol.log").read_text()
        assert proc.returncode == 0, out
        assert log.count("requeue 1234") == requeues, (sig.name, log, out)
        assert (work / "srun.signals").read_text().split() == [sig.name.removeprefix("SIG")], out
        if sig == signal.SIGUSR1:
            assert (work / "scancel.log").read_text().split() == ["--signal=USR1", "1234"]


WORKER = """
import os, signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)  # a checkpoint being written
    open(sys.argv[1] + "." + signal.Signals(signum).name, "w").close()
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_launch_torchrun_agent_outlives_the_workers_checkpoint(tmp_path, sig):
    """SLURM signals every process of a step. Stock torchrun dies on USR1 and, on TERM, kills its workers; the agent
    of `python -m launch.torchrun` ignores both, so the worker finishes its 'checkpoint' and everything exits 0."""
    import os
    import sys

    script, marker = tmp_path / "worker.py", tmp_path / "w"
    script.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=1",
                             str(script), str(marker)], cwd=tiny_runs.REPO, env=tiny_runs.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tiny_runs.wait_until(lambda: marker.with_suffix(".ready").exists(), 120, "the worker")
        tiny_runs.signal_tree(proc, sig)  # agent and worker, as SLURM does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            tiny_runs.kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    assert os.path.exists(f"{marker}.{sig.name}"), out[-3000:]
