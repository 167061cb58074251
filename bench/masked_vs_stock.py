#!/usr/bin/env python
"""How far stock diffusers `FluxPipeline` is from the image a masked-trained export should give.

    python bench/masked_vs_stock.py --out /tmp/masked_vs_stock          # ~10 minutes on a shared 2-core CPU

Trains the tiny preset (configs/tiny-cpu.yaml: LoKr, T5 padding mask on, 64 T5 tokens) for `--steps` steps in one
process on a fresh tiny pipeline and dataset, exports it with `--format diffusers`, and samples every prompt
(real CFG, a negative prompt, same seed) with
- the export's own `pipeline.py` (`DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR)`), the masked
  reference: equal to `dedistill sample` pixel for pixel (tests/integration/test_export_pipeline.py);
- stock `FluxPipeline.from_pretrained(DIR)` at `max_sequence_length` 64 (the run's) and 512 (diffusers' default),
  which passes no attention mask.
Prints one markdown row per (prompt, T5 length): mean and max |pixel difference| (0-255) and PSNR in dB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

PROMPTS = ["a red circle",
           "a large green triangle at the bottom right on a white background next to a small blue square at the top "
           "left, with a yellow circle in the middle"]


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True, help="work dir (model, data, run, export); reused if present")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--negative-prompt", default="blurry noisy")
    a = p.parse_args()

    import torch
    from diffusers import DiffusionPipeline, FluxPipeline

    out = Path(a.out).resolve()
    model, data, run, export = out / "model", out / "data", out / "run", out / "export"
    if not (model / "model_index.json").is_file():
        _run("-m", "launch", "tiny-model", str(model))
    if not (data / "index.json").is_file():
        _run("-m", "launch", "tiny-data", str(data))
    if not (export / "model_index.json").is_file():
        _run("-m", "train", "configs/tiny-cpu.yaml", f"model.path={model}", f"data.local={data}", f"run_dir={run}",
             f"train.max_steps={a.steps}", f"checkpoint.every_steps={a.steps}", "sample.at_end=false",
             "train.progress_bar=false")
        _run("-m", "launch", "export", "--checkpoint", str(run), "--out", str(export), "--format", "diffusers",
             "--dtype", "fp32")

    masked = DiffusionPipeline.from_pretrained(str(export), custom_pipeline=str(export), trust_remote_code=True,
                                               torch_dtype=torch.float32)
    stock = FluxPipeline.from_pretrained(str(export), torch_dtype=torch.float32)
    for pipe in (masked, stock):
        pipe.set_progress_bar_config(disable=True)
    common = dict(negative_prompt=a.negative_prompt, true_cfg_scale=a.cfg, num_inference_steps=a.sample_steps,
                  height=64, width=64)

    def image(pipe, prompt, **kw):
        img = pipe(prompt, generator=torch.Generator().manual_seed(0), **common, **kw).images[0]
        return np.asarray(img.convert("RGB")).astype(np.float64)

    print(f"\n# stock FluxPipeline vs the masked pipeline: tiny preset, {a.steps} training steps, cfg {a.cfg:g}, "
          f"{a.sample_steps} sampling steps, 64x64\n")
    print("| prompt | T5 tokens (stock) | mean abs diff | max abs diff | PSNR (dB) |")
    print("|---|---|---|---|---|")
    for prompt in PROMPTS:
        ref = image(masked, prompt)
        for tokens in (64, 512):
            got = image(stock, prompt, max_sequence_length=tokens)
            d = np.abs(ref - got)
            psnr = 10 * np.log10(255.0**2 / max(np.mean(d**2), 1e-12))
            print(f"| {prompt[:40] + ('...' if len(prompt) > 40 else '')} | {tokens} | {d.mean():.2f} | "
                  f"{d.max():.0f} | {psnr:.1f} |")


if __name__ == "__main__":
    main()
