"""A lean frozen base under an adapter (`model.base_quant`): torchao weight-only int8 or float8 for the frozen
Linears of the transformer blocks.

LibreFLUX's first phase trained its LoKr on 24 GB RTX 3090s over an int8 base. Here every frozen `nn.Linear` inside
a block — the `base_layer` that peft's LoRA/LoKr layer wraps, and the Linears the adapter does not target (the AdaLN
modulations, say) — keeps its weight as int8 (`Int8WeightOnlyConfig`) or float8 e4m3 (`Float8WeightOnlyConfig`),
each with one scale per output row, and is dequantized to the compute dtype inside every matmul. Autograd goes
through the dequantized weight, so the gradient reaches the adapter and the earlier layers; the weight itself never
gets one. The root's layers (x/context embedders, time/text embeddings, norm_out, proj_out) stay in the compute
dtype: they are 0.3% of FLUX and sit at the model's input and output.

Why weight-only, also for float8: torchao's dynamic-activation float8 (`Float8DynamicActivationFloat8WeightConfig`)
calls `torch._scaled_mm`, which has no derivative ("derivative for aten::_scaled_mm is not implemented"), so no
gradient would reach the adapter below it; `Float8Linear` (float8 training) keeps the bf16 weight, saves every
frozen Linear's input and computes a weight gradient nobody wants. Weight-only saves the memory and trains.

Under FSDP2 the quantized Linears are left out of sharding (`ignored_params`): whole on every rank, like LibreFLUX's
replicated int8 model. They are frozen, so they need neither an all-gather nor a gradient reduce-scatter; the rest
of each block (norms, biases of the root, the adapter) is sharded as before. At load each one is read, quantized and
its full-precision copy freed before the next (`train/parallel/load.py: materialize`), so the bf16 base never sits
on the device at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.family import family_of_model

KINDS = ("none", "int8", "float8")


def quant_target_names(model: nn.Module) -> list[str]:
    """Full names of the frozen `nn.Linear`s inside the transformer blocks (call after the adapter is applied: an
    adapter's own Linears, LoRA's lora_A/lora_B, require grad and are left alone). The block lists come from the
    model's family row (the same names for FLUX and Chroma today)."""
    prefixes = tuple(f"{attr}." for attr in family_of_model(model).block_lists)
    return [n for n, m in model.named_modules()
            if n.startswith(prefixes) and isinstance(m, nn.Linear) and not m.weight.requires_grad]


def torchao_config(kind: str):
    """The torchao `quantize_` config for `kind`; ValueError naming the key when torchao is not installed."""
    try:
        # deferred: torchao is optional (the [quant] extra)
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise ValueError(f"model.base_quant: {kind} needs torchao (pip install 'dedistill[quant]'; the version is "
                         f"pinned in constraints.txt)") from None
    if kind == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)  # leave torch._inductor's global config alone
    if kind == "float8":
        return Float8WeightOnlyConfig()
    raise ValueError(f"model.base_quant: {kind!r} is not one of {', '.join(KINDS)}")


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen quantized W, keeping nothing for the backward but a reference to W.

    Called plainly, torchao's F.linear dequantizes W and autograd saves that full-precision copy for the input
    gradient: every quantized Linear would hold its weight in the compute dtype from forward to backward, the bf16
    base again. Here the backward dequantizes W once more instead (a transient, one Linear at a time)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # a frozen parameter, not an activation: holding it costs nothing
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight.dequantize().to(grad.dtype), None, None


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight is a torchao quantized tensor (made by `quantize_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenQuantizedLinear.apply(x, self.weight, self.bias)


def quantize_linear(linear: nn.Linear, kind: str) -> None:
    """Replace `linear`'s (real, frozen) weight by its torchao weight-only quantized form, in place."""
    from torchao.quantization import quantize_  # deferred: optional (the [quant] extra)

    assert not linear.weight.is_meta and not linear.weight.requires_grad, "quantize a loaded, frozen weight"
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    quantize_(linear, torchao_config(kind))
    # The class, not the object, changes: peft's layer (base_layer) and FSDP2 (ignored_params) keep their references.
    linear.__class__ = QuantizedLinear


def quantize_base(model: nn.Module, kind: str) -> list[str]:
    """Quantize every frozen block Linear of a loaded (unsharded) model in place; returns their names."""
    names = quant_target_names(model)
    for name in names:
        quantize_linear(model.get_submodule(name), kind)
    return names


def is_quantized(t: torch.Tensor) -> bool:
    """True for a torchao quantized weight (a tensor subclass holding int8/float8 data and scales)."""
    return hasattr(t, "qdata")


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the block Linears' weights hold in memory, quantized (data + scales) and not: {"quantized", "plain"}."""
    prefixes = tuple(f"{attr}." for attr in family_of_model(model).block_lists)
    out = {"quantized": 0, "plain": 0}
    for name, m in model.named_modules():
        if not (name.startswith(prefixes) and isinstance(m, nn.Linear)):
            continue
        w = m.weight
        if is_quantized(w):
            out["quantized"] += sum(t.numel() * t.element_size() for t in (w.qdata, w.scale))
        else:
            out["plain"] += w.numel() * w.element_size()
    return out
