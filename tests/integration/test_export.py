"""`dedistill export`: what diffusers loads from an export samples what the checkpoint samples.

- LoKr (the reference run), `--format diffusers`: FluxPipeline.from_pretrained loads the dir; the transformer has
  plain diffusers weights (adapter merged, no peft keys); our sampler on the export gives the checkpoint's image.
- LoRA (a short run of its own), `--format lora`: FluxPipeline.load_lora_weights on the base pipeline applies it
  (the output moves away from the base model's — the "loads as a no-op" failure of mismatched key names) and our
  sampler on that transformer gives the checkpoint's image.
- LoKr with `--format lora` is refused with a message that names the merged export.
"""

import json

import numpy as np
import pytest
import torch

import tiny_runs

pytestmark = pytest.mark.slow


def _settings():
    from evals.sampler import SamplingSettings

    return SamplingSettings(steps=2, cfg_scale=3.0, resolution=64, seed=7, max_text_tokens=64, masked=True)


def _latents(transformer, text, vae) -> torch.Tensor:
    """The sampler's denoised latents for one prompt (float, before the VAE's uint8 rounding)."""
    from evals.sampler import denoise, initial_noise
    from train.flux import pack_latents
    from train.model import vae_scale_factor

    s = _settings()
    h = w = s.resolution // vae_scale_factor(vae)
    noise = pack_latents(initial_noise((1, vae.config.latent_channels, h, w), s.seed))
    cond = text.encode(["a red circle"], max_tokens=s.max_text_tokens, masked=True)
    uncond = text.encode([""], max_tokens=s.max_text_tokens, masked=True)
    return denoise(transformer, noise, cond, uncond, s, latent_hw=(h, w), dtype=torch.float32)


def _image(loaded) -> np.ndarray:
    from evals.sampler import generate

    (img,) = generate(loaded.transformer, loaded.vae, loaded.text, ["a red circle"], _settings(), dtype=loaded.dtype)
    return np.asarray(img, dtype=np.int16)


def test_lokr_merged_diffusers_export_samples_like_the_checkpoint(reference_run, tmp_path):
    from diffusers import FluxPipeline

    from train.inference import load_for_inference

    ckpt, out = tiny_runs.ckpt(reference_run, tiny_runs.STEPS), tmp_path / "export"
    tiny_runs.cli("export", "--checkpoint", ckpt, "--out", out, "--format", "diffusers", "--dtype", "fp32")

    pipe = FluxPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    names = [n for n, _ in pipe.transformer.named_parameters()]
    assert names and not any("lokr" in n or "lora" in n for n in names)
    assert json.loads((out / "dedistill_export.json").read_text())["step"] == tiny_runs.STEPS
    assert list((out / "transformer").glob("*.safetensors")) and not list(out.rglob("*.bin"))

    cpu = torch.device("cpu")
    from_ckpt, from_export = load_for_inference(ckpt, device=cpu, dtype="fp32"), load_for_inference(out, device=cpu,
                                                                                                     dtype="fp32")
    a = _latents(from_ckpt.transformer, from_ckpt.text, from_ckpt.vae)
    b = _latents(from_export.transformer, from_export.text, from_export.vae)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert np.abs(_image(from_ckpt) - _image(from_export)).max() <= 1

    # and the same LoKr cannot be exported as a diffusers LoRA: the message says what to do instead
    from launch.export import export_checkpoint

    with pytest.raises(ValueError, match="--format diffusers"):
        export_checkpoint(ckpt, tmp_path / "lora", fmt="lora")


def test_lora_export_loads_with_diffusers_load_lora_weights(tiny_model_dir, tiny_lora_run, tmp_path, capsys):
    from diffusers import FluxPipeline

    from train.inference import load_for_inference
    from train.text import TextEncoder

    # conftest's 4-step LoRA run (one process, a high LR so the adapter's B matrices move well away from zero)
    from launch.export import export_checkpoint

    ckpt, out = tiny_runs.ckpt(tiny_lora_run, 4), tmp_path / "lora"
    export_checkpoint(ckpt, out, fmt="lora", dtype="fp32")  # in-process; the CLI is covered above

    # --ema on a run that trained none (ema.decay 0): one line that says so, not DCP's missing-key exception
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ema"), "--ema"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "trained no EMA (ema.decay 0)" in err[0] and not (tmp_path / "ema").exists()

    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)

    pipe = FluxPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    text = TextEncoder(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    base = _latents(pipe.transformer, text, pipe.vae)
    pipe.load_lora_weights(str(out))
    lora = _latents(pipe.transformer, text, pipe.vae)
    from_ckpt = load_for_inference(ckpt, device=torch.device("cpu"), dtype="fp32")
    expected = _latents(from_ckpt.transformer, from_ckpt.text, from_ckpt.vae)

    assert (lora - base).abs().max() > 1e-3, "load_lora_weights changed nothing (key names or scale wrong)"
    torch.testing.assert_close(lora, expected, atol=1e-5, rtol=1e-5)
