"""Building a module under its own seed, for the tiny models the tests and the demo make."""

from __future__ import annotations

import torch


def seeded(seed: int, build, dtype: torch.dtype = torch.float32):
    """Build a module under its own seed, leaving the caller's global RNG untouched. Built directly in `dtype`
    (the default dtype while it initialises), so a 0.6B bf16 model never exists in fp32."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            return build().eval()
        finally:
            torch.set_default_dtype(previous)
