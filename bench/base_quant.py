#!/usr/bin/env python
"""Base-weight memory of `model.base_quant` (train/quant.py) at FLUX.1 width, and what it costs in accuracy.

    python bench/base_quant.py                     # CPU: one double + one single FLUX.1 block (~0.5B parameters)
    python bench/base_quant.py --device cuda       # also the allocator's view (torch.cuda.memory_allocated)

Builds a FLUX.1-schnell-shaped transformer (hidden 3072, 24 heads; `--double`/`--single` blocks, default 1 + 1),
random N(0, 0.02) weights in bf16, a LoRA r16 on the default targets, then quantizes the frozen block Linears as
the trainer does. Per kind: the bytes the block Linears' weights hold (data + scales, counted from the tensors),
scaled to FLUX.1's 19 + 38 blocks; what `dedistill plan` books for them; and the relative error of the model's
output and of the gradient reaching the LoRA weights against the bf16 base (one sample: `--image-tokens` 256, i.e.
256 px, and `--text-tokens` 64 by default).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

GiB = 2**30


def flux_arch(double: int, single: int) -> dict:
    from tools.plan import FLUX1_SCHNELL_CONFIG

    arch = {k: v for k, v in json.loads(FLUX1_SCHNELL_CONFIG.read_text()).items() if not k.startswith("_")}
    return {**arch, "num_layers": double, "num_single_layers": single}


def build(arch: dict, device: torch.device):
    from bench.train_step import build_random_transformer
    from train.adapters import apply_adapter
    from train.config import AdapterConfig

    torch.manual_seed(0)
    model = build_random_transformer(arch, device=device, dtype=torch.bfloat16)
    apply_adapter(model, AdapterConfig(kind="lora", rank=16, alpha=16.0, init_weights=False))
    return model


def loss_and_grads(model, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(**inputs)[0]
    out.float().square().mean().backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out.detach().float(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--double", type=int, default=1, help="double-stream blocks to build (FLUX.1 has 19)")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks to build (FLUX.1 has 38)")
    p.add_argument("--kinds", default="int8,float8")
    p.add_argument("--image-tokens", type=int, default=256, help="256 = a 256 px image (errors hardly depend on it)")
    p.add_argument("--text-tokens", type=int, default=64)
    a = p.parse_args(argv)
    device = torch.device(a.device)

    from train.config import load_config
    from tools.plan import Cluster, make_plan
    from train.quant import quantize_base, weight_bytes

    arch = flux_arch(a.double, a.single)
    c = arch["num_attention_heads"] * arch["attention_head_dim"]
    n_img, n_txt = a.image_tokens, a.text_tokens
    inputs = dict(hidden_states=torch.randn(1, n_img, arch["in_channels"]),
                  encoder_hidden_states=torch.randn(1, n_txt, arch["joint_attention_dim"]),
                  pooled_projections=torch.randn(1, arch["pooled_projection_dim"]), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    inputs = {k: v.to(device=device, dtype=torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k
              not in ("img_ids", "txt_ids") else (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    # FLUX.1 = 19 double + 38 single: scale each block kind's measured bytes (one block of each kind measured)
    scale = {"double": 19 / a.double, "single": 38 / a.single}

    def flux_bytes(model, which: str) -> float:
        """Bytes of the block Linears' weights (`which`: quantized or plain), scaled to FLUX.1's block counts."""
        total = 0.0
        for attr, kind in (("transformer_blocks", "double"), ("single_transformer_blocks", "single")):
            holder = torch.nn.Module()
            holder.transformer_blocks = getattr(model, attr)  # weight_bytes counts under a block-list prefix
            total += weight_bytes(holder)[which] * scale[kind]
        return total

    rows = []
    ref = build(arch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    alloc0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    ref_out, ref_grads = loss_and_grads(ref, inputs)
    rows.append({"kind": "none (bf16)", "flux_gib": flux_bytes(ref, "plain") / GiB, "plan_gib": None,
                 "out_err": 0.0, "grad_err": 0.0, "alloc_gib": None if alloc0 is None else alloc0 / GiB, "s": 0.0})
    del ref
    for kind in [k.strip() for k in a.kinds.split(",") if k.strip()]:
        model = build(arch, device)
        t = time.perf_counter()
        quantize_base(model, kind)
        secs = time.perf_counter() - t
        alloc = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
        out, grads = loss_and_grads(model, inputs)
        plan = make_plan(load_config(REPO / "configs" / "lora-24gb.yaml", [f"model.base_quant={kind}"]),
                         Cluster(gpus_per_node=1, gpu_mem_gib=24.0), precomputed=True)
        rows.append({"kind": kind, "flux_gib": flux_bytes(model, "quantized") / GiB,
                     "plan_gib": plan.memory.rows[f"frozen base Linears {kind} (replicated)"] / GiB,
                     "out_err": rel(out, ref_out), "grad_err": max(rel(g, r) for g, r in zip(grads, ref_grads)),
                     "alloc_gib": alloc, "s": secs})
        del model

    print(f"# bench/base_quant.py  device {device}, torch {torch.__version__}, FLUX.1 width (hidden {c}), "
          f"{a.double} double + {a.single} single block(s) built, scaled to 19 + 38; {n_img} image + {n_txt} text tokens")
    print("# block Linear weights of FLUX.1: counted bytes (data + scales) scaled from the built blocks; plan = what "
          "`dedistill plan lora-24gb` books; errors: relative L2 vs the bf16 base (output; worst LoRA-weight grad)")
    cols = ["base", "block Linears, FLUX.1 (GiB)", "plan (GiB)", "output rel. err", "LoRA grad rel. err (max)",
            "quantize (s)"] + (["allocated after quantize (GiB)"] if device.type == "cuda" else [])
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r["kind"], f"{r['flux_gib']:.2f}", "-" if r["plan_gib"] is None else f"{r['plan_gib']:.2f}",
                 f"{r['out_err']:.2e}", f"{r['grad_err']:.2e}", f"{r['s']:.1f}"]
        if device.type == "cuda":
            cells.append("-" if r["alloc_gib"] is None else f"{r['alloc_gib']:.2f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
