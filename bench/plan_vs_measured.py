#!/usr/bin/env python
"""`dedistill plan`'s per-process memory prediction against a measured training step, on CPU.

    python bench/plan_vs_measured.py                 # mid-size FLUX (~95M parameters), 512 px, three rows
    python bench/plan_vs_measured.py --rows full     # one row

Each row runs in its own process (1 rank, gloo, fp32, FSDP2 at world size 1 — the trainer's `build_backend`): the
transformer is built with random weights, the adapter applied, trainable parameters cast to fp32, then two steps on
a precomputed-like batch (latents and T5 states as tensors, so no encoders: `--precomputed yes` in plan terms):
forward through `train.flux.predict_velocity` with the bool mask, flow-matching MSE, backward, clip + AdamW step,
EMA update.

What is compared: the process's resident set size (RSS, /proc/self/statm sampled every 2 ms) at its peak during the
second step (the first allocates AdamW's moments, so the second is what every later step looks like), minus the RSS
just before the transformer was built — against the plan's per-GPU total for the same config on
`device=cpu` (fp32, no CUDA reserve, no encoders). `kept` is the RSS right after the forward minus right before it,
against the plan's activation row. glibc is told to serve every allocation above 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS at once and the RSS follows what PyTorch holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MID = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=128,
           num_attention_heads=6, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=False,
           axes_dims_rope=(16, 56, 56))
ROWS = {
    "full": ["model.adapter.kind=full", "train.activation_checkpointing=false", "ema.decay=0.99"],
    "lora": ["model.adapter.kind=lora", "model.adapter.rank=16", "train.activation_checkpointing=false"],
    "lokr-ac": ["model.adapter.kind=lokr", "model.adapter.rank=16", "model.adapter.lokr_factor=4",
                "train.activation_checkpointing=true"],
}
COMMON = ["model.dtype=fp32", "data.resolution=512", "objective.max_text_tokens=128", "train.batch_size=2",
          "parallel.dist_backend=gloo"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self) -> None:
        self.peak, self._stop = _rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())


def config_for(model_dir: Path, row: str):
    from train.config import load_config

    return load_config(None, [f"model.path={model_dir}", *COMMON, *ROWS[row]])


def measure(row: str, model_dir: Path) -> dict:
    """One training step in this process; bytes above the pre-model baseline."""
    import torch

    import train.parallelize as par
    from diffusers import FluxTransformer2DModel
    from train.adapters import apply_adapter, trainable_named_parameters
    from train.flux import image_ids, predict_velocity
    from train.optim import EMA, build_optimizer
    from train.parallel import StepConfig, build_backend
    from tools.plan import tokens_for
    from train.text import PromptEmbeds

    torch.set_num_threads(2)
    cfg = config_for(model_dir, row)
    tok = tokens_for(cfg)
    b, side = cfg.train.batch_size, cfg.data.resolution // 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, tok.image, MID["in_channels"], generator=g)
    target = torch.randn(b, tok.image, MID["in_channels"], generator=g)
    prompt = PromptEmbeds(torch.randn(b, tok.text, MID["joint_attention_dim"], generator=g),
                          torch.ones(b, tok.text, dtype=torch.bool), torch.randn(b, MID["pooled_projection_dim"]))
    ids = image_ids(2 * side, 2 * side, device="cpu", dtype=torch.float32)
    t = torch.rand(b, generator=g)
    info = par.init_distributed(cfg.parallel)
    base = _rss()
    with PeakRSS() as peak:
        model = FluxTransformer2DModel(**MID)
        apply_adapter(model, cfg.model.adapter)
        for _, p in trainable_named_parameters(model):
            p.data = p.data.float()
        backend = build_backend(
            model, cfg.parallel, info=info, compute_dtype=torch.float32,
            step=StepConfig(micro_batch_size=b, grad_accum=1, grad_clip=1.0,
                            activation_checkpointing=cfg.train.activation_checkpointing),
            make_optimizer=lambda params: build_optimizer(params, cfg.optim))
        ema = EMA(backend.ema_tensors(), cfg.ema) if cfg.ema.decay > 0 else None
        for step in (1, 2):  # AdamW allocates its moments in the first step: the second is the steady state
            if step == 2:
                peak.peak = _rss()
            before_fwd = _rss()
            pred = predict_velocity(backend.model, x, t, prompt, ids, masked=True)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            kept = _rss() - before_fwd
            loss.backward()
            del pred, loss
            backend.step(loss_finite=True)
            if ema:
                ema.update(step)
    par.destroy_distributed()
    return {"row": row, "peak": peak.peak - base, "kept": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, Path(a.model_dir))))
        return

    from tools.plan import GiB, Cluster, make_plan

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "transformer").mkdir()
        (model_dir / "transformer" / "config.json").write_text(json.dumps(MID))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        print("| row | params | trainable | predicted total GiB | measured peak GiB | error | predicted activations "
              "GiB | measured after forward GiB | error |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in a.rows.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", row, "--model-dir", str(model_dir)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            plan = make_plan(config_for(model_dir, row), Cluster(nodes=1, gpus_per_node=1, device="cpu"),
                             precomputed=True)
            pred = plan.memory.total
            acts = plan.memory.rows["activations (kept for backward)"]
            print(f"| {row} | {plan.inv.n_total / 1e6:.1f}M | {plan.inv.n_trainable / 1e6:.2f}M | {pred / GiB:.3f} | "
                  f"{m['peak'] / GiB:.3f} | {pred / m['peak'] - 1:+.1%} | {acts / GiB:.3f} | {m['kept'] / GiB:.3f} | "
                  f"{acts / m['kept'] - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
