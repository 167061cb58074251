"""Test helper (run under torchrun by tests/integration/test_frozen_parts.py): `model.text_encoder_placement` against a plain
unsharded TextEncoder. Every rank encodes different prompts (as in training), then compares with its own reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_text_placement_check.py MODEL_DIR PLACEMENT
"""

import sys
from pathlib import Path

import torch

from train.config import load_config
from train.build import load_text_encoder
from train.parallelize import destroy_distributed, init_distributed
from train.text import TextEncoder

REPO = Path(__file__).resolve().parents[1]


def main(model_dir: str, placement: str) -> None:
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml",
                      [f"model.path={model_dir}", f"model.text_encoder_placement={placement}"])
    info = init_distributed(cfg.parallel)
    text = load_text_encoder(cfg, info, torch.float32)
    prompts = [["a red circle", "a small blue square at the top left"], ["a green triangle"]][info.rank % 2]
    got = [text.encode(prompts, max_tokens=64), text.empty(max_tokens=64)]
    if placement == "fsdp":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in text.t5.parameters()), "the text model is not (re)sharded after encoding"
    ref = TextEncoder(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    want = [ref.encode(prompts, max_tokens=64), ref.empty(max_tokens=64)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.t5, w.t5, atol=1e-6, rtol=1e-5)
        assert torch.equal(g.mask, w.mask) and torch.equal(g.pooled, w.pooled)
    torch.distributed.barrier()
    if info.is_main:
        print("TEXT_PLACEMENT_OK", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
