"""Quantized linear layers on the CPU through PyTorch's own packed kernels.

On a CPU (without TRITON_INTERPRET) the quantized modules of `inferforge.optimize.quantize` would run
their PyTorch references, which dequantize the whole weight on every call. Instead:

- int8 weight-only: `aten._weight_int8pack_mm(x, weight_int8 [N, K], scale [N])` reads the int8
  weights as stored (no copy), unless K is not a multiple of 32 (then a zero-padded copy).
- int4 weight-only: `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` on the
  weights converted once by `aten._convert_weight_to_int4pack_for_cpu` (int32 codes [N, K], N a
  multiple of 16: the rows are padded with zeros and the output sliced). Its dequantization is
  w = (q - 8) * scale + zero_t, ours w = (q - zero) * scale, so zero_t = (8 - zero) * scale;
  `scales_and_zeros` is [K // group, N, 2] = (scale, zero_t). Groups above 256 are split into groups
  of 256 with the same parameters; groups of 16 have no packed kernel (the module keeps its path).
- W8A8: `torch._int_mm` (int8 x int8 -> exact int32), then the per-token and per-channel scales.

In torch 2.13 both weight-only kernels are vectorized for bfloat16 activations only: with float32
activations they take a scalar loop, 10-20x slower than the float32 matmul (1024 x 2816, M = 1, 2
threads). So float32 and float16 activations are rounded to bfloat16 for the weight-only kernels
(relative error 2^-9 per element, far below the int8/int4 weight error), the output cast back.

`INFERFORGE_CPU_PACKED=0` keeps the previous paths (the PyTorch references) for comparison.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOGGED: set[str] = set()
_INT4_GROUPS = (32, 64, 128, 256)      # what _weight_int4pack_mm_for_cpu accepts


def _log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


def use_cpu_packed(x: torch.Tensor) -> bool:
    """Whether a quantized layer should run its packed CPU kernel for input `x`: on the CPU, outside
    the Triton interpreter (where the tests run the Triton kernels), unless INFERFORGE_CPU_PACKED=0."""
    if x.device.type != "cpu" or _INTERPRET:
        return False
    if os.environ.get("INFERFORGE_CPU_PACKED", "1") == "0":
        _log_once("INFERFORGE_CPU_PACKED=0: quantized layers on the CPU run the PyTorch references")
        return False
    return True


class Int8PackedCPU:
    """int8 weight-only `x @ (weight_int8 * scale[:, None]).T + bias` with `_weight_int8pack_mm`."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        k = weight_int8.shape[1]
        # The bf16 kernel reads K in blocks of 32 (with other K it returns NaN or crashes in torch 2.13):
        # such layers get a zero-padded copy of the weights and x is padded per call.
        self.k_pad = -k % 32
        self.weight = torch.nn.functional.pad(weight_int8, (0, self.k_pad)).contiguous() if self.k_pad \
            else weight_int8.contiguous()                      # [N, K] int8: the module's own buffer
        self.scale = scale.to(torch.bfloat16)                  # [N]: the kernel wants x's dtype
        self.bias = bias
        self.in_features = k

    def tensors(self) -> tuple:
        """What this form holds in memory (runtime/kv_budget.py counts it)."""
        return self.weight, self.scale, self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2                      # the engine's [tokens, features]: no reshapes
        x2 = (x if flat else x.reshape(-1, self.in_features)).to(torch.bfloat16)
        if self.k_pad:
            x2 = torch.nn.functional.pad(x2, (0, self.k_pad))
        out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out if flat else out.reshape(*x.shape[:-1], -1)


def int4_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """Our (scale, zero) per [N, groups] -> torch's `scales_and_zeros` [groups, N, 2]:
    (q - zero) * scale = (q - 8) * scale + (8 - zero) * scale."""
    scales, zeros = scales.float(), zeros.float()
    return torch.stack([scales, (8.0 - zeros) * scales], dim=-1).transpose(0, 1).contiguous().to(dtype)


class Int4PackedCPU:
    """int4 weight-only (group-wise scale and zero point, optional AWQ input scale) with
    `_weight_int4pack_mm_for_cpu`. Build with `Int4PackedCPU.build`, which returns None for formats
    the kernel lacks."""

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, n: int, k: int,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None):
        self.weight, self.scales_and_zeros, self.group = weight, scales_and_zeros, group
        self.n, self.in_features, self.bias, self.input_scale = n, k, bias, input_scale

    @classmethod
    def build(cls, packed, scales, zeros, bias, group_size: int, input_scale=None) -> Int4PackedCPU | None:
        from inferforge.kernels.reference import unpack_int4

        n, k = packed.shape[0], packed.shape[1] * 2
        group = group_size
        if group > 256:      # same parameters for each 256-wide piece of a larger group
            scales = scales.repeat_interleave(group // 256, dim=1)
            zeros = zeros.repeat_interleave(group // 256, dim=1)
            group = 256
        if group not in _INT4_GROUPS:
            return None
        n_pad = -(-n // 16) * 16
        codes = torch.zeros(n_pad, k, dtype=torch.int32)
        codes[:n] = unpack_int4(packed.cpu()).to(torch.int32)
        pad = (0, 0, 0, n_pad - n)
        # Padded rows: scale 0 and zero 0 dequantize to 0; their outputs are sliced off anyway.
        scales_and_zeros = int4_scales_and_zeros(torch.nn.functional.pad(scales.cpu().float(), pad),
                                                 torch.nn.functional.pad(zeros.cpu().float(), pad))
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return cls(weight, scales_and_zeros, group, n, k, bias, input_scale)

    def tensors(self) -> tuple:
        """What this form holds in memory (runtime/kv_budget.py counts it)."""
        return self.weight, self.scales_and_zeros, self.bias, self.input_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:      # AWQ: x / s in float32, as the module does
            x2 = x2.float() / self.input_scale
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.group,
                                                          self.scales_and_zeros)
        out = out[:, :self.n].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.n)


def int8_linear_cpu(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`(x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias` for int8 x_q [M, K], w_q [N, K]:
    exact int32 products with `torch._int_mm` (K < 2^31 / 127^2), the scales in float32."""
    acc = torch._int_mm(x_q, w_q.T)
    out = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _key(tensors) -> tuple:
    # Changes when any source buffer is replaced or written in place (load_state_dict, copy_).
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def packed_for(module) -> Int8PackedCPU | Int4PackedCPU | None:
    """The packed CPU form of an `Int8WeightOnlyLinear` or `Int4WeightOnlyLinear`, built on first use
    (or by `prepare_cpu_packed`) and kept beside the module's own buffers, which stay as they are for
    saving and export; rebuilt if those buffers change. None when the format has no packed kernel."""
    from inferforge.kernels.int4_layout import KPAIRS
    from inferforge.optimize.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    if isinstance(module, Int8WeightOnlyLinear):
        sources = (module.weight_int8, module.scale, module.bias)
    elif isinstance(module, Int4WeightOnlyLinear):
        sources = (module.packed, module.scales, module.zeros, module.bias, module.input_scale)
    else:
        return None
    key = _key(sources)
    cached = module.__dict__.get("_cpu_packed")
    if cached is not None and cached[0] == key:
        return cached[1]
    if isinstance(module, Int8WeightOnlyLinear):
        packed = Int8PackedCPU(*sources)
        _log_once("int8 weight-only layers on the CPU: aten._weight_int8pack_mm with bfloat16 activations")
    else:
        codes = module.packed_in(KPAIRS)     # the CPU kernel's packing starts from k-pair codes
        packed = Int4PackedCPU.build(codes, *sources[1:4], module.group_size, sources[4])
        if packed is None:
            _log_once(f"int4 group size {module.group_size}: no packed CPU kernel (it takes groups of "
                      f"{', '.join(map(str, _INT4_GROUPS))} or multiples of 256); using the PyTorch reference",
                      logging.WARNING)
        else:
            _log_once("int4 weight-only layers on the CPU: aten._weight_int4pack_mm_for_cpu with bfloat16 "
                      "activations")
    module.__dict__["_cpu_packed"] = (key, packed)
    return packed


def prepare_cpu_packed(module) -> None:
    """Pack a quantized module for the CPU now (at load) instead of at its first call."""
    if isinstance(module, torch.nn.Module) and any(True for _ in module.buffers()) \
            and next(module.buffers()).device.type == "cpu" and use_cpu_packed(next(module.buffers())):
        packed_for(module)
