"""LoKr files in the LyCORIS layout, checked with lycoris-lora's own code.

- In: a file that LyCORIS itself wrote (`create_lycoris` on a tiny FLUX, random factors, its `save_weights`) loaded
  with `model.adapter.init_from` gives our adapter LyCORIS' update; a file it cannot load exactly is refused.
- Through the CLI (a training run that starts from such a file, `dedistill export --format lycoris` loaded by
  LyCORIS): tests/integration/test_lycoris_format_cli.py.
"""

import pytest
import torch

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
