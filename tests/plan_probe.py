"""Measure what the plan predicts, on CPU: the bytes autograd keeps from one training forward (test_plan.py,
bench/plan_vs_measured.py)."""

from __future__ import annotations

import torch


def saved_activation_bytes(model, *, batch: int, image: int, text: int, seed: int = 0) -> int:
    """Bytes of the distinct storages autograd saves for backward during one flow-matching forward of `model` (the
    trainer's `predict_velocity` with the bool mask, then the MSE), excluding the parameters' own storages.

    Storages are counted once however many ops save views of them. Run with checkpointing off: a checkpointed region
    installs its own saved-tensor hooks and hides what it keeps.
    """
    from train.flux import image_ids, predict_velocity
    from train.text import PromptEmbeds

    c = model.config
    g = torch.Generator().manual_seed(seed)
    side = int(image ** 0.5)
    assert side * side == image, "image tokens must be a square grid"
    x = torch.randn(batch, image, c.in_channels, generator=g)
    t5 = torch.randn(batch, text, c.joint_attention_dim, generator=g)
    mask = torch.ones(batch, text, dtype=torch.bool)
    prompt = PromptEmbeds(t5, mask, torch.randn(batch, c.pooled_projection_dim, generator=g))
    ids = image_ids(2 * side, 2 * side, device="cpu", dtype=torch.float32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred = predict_velocity(model, x, torch.rand(batch, generator=g), prompt, ids, masked=True)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn(pred.shape, generator=g))
    del loss
    return sum(seen.values())
