"""Test helper (run under torchrun by tests/integration/test_frozen_parts.py): `model.text_encoder_placement` against a plain
unsharded TextEncoder. Every rank encodes different prompts (as in training), then compares with its own reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_text_placement_check.py \
        MODEL_DIR PLACEMENT [MODEL_DIR PLACEMENT ...]

Each (model, placement) pair is one check in the same process group (one launch for all of them); rank 0 prints
`TEXT_PLACEMENT_OK <index>` for each that matched.
"""

import sys
from pathlib import Path

import torch

from train.config import load_config
from train.build import load_text_encoder
from train.parallelize import destroy_distributed, init_distributed
from train.text import TextEncoder

REPO = Path(__file__).resolve().parents[1]


def main(*pairs: str) -> None:
    info = None
    for i in range(0, len(pairs), 2):
        model_dir, placement = pairs[i:i + 2]
        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml",
                          [f"model.path={model_dir}", f"model.text_encoder_placement={placement}"])
        info = info or init_distributed(cfg.parallel)
        check(model_dir, placement, cfg, info)
        if info.is_main:
            print(f"TEXT_PLACEMENT_OK {i // 2}", flush=True)
    destroy_distributed()


def check(model_dir: str, placement: str, cfg, info) -> None:
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


if __name__ == "__main__":
    main(*sys.argv[1:])
