"""DeepSpeed ZeRO-2/3 on 2 gloo ranks (DS_ACCELERATOR=cpu): same objective, data and DCP checkpoint layout as FSDP2.

- ZeRO-2 resumes from the FSDP2 reference's step-2 checkpoint and trains to step 6: every tensor of its step-6
  checkpoint (weights, Adam moments, EMA, counters) equals the uninterrupted FSDP2 run bitwise — the layout is the
  same and so is the arithmetic.
- ZeRO-3 with activation checkpointing does the same (equal to FSDP2 up to fp32 rounding: the partitioned reductions
  may sum in another order), then a second ZeRO-3 run resumes from the first one's own step-4 checkpoint and ends
  bitwise equal to it.
"""

import shutil

import pytest

import tiny_runs

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")


def _start_from(reference_run, run_dir, step: int) -> None:
    src = tiny_runs.ckpt(reference_run, step)
    shutil.copytree(src, tiny_runs.ckpt(run_dir, step))


def test_zero2_continues_an_fsdp2_run_bitwise(tiny_model_dir, tiny_data_dir, reference_run, tmp_path):
    run_dir = tmp_path / "zero2"
    _start_from(reference_run, run_dir, 2)
    r = tiny_runs.train(tiny_model_dir, tiny_data_dir, run_dir, **{"parallel.backend": "deepspeed",
                                                                   "parallel.zero_stage": 2})
    assert "backend=deepspeed" in r.stdout and "resumed from" in r.stdout and "step_00000002" in r.stdout
    assert tiny_runs.ckpt(run_dir, 4).joinpath("COMPLETE").is_file()
    tiny_runs.assert_same_state(tiny_runs.ckpt(reference_run, 6), tiny_runs.ckpt(run_dir, 6))


def test_zero3_trains_saves_and_resumes_bitwise(tiny_model_dir, tiny_data_dir, reference_run, tmp_path):
    # with activation checkpointing: recompute must gather the partitioned weights again
    zero3 = {"parallel.backend": "deepspeed", "parallel.zero_stage": 3, "train.activation_checkpointing": "true"}
    first, second = tmp_path / "zero3_a", tmp_path / "zero3_b"
    _start_from(reference_run, first, 2)
    tiny_runs.train(tiny_model_dir, tiny_data_dir, first, **zero3)
    # the ZeRO-3 numbers are FSDP2's up to summation order
    tiny_runs.assert_same_state(tiny_runs.ckpt(reference_run, 6), tiny_runs.ckpt(first, 6), atol=1e-5)

    shutil.copytree(tiny_runs.ckpt(first, 4), tiny_runs.ckpt(second, 4))  # written by ZeRO-3 itself
    r = tiny_runs.train(tiny_model_dir, tiny_data_dir, second, **zero3)
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    end = tiny_runs.assert_same_state(tiny_runs.ckpt(first, 6), tiny_runs.ckpt(second, 6))
    start = tiny_runs.trainable_state(tiny_runs.ckpt(first, 4))
    assert any(not (end[k] == start[k]).all() for k in end if k.startswith("model.")), "ZeRO-3 steps changed nothing"
