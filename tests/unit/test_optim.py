"""optim.implementation: which AdamW kernel runs, and that each keeps resume exact where it must."""

from __future__ import annotations

import copy

import pytest
import torch

from train.config import OptimConfig, load_config
from train.optim import adamw_implementation, build_optimizer


def _params(device: str = "cpu", n: int = 5) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(7, 3 + i, generator=g).to(device)) for i in range(n)]


def _steps(params, opt, n: int, *, start: int = 0) -> None:
    for k in range(start, start + n):
        g = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_config_key_and_choices():
    assert load_config(None).optim.implementation == "auto"
    assert load_config(None, ["optim.implementation=fused"]).optim.implementation == "fused"
    with pytest.raises(ValueError, match="optim.implementation"):
        OptimConfig(implementation="apex")


def test_auto_is_todays_single_tensor_path_on_cpu():
    params = _params()
    assert adamw_implementation(params, "auto") == "single_tensor"
    opt = build_optimizer(params, OptimConfig())
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]
    assert build_optimizer(params, OptimConfig(implementation="foreach")).defaults["foreach"] is True
    assert build_optimizer(params, OptimConfig(implementation="fused")).defaults["fused"] is True


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_batched_kernels_match_single_tensor_on_cpu(impl):
    """Same maths: foreach and (CPU) fused AdamW agree with the per-parameter path to rounding."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.01)
    ref = _params()
    _steps(ref, build_optimizer(ref, cfg), 4)
    other = _params()
    _steps(other, build_optimizer(other, OptimConfig(lr=1e-2, weight_decay=0.01, implementation=impl)), 4)
    for a, b in zip(ref, other):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _resume_is_bitwise(device: str, implementation: str) -> None:
    cfg = OptimConfig(lr=1e-2, weight_decay=0.01, implementation=implementation)
    straight = _params(device)
    _steps(straight, build_optimizer(straight, cfg), 5)

    first = _params(device)
    opt = build_optimizer(first, cfg)
    _steps(first, opt, 3)
    saved_params, saved_state = [p.detach().clone() for p in first], copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(t) for t in saved_params]
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved_state)
    _steps(resumed, opt2, 2, start=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_cpu_resume_is_bitwise():
    _resume_is_bitwise("cpu", "auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["auto", "foreach", "fused"])
def test_gpu_kernels_and_resume_is_bitwise_on_the_same_gpu(impl):
    params = _params("cuda")
    if impl == "auto":
        assert adamw_implementation(params, "auto") == "fused"
    _resume_is_bitwise("cuda", impl)
