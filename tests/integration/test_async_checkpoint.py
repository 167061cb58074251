"""`checkpoint.async_save`: DCP's async save on 2 gloo ranks ends bitwise equal to the synchronous reference run, and
a kill while an async save is being written leaves the previous checkpoint the one that counts."""

import json
import subprocess

import pytest

import tiny_runs

pytestmark = pytest.mark.slow


def test_async_run_is_bitwise_the_sync_reference(tiny_model_dir, tiny_data_dir, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    r = tiny_runs.train(tiny_model_dir, tiny_data_dir, run_dir, **{"checkpoint.async_save": "true"})
    assert "(async)" in r.stdout
    for step in range(tiny_runs.EVERY, tiny_runs.STEPS + 1, tiny_runs.EVERY):
        marker = json.loads((tiny_runs.ckpt(run_dir, step) / "COMPLETE").read_text())
        assert marker["async_save"] is True and marker["blocked_s"] <= marker["seconds"]
        tiny_runs.assert_same_state(tiny_runs.ckpt(reference_run, step), tiny_runs.ckpt(run_dir, step))


def test_kill_during_async_save_keeps_previous_checkpoint_then_resume_is_bitwise(
    tiny_model_dir, tiny_data_dir, reference_run, tmp_path
):
    run_dir = tmp_path / "run"
    args = [tiny_runs.CONFIG, *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir, **{
        "checkpoint.async_save": "true"})]
    slow = str(tiny_runs.REPO / "tests" / "_slow_save_train.py")
    proc = subprocess.Popen(tiny_runs.torchrun_cmd("4", *args, script=slow),
                            cwd=tiny_runs.REPO, env=tiny_runs.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # the background writer of step 4 has written its shards, then stalls
            lines.append(line)
            if "SHARDS_WRITTEN" in line:
                break
        else:
            raise AssertionError("".join(lines)[-4000:])
        assert any("checkpoint step 4: loop blocked" in x for x in lines)  # the loop had already moved on
    finally:
        tiny_runs.kill_tree(proc)
    half = tiny_runs.ckpt(run_dir, 4)
    assert (half / ".metadata").is_file() and not (half / "COMPLETE").exists()
    from train.checkpoint import latest_checkpoint

    assert latest_checkpoint(run_dir / "checkpoints") == tiny_runs.ckpt(run_dir, 2)

    r = tiny_runs.run(tiny_runs.torchrun_cmd(*args))
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout
    final = tiny_runs.STEPS
    tiny_runs.assert_same_state(tiny_runs.ckpt(reference_run, final), tiny_runs.ckpt(run_dir, final))
