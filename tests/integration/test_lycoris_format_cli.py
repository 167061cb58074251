"""LoKr files in the LyCORIS layout through the CLI: a 1-step training run starts from a file LyCORIS wrote, and
`dedistill export --format lycoris` loads with LyCORIS' create_lycoris_from_weights (the in-process checks:
tests/unit/test_lycoris_format.py)."""


import pytest
import torch

import tiny_runs
from test_lycoris_format import lycoris_deltas, our_deltas, write_lycoris_file
from train.adapters import merge_adapter, target_module_names

pytest.importorskip("lycoris")
from lycoris import create_lycoris_from_weights  # noqa: E402


def _train_lokr(model_dir, data_dir, run_dir, steps, **extra):
    over = {"ema.decay": 0.0, **extra}
    tiny_runs.cli("train", tiny_runs.CONFIG, *tiny_runs.overrides(model_dir, data_dir, run_dir, steps=steps, **over))


@pytest.mark.slow
def test_training_starts_from_a_lycoris_file(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from train.config import load_config
    from train.model import load_transformer

    cfg = load_config(tiny_runs.CONFIG).model.adapter  # tiny-cpu's LoKr: rank 4, alpha 4, factor 2
    base = load_transformer(tiny_model_dir, dtype=torch.float32)
    names = target_module_names(base, cfg)
    path = tmp_path / "start.safetensors"
    net = write_lycoris_file(base, names, path, linear_dim=cfg.rank, linear_alpha=cfg.alpha, factor=cfg.lokr_factor)
    expected = lycoris_deltas(net)

    run_dir = tmp_path / "run"
    capsys.readouterr()
    _train_lokr(tiny_model_dir, tiny_data_dir, run_dir, 1, **{"model.adapter.init_from": path, "optim.lr": 1e-12,
                                                              "optim.warmup_steps": 0})
    out = capsys.readouterr().out
    assert f"init_from {path}: {len(names)} LoKr layers" in out
    assert "effective scale" in out
    # after one step at lr 1e-12 the checkpoint's adapter still is the file's update
    from train.inference import load_for_inference

    loaded = load_for_inference(tiny_runs.ckpt(run_dir, 1), device=torch.device("cpu"), dtype="fp32")
    got = our_deltas(loaded.transformer)
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert diff <= 1e-5, diff


@pytest.mark.slow
def test_lycoris_export_loads_with_create_lycoris_from_weights(tiny_model_dir, tiny_data_dir, tmp_path):
    from safetensors import safe_open

    from launch.export import _load_trained_transformer
    from train.model import load_transformer

    run_dir = tmp_path / "run"
    # alpha 2 with rank 4: low-rank layers at scale 0.5, full x full layers at 1 (LyCORIS' rule); factor 1 on block 0's
    # feed-forward. A high lr so that the zero-initialised w1 moves far from zero in 3 steps.
    _train_lokr(tiny_model_dir, tiny_data_dir, run_dir, 3, **{
        "model.adapter.alpha": 2.0, "optim.lr": 0.02,
        "model.adapter.lokr_factor_pattern": '{"transformer_blocks.0.ff*": 1}'})
    ckpt, out = tiny_runs.ckpt(run_dir, 3), tmp_path / "export"
    tiny_runs.cli("export", "--checkpoint", ckpt, "--out", out, "--format", "lycoris", "--dtype", "fp32")
    path = out / "lycoris_lokr.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lycoris_") for k in keys)
    assert "lycoris_transformer_blocks_0_ff_net_0_proj.lokr_w1" in keys

    ours, _ = _load_trained_transformer(ckpt, run_dir, ema=False)
    expected = merge_adapter(ours).state_dict()
    fresh = load_transformer(tiny_model_dir, dtype=torch.float32)
    base = {k: v.clone() for k, v in fresh.state_dict().items()}
    net, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    assert len(net.loras) == len({k.split(".")[0] for k in keys})
    net.apply_to()
    net.merge_to(1.0)
    merged = fresh.state_dict()
    moved = max((expected[k] - base[k]).abs().max().item() for k in base)
    diff = max((merged[k] - expected[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # training changed the weights, so equality is not trivially base == base
    assert diff <= 1e-6, diff
