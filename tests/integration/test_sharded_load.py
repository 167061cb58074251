"""Sharded loading (train/parallel/load.py): each rank reads only its rows, and the result is the same model."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_runs
from train.parallel.load import SafetensorsIndex, fill_sharded, file_key


SETTINGS = [
    ["model.adapter.kind=lokr"],
    ["model.adapter.kind=lora", "model.dtype=bf16"],
    ["model.adapter.kind=full"],
]


@pytest.mark.slow
def test_sharded_load_on_two_ranks_equals_from_pretrained(tiny_model_dir):
    """2 gloo ranks, each of SETTINGS in one launch: the gathered weights are bitwise `from_pretrained`'s (base) and the
    unsharded path's (adapter init), and each rank held only about half of every weight."""
    groups = [a for s in SETTINGS for a in ["--", *s]][1:]  # s0 -- s1 -- s2
    r = tiny_runs.run(tiny_runs.torchrun_cmd(tiny_model_dir, *groups,
                                             script=str(tiny_runs.REPO / "tests" / "_sharded_load_check.py")))
    lines = [x.split() for x in r.stdout.splitlines() if x.startswith("SHARDED_LOAD_OK")]
    assert [x[1] for x in lines] == [str(i) for i in range(len(SETTINGS))], r.stdout[-3000:]
    for _, group, n, local_rows, full_rows in lines:
        assert int(n) > 100, SETTINGS[int(group)]
        assert int(local_rows) == -(-int(full_rows) // 2), SETTINGS[int(group)]  # torch.chunk's split of dim 0


def test_read_rows_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(7, 5), "b": torch.randn(3, 4, 2).to(torch.bfloat16), "c": torch.arange(6.0),
               "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    index = SafetensorsIndex([tmp_path / "w.safetensors"])
    assert torch.equal(index.read_rows("a", 2, 6), tensors["a"][2:6])
    assert torch.equal(index.read_rows("b", 1, 3), tensors["b"][1:3])
    assert index.read_rows("b", 1, 3).dtype == torch.bfloat16
    assert torch.equal(index.read_rows("c", 5, 6), tensors["c"][5:6])
    assert index.read_rows("a", 7, 7).shape == (0, 5)
    assert torch.equal(index.read_rows("s", 0, 0), tensors["s"])
    assert load_file(str(tmp_path / "w.safetensors")).keys() == index.entries.keys()


def test_fill_names_the_mismatch(tmp_path):
    lin = torch.nn.Linear(4, 3)
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "extra": torch.zeros(1)},
              str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        fill_sharded(lin, SafetensorsIndex([tmp_path / "w.safetensors"]), {})
    save_file({"weight": torch.zeros(4, 4), "bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"'weight' has shape \(4, 4\)"):
        fill_sharded(lin, SafetensorsIndex([tmp_path / "w.safetensors"]), {})
    save_file({"weight": torch.ones(3, 4)}, str(tmp_path / "w.safetensors"))
    fill_sharded(lin, SafetensorsIndex([tmp_path / "w.safetensors"]), {"bias": torch.full((3,), 2.0)})
    assert torch.equal(lin.weight, torch.ones(3, 4)) and torch.equal(lin.bias, torch.full((3,), 2.0))
    assert file_key("blocks.0.attn.to_q.base_layer.weight") == "blocks.0.attn.to_q.weight"
