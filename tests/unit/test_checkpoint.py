"""CheckpointStore without a process group (a single process): completion marker, pruning, incomplete dirs."""

import json

import torch

from train.checkpoint import MARKER, CheckpointStore, latest_checkpoint
from train.config import CheckpointConfig


def test_keep_last_and_incomplete_checkpoints(tmp_path):
    ckpt = CheckpointStore(tmp_path, CheckpointConfig(every_steps=1, keep_last=2), rank=0)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": torch.full((3,), float(step))}, per_rank={"data": {"pos": step}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"]

    # a save killed before its marker: it never counts, and the older complete one is resumed
    broken = tmp_path / "checkpoints" / "step_00000004"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"

    state = {"w": torch.zeros(3)}
    torch.manual_seed(123)
    extras = ckpt.load(ckpt.latest(), state)
    assert torch.equal(state["w"], torch.full((3,), 3.0)) and extras["data"] == {"pos": 3}
    # the RNG state saved with step 3 was restored (it was the state at save time, not seed 123)
    assert extras["step"] == 3

    ckpt.save(5, {"w": torch.ones(3)}, per_rank={"data": None})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000005"]  # the incomplete step 4 was removed as debris
    assert (tmp_path / "checkpoints" / "step_00000005" / MARKER).is_file()


def test_rng_restored(tmp_path):
    ckpt = CheckpointStore(tmp_path, CheckpointConfig(), rank=0)
    torch.manual_seed(7)
    ckpt.save(1, {"w": torch.zeros(1)}, per_rank={})
    expected = torch.rand(4)
    torch.manual_seed(999)
    ckpt.load(ckpt.latest(), {"w": torch.zeros(1)})
    assert torch.equal(torch.rand(4), expected)


def test_loading_without_a_process_group_is_quiet(tmp_path, recwarn):
    """Every `dedistill sample/eval/export` loads a checkpoint in one process; DCP's "torch.distributed is disabled"
    UserWarning on each load is filtered (that exact message only), and the weights still arrive."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from train.checkpoint import safe_load

    dcp.save({"model": {"w": torch.arange(4.0)}}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    recwarn.clear()
    state = {"model": {"w": torch.zeros(4)}}
    safe_load(state, tmp_path / "c", no_dist=True)
    safe_load(state, tmp_path / "c")  # no process group and no_dist left False: DCP assumes one process
    assert torch.equal(state["model"]["w"], torch.arange(4.0))
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)], [str(w.message) for w in recwarn]
    assert not [f for f in warnings.filters if "torch" in str(f[1])], "the filter must not outlive the load"


def test_text_encoders_load_without_the_torch_dtype_deprecation(tiny_model_dir, capfd):
    """transformers 4.57 logs "`torch_dtype` is deprecated!" (once per process) when given torch_dtype."""
    from transformers.utils import logging as hf_logging

    from train.text import TextEncoder

    hf_logging.warning_once.cache_clear()  # a load earlier in this process must not hide it
    capfd.readouterr()
    TextEncoder(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    assert "deprecated" not in capfd.readouterr().err


def test_async_save_marks_complete_only_after_the_write_and_stages_a_copy(tmp_path):
    ckpt = CheckpointStore(tmp_path, CheckpointConfig(keep_last=2, async_save=True), rank=0)
    w = torch.full((1000,), 1.0)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": w}, per_rank={"data": {"pos": step}})
        path = tmp_path / "checkpoints" / f"step_{step:08d}"
        assert ckpt.pending is not None  # complete (marked by the writer thread) once wait/poll says so
        w.add_(1.0)  # the loop trains on while the write runs: the checkpoint must hold the staged values
        ckpt.wait()
        assert (path / MARKER).is_file() and ckpt.pending is None
        assert "__0_0.distcp" in json.loads((path / MARKER).read_text())["files"]  # the manifest, written last
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    state = {"w": torch.zeros(1000)}
    assert ckpt.load(ckpt.latest(), state)["data"] == {"pos": 3}
    assert torch.equal(state["w"], torch.full((1000,), 3.0))
