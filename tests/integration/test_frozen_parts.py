"""Frozen parts only where needed: a precomputed run never builds the VAE, T5 or CLIP while training; sampling and
inline evals load them when they run and free them after; `model.text_encoder_placement` cpu/fsdp encode the same."""

import gc
import weakref

import pytest
import torch

import tiny_runs

LOADERS = [("diffusers", "AutoencoderKL"), ("transformers", "T5EncoderModel"), ("transformers", "CLIPTextModel")]


@pytest.fixture(scope="module")
def precomputed(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    from dataset_tools.buckets import BucketSpec
    from dataset_tools.precompute import PrecomputeOptions, precompute

    out = tmp_path_factory.mktemp("pre") / "square64"
    precompute(tiny_model_dir, tiny_data_dir, out, spec=BucketSpec(resolution=64, square=True),
               opts=PrecomputeOptions(dtype="fp32", max_text_tokens=64), progress_bar=False)
    return out


def _train(model, data, run_dir, *overrides):
    from train.config import load_config

    cfg = load_config(tiny_runs.CONFIG, [
        f"model.path={model}", f"data.local={data}", f"run_dir={run_dir}", "train.max_steps=2",
        "checkpoint.every_steps=2", "train.progress_bar=false", "sample.at_end=false", *overrides,
    ])
    return tiny_runs.train_in_process(cfg)


def _spy(monkeypatch, *, fail: bool) -> list:
    """Wrap each frozen part's from_pretrained: raise (fail) or record a weakref to what it built."""
    import importlib

    built = []
    for module, name in LOADERS:
        cls = getattr(importlib.import_module(module), name)
        original = cls.from_pretrained

        def load(*args, _original=original, _name=name, **kwargs):
            if fail:
                raise AssertionError(f"{_name} was loaded by a precomputed run")
            model = _original(*args, **kwargs)
            built.append((_name, weakref.ref(model)))
            return model

        monkeypatch.setattr(cls, "from_pretrained", load)
    return built


def test_precomputed_run_never_builds_vae_or_text_encoders(tiny_model_dir, precomputed, tmp_path, monkeypatch):
    _spy(monkeypatch, fail=True)
    state = _train(tiny_model_dir, precomputed, tmp_path / "run")
    assert state.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in state.history)


@pytest.mark.slow
def test_precomputed_run_loads_them_for_inline_eval_and_end_grid_then_frees_them(
    tiny_model_dir, precomputed, tmp_path, monkeypatch
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: mini\nprompts: {{file: {prompts}}}\nsampling: {{steps: [2], cfg_scales: [1.0, 2.0], "
                     f"resolution: 64}}\ngrid_images: 2\n")
    built = _spy(monkeypatch, fail=False)
    run = tmp_path / "run"
    state = _train(tiny_model_dir, precomputed, run, "sample.at_end=true", "sample.steps=2", "eval.mode=inline",
                   f"eval.suite={suite}", "eval.every_steps=2")
    assert state.step == 2
    assert (run / "evals" / "step_00000002" / "mini" / "metrics.json").is_file()  # one directory per suite
    assert (run / "samples" / "grid_step_00000002.png").is_file()
    # once for the inline eval (its own unsharded copy), once for the end-of-run grid; none for training
    assert sorted(n for n, _ in built) == sorted([n for _, n in LOADERS] * 2)
    gc.collect()
    assert [n for n, ref in built if ref() is not None] == [], "frozen parts were not freed after use"


@pytest.mark.slow
def test_text_encoder_placement_encodes_the_same(tiny_model_dir, tmp_path):
    """2 gloo ranks, one launch for every case: T5 + CLIP placed on the CPU or with T5 sharded by FSDP2 give the
    unsharded encoder's states; and FLUX.2's text model (Mistral3 for [dev], whose layers sit under
    model.language_model; Qwen3 for [klein], under model.layers) sharded layer by layer gives the unsharded model's
    stacked, masked features: the way a 24B [dev] encoder runs beside a training without a whole copy per GPU."""
    from dataset_tools.tiny_model import write_tiny_model

    cases = [(tiny_model_dir, "cpu"), (tiny_model_dir, "fsdp")]
    cases += [(write_tiny_model(tmp_path / family, seed=0, family=family), "fsdp") for family in ("flux2", "flux2-klein")]
    r = tiny_runs.run(tiny_runs.torchrun_cmd(*(x for case in cases for x in case),
                                             script=str(tiny_runs.REPO / "tests" / "_text_placement_check.py")))
    done = [int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("TEXT_PLACEMENT_OK")]
    assert done == list(range(len(cases))), r.stdout[-2000:]
