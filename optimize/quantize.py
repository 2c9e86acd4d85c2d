"""Weight-only quantization of PyTorch models: `quantize(model, Int8WeightOnly())`.

Configs are frozen dataclasses that validate themselves; each config type has a handler in a
registry that turns one `nn.Linear` into its quantized replacement (after torchao's
`quantize_(model, config)` design). Linear layers whose qualified name matches a `skip` pattern
(fnmatch, e.g. "lm_head" or "*.mlp.down_proj") stay in full precision.

Formats:
- Int8WeightOnly: symmetric int8 per output channel, scale = max|w| / 127.
- Int4WeightOnly(group_size, symmetric): int4 per group of `group_size` input channels, packed two per
  byte; asymmetric: scale = (max - min) / 15 and an integer zero point, symmetric: scale = max|w| / 7
  with zero point 8. Method "rtn" (round to nearest).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from inferforge.errors import UserInputError


@dataclass(frozen=True)
class Int8WeightOnly:
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Int4WeightOnly:
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise UserInputError(f"Int4WeightOnly: group_size must be a power of two >= 16, got {self.group_size}")
        if self.method != "rtn":
            raise UserInputError(f"Int4WeightOnly: method {self.method!r} is not available; supported: 'rtn'")


_HANDLERS: dict[type, Callable[[nn.Linear, object, str], nn.Module]] = {}


def register_quantize_handler(config_type: type):
    """Register the function that replaces one nn.Linear for configs of `config_type`."""
    def register(fn):
        _HANDLERS[config_type] = fn
        return fn
    return register


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x_hat|^2)."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approximation.double()).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(signal / noise))


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x):
        from inferforge.kernels import w8a16_matmul

        return w8a16_matmul(x, self.weight_int8, self.scale, self.bias)


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, packed, scales, zeros, bias, group_size: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.group_size = group_size
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        from inferforge.kernels.reference import unpack_int4

        q = unpack_int4(self.packed).float()
        g = self.group_size
        return (q - self.zeros.repeat_interleave(g, 1)) * self.scales.repeat_interleave(g, 1)

    def forward(self, x):
        from inferforge.kernels import w4a16_matmul

        return w4a16_matmul(x, self.packed, self.scales, self.zeros, self.bias, group_size=self.group_size)


@register_quantize_handler(Int8WeightOnly)
def _int8_weight_only(linear: nn.Linear, config: Int8WeightOnly, name: str) -> nn.Module:
    w = linear.weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return Int8WeightOnlyLinear(q, scale.float().contiguous(), bias)


@register_quantize_handler(Int4WeightOnly)
def _int4_weight_only(linear: nn.Linear, config: Int4WeightOnly, name: str) -> nn.Module:
    from inferforge.kernels.reference import pack_int4

    n, k = linear.weight.shape
    g = config.group_size
    if k % g or k % 2:
        raise UserInputError(f"{name}: in_features ({k}) is not a multiple of group_size ({g}); choose a group_size "
                             f"that divides it or add '{name}' to skip")
    w = linear.weight.detach().float().reshape(n, k // g, g)
    if config.symmetric:
        scales = (w.abs().amax(dim=-1) / 7).clamp(min=1e-12)
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, 15).reshape(n, k)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return Int4WeightOnlyLinear(pack_int4(q), scales.contiguous(), zeros.contiguous(), bias, g)


@dataclass
class QuantizeReport:
    """Per replaced layer, the weight SQNR in dB; and the layers kept in full precision."""

    config: object
    layers: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.layers.items(), key=lambda kv: kv[1])[:n]


def quantize(model: nn.Module, config, *, calibration=None, gate=None) -> QuantizeReport:
    """Replace the model's nn.Linear layers in place with quantized ones per `config`.

    Returns a `QuantizeReport` with each layer's weight SQNR (dB, vs. the original weights)."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise UserInputError(f"no quantization handler for {type(config).__name__}; known configs: {known}")
    if calibration is not None or gate is not None:
        raise UserInputError(f"{type(config).__name__} uses no calibration data and no gate in this version")
    report = QuantizeReport(config)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        if any(fnmatch.fnmatch(name, pattern) for pattern in config.skip):
            report.skipped.append(name)
            continue
        replacement = handler(linear, config, name).to(linear.weight.device)
        report.layers[name] = sqnr_db(linear.weight.detach(), replacement.dequantized_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return report
