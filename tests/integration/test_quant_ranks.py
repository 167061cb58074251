"""FSDP2 on two ranks keeps quantized Linears whole (the in-process quant tests: tests/unit/test_quant.py)."""

import json

import pytest

import tiny_runs
from test_quant import LOSS_RTOL, REPO


@pytest.mark.slow
def test_fsdp2_two_ranks_keeps_quantized_linears_whole(tiny_model_dir, tiny_data_dir, tmp_path):
    """2 gloo ranks: the quantized Linears are whole on each rank, everything else sharded in halves, and the int8
    run's losses stay within LOSS_RTOL of the unquantized run's (fp32 on CPU)."""
    r = tiny_runs.run(tiny_runs.torchrun_cmd(tiny_model_dir, tiny_data_dir, tmp_path / "runs",
                                             script=str(REPO / "tests" / "_quant_shard_check.py")))
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert res["whole"] > 20 and res["sharded"] > 100
    assert len(res["none"]) == len(res["int8"]) == 4
    for a, b in zip(res["none"], res["int8"]):
        assert abs(b - a) <= LOSS_RTOL["int8"] * abs(a), res
