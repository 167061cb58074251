"""LoKr files in the LyCORIS layout, checked with lycoris-lora's own code.

- In: a file that LyCORIS itself wrote (`create_lycoris` on a tiny FLUX, random factors, its `save_weights`) loaded
  with `model.adapter.init_from` gives our adapter LyCORIS' update, and a 1-step training run starts from it.
- Out: `dedistill export --format lycoris` of a trained LoKr run, loaded onto a fresh base transformer by
  `create_lycoris_from_weights` and merged by LyCORIS, gives our merged transformer's weights.
"""

import subprocess
import sys

import pytest
import torch

import tiny_runs
from tiny_nets import tiny_transformer
from train.adapters import adapted_module_names, apply_adapter, merge_adapter, target_module_names
from train.config import AdapterConfig
from train.lycoris_format import load_lycoris_lokr, lycoris_name

pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402

# A low-rank adapter (w2 = w2_a @ w2_b where the layer is large enough) whose alpha is not its rank: the file's scale
# (alpha / dim = 0.5) differs from ours under the peft convention, so loading must rescale, not just copy.
LOW_RANK = dict(kind="lokr", rank=4, alpha=2.0, lokr_factor=2)
LIBREFLUX = dict(kind="lokr", rank=10000, alpha=1.0, lokr_factor=2, lokr_full_matrix=True)


@pytest.fixture(autouse=True)
def _restore_lycoris_presets():
    keys = ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


def write_lycoris_file(model, names, path, *, seed=0, **kw):
    """What LyCORIS writes: its own network on `model`, factors randomised, saved with its own save_weights."""
    LycorisNetwork.apply_preset({"target_module": [], "target_name": names})
    net = create_lycoris(model, 1.0, algo="lokr", **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(str(path), torch.float32, None)
    return net


def lycoris_deltas(net) -> dict[str, torch.Tensor]:
    """module name -> the weight delta LyCORIS' forward adds (get_weight; see test_lycoris_parity.deltas_lycoris)."""
    with torch.no_grad():
        return {m.lora_name: m.get_weight(m.shape).float() for m in net.loras}


def our_deltas(model) -> dict[str, torch.Tensor]:
    names = adapted_module_names(model)
    before = {n: model.get_submodule(n).get_base_layer().weight.detach().clone() for n in names}
    merge_adapter(model)
    return {lycoris_name(n): model.get_submodule(n).weight.detach() - before[n] for n in names}


@pytest.mark.parametrize("convention", ["lycoris", "peft"])
@pytest.mark.parametrize("settings", [
    pytest.param((LIBREFLUX, dict(linear_dim=1_000_000, linear_alpha=1.0, factor=2, full_matrix=True)), id="libreflux"),
    pytest.param((LOW_RANK, dict(linear_dim=4, linear_alpha=2.0, factor=2)), id="low-rank"),
])
def test_init_from_a_file_lycoris_wrote(settings, convention, tmp_path):
    ours_kw, lycoris_kw = settings
    cfg = AdapterConfig(**ours_kw, blocks=[1], single_blocks=[0], scale_convention=convention)
    names = target_module_names(tiny_transformer(), cfg)
    path = tmp_path / "lycoris.safetensors"
    net = write_lycoris_file(tiny_transformer(), names, path, **lycoris_kw)
    expected = lycoris_deltas(net)

    model = apply_adapter(tiny_transformer(), cfg)
    assert load_lycoris_lokr(model, path) == len(names)
    got = our_deltas(model)
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert diff <= 1e-6, diff
    assert max(v.abs().max().item() for v in expected.values()) > 1e-2  # a real update, not two zero deltas


def test_init_from_refuses_what_it_cannot_load_exactly(tmp_path):
    cfg = AdapterConfig(**LIBREFLUX, blocks=[1], single_blocks=[0])
    path = tmp_path / "lycoris.safetensors"
    names = target_module_names(tiny_transformer(), cfg)
    write_lycoris_file(tiny_transformer(), names, path, linear_dim=1_000_000, linear_alpha=1.0, factor=2,
                       full_matrix=True)
    # a layer the config does not adapt
    fewer = AdapterConfig(**{**LIBREFLUX, "target_modules": ["to_q"]}, blocks=[1], single_blocks=[0])
    with pytest.raises(ValueError, match="model.adapter.init_from.*does not adapt"):
        load_lycoris_lokr(apply_adapter(tiny_transformer(), fewer), path)
    # other factor shapes (factor 4 instead of 2)
    other = AdapterConfig(**{**LIBREFLUX, "lokr_factor": 4}, blocks=[1], single_blocks=[0])
    with pytest.raises(ValueError, match="model.adapter.init_from.*lokr_factor"):
        load_lycoris_lokr(apply_adapter(tiny_transformer(), other), path)
    with pytest.raises(ValueError, match="model.adapter.init_from"):
        load_lycoris_lokr(apply_adapter(tiny_transformer(), cfg), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="model.adapter.init_from: applies to kind lokr"):
        AdapterConfig(kind="lora", init_from=str(path))


def _train_lokr(model_dir, data_dir, run_dir, steps, **extra):
    over = {"ema.decay": 0.0, **extra}
    return tiny_runs.run([sys.executable, "-m", "train", str(tiny_runs.CONFIG),
                          *tiny_runs.overrides(model_dir, data_dir, run_dir, steps=steps, **over)])


@pytest.mark.slow
def test_training_starts_from_a_lycoris_file(tiny_model_dir, tiny_data_dir, tmp_path):
    from train.config import load_config
    from train.model import load_transformer

    cfg = load_config(tiny_runs.CONFIG).model.adapter  # tiny-cpu's LoKr: rank 4, alpha 4, factor 2
    base = load_transformer(tiny_model_dir, dtype=torch.float32)
    names = target_module_names(base, cfg)
    path = tmp_path / "start.safetensors"
    net = write_lycoris_file(base, names, path, linear_dim=cfg.rank, linear_alpha=cfg.alpha, factor=cfg.lokr_factor)
    expected = lycoris_deltas(net)

    run_dir = tmp_path / "run"
    r = _train_lokr(tiny_model_dir, tiny_data_dir, run_dir, 1, **{"model.adapter.init_from": path, "optim.lr": 1e-12,
                                                                  "optim.warmup_steps": 0})
    assert f"init_from {path}: {len(names)} LoKr layers" in r.stdout
    assert "effective scale" in r.stdout
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
    r = subprocess.run([sys.executable, "-m", "launch", "export", "--checkpoint", str(ckpt), "--out", str(out),
                        "--format", "lycoris", "--dtype", "fp32"], cwd=tiny_runs.REPO, env=tiny_runs.env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
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
