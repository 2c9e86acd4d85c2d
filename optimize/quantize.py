"""Weight-only quantization of PyTorch models: `quantize(model, Int8WeightOnly())`.

Configs are frozen dataclasses that validate themselves; each config type has a handler in a
registry that turns one `nn.Linear` into its quantized replacement (after torchao's
`quantize_(model, config)` design). Linear layers whose qualified name matches a `skip` pattern
(fnmatch, e.g. "lm_head" or "*.mlp.down_proj") stay in full precision.

Formats:
- Int8WeightOnly: symmetric int8 per output channel, scale = max|w| / 127.
- Int4WeightOnly(group_size, symmetric): int4 per group of `group_size` input channels, packed two per
  byte; asymmetric: scale = (max - min) / 15 and an integer zero point, symmetric: scale = max|w| / 7
  with zero point 8. Method "rtn" (round to nearest) or "gptq" (Frantar et al., 2022): quantize
  one input column at a time and push each column's rounding error onto the columns not yet
  quantized, weighted by the inverse Hessian of the layer's inputs from calibration data, so the
  layer's *output* error is what gets minimized. The Hessians come from one pass of the float
  model over the calibration batches (not layer by layer through the quantized model). Or "awq"
  (Lin et al., 2023): input channels that carry large activations matter most, so they are scaled
  up by s = mean|x|^alpha before rounding (and the input divided by s at run time); alpha is
  searched per layer to minimize the output error on the calibration inputs.
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
        if self.method not in ("rtn", "gptq", "awq"):
            raise UserInputError(f"Int4WeightOnly: method {self.method!r} is not available; supported: 'rtn', 'gptq', "
                                 "'awq'")


@dataclass(frozen=True)
class W8A8:
    """int8 weights (per output channel) and dynamic per-token int8 activations, with SmoothQuant
    scales from calibration data: activation outliers move into the weights before quantizing."""

    smoothquant_alpha: float = 0.5
    observer: str = "minmax"        # how activation ranges are taken: minmax, percentile or mse
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        from inferforge.optimize.calibration import OBSERVERS

        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise UserInputError(f"W8A8: smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if self.observer not in OBSERVERS:
            raise UserInputError(f"W8A8: observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")


@dataclass(frozen=True)
class FP8:
    """e4m3 weights and dynamically scaled e4m3 activations, per tensor or per row. Native scaled
    matmul on GPUs with compute capability >= 8.9, an exact emulation elsewhere (e4m3 values,
    float32 products and accumulation)."""

    granularity: str = "tensor"
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.granularity not in ("tensor", "row"):
            raise UserInputError(f"FP8: granularity must be 'tensor' or 'row', got {self.granularity!r}")


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
        from inferforge.kernels.cpu_packed import packed_for, use_cpu_packed

        if use_cpu_packed(x):        # PyTorch's packed int8 kernel (kernels/cpu_packed.py)
            return packed_for(self)(x)
        if x.is_cuda:   # the candidate measured fastest for this shape (kernels/weight_only_dispatch.py)
            from inferforge.kernels.weight_only_dispatch import dispatch_forward

            return dispatch_forward(self, x)
        return w8a16_matmul(x, self.weight_int8, self.scale, self.bias)


class Int4WeightOnlyLinear(nn.Module):
    """`packed` holds the int4 codes in `layout` (kernels/int4_layout.py); readers that need another
    layout ask `packed_in(layout)`, and `use_kernel_layout()` re-packs for the device's kernel."""

    def __init__(self, packed, scales, zeros, bias, group_size: int, input_scale=None, layout: str = "int4-kpairs-v0"):
        from inferforge.kernels.int4_layout import check_layout

        super().__init__()
        check_layout(layout, k=packed.shape[1] * 2, group=group_size)
        self.layout = layout
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)     # AWQ: x is divided by it, W was multiplied
        self.group_size = group_size
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        from inferforge.kernels.reference import unpack_int4

        q = unpack_int4(self.packed, self.layout).float()
        g = self.group_size
        w = (q - self.zeros.repeat_interleave(g, 1)) * self.scales.repeat_interleave(g, 1)
        return w if self.input_scale is None else w / self.input_scale[None, :]

    def forward(self, x):
        from inferforge.kernels import w4a16_matmul
        from inferforge.kernels.cpu_packed import packed_for, use_cpu_packed

        packed = packed_for(self) if use_cpu_packed(x) else None
        if packed is not None:       # PyTorch's packed int4 kernel (kernels/cpu_packed.py)
            return packed(x)
        if self.input_scale is not None:
            x = (x / self.input_scale).to(x.dtype)
        if x.is_cuda:   # the candidate measured fastest for this shape (kernels/weight_only_dispatch.py)
            from inferforge.kernels.weight_only_dispatch import dispatch_forward

            return dispatch_forward(self, x)
        return w4a16_matmul(x, self.packed, self.scales, self.zeros, self.bias, group_size=self.group_size,
                            layout=self.layout)

    def packed_in(self, layout: str) -> torch.Tensor:
        """The packed codes in `layout` (this module's tensor itself when it already is)."""
        from inferforge.kernels.int4_layout import to_layout

        return to_layout(self.packed, self.layout, layout, self.out_features, self.in_features, self.group_size)

    def use_kernel_layout(self) -> Int4WeightOnlyLinear:
        """Re-pack (exactly) into the layout the w4a16 kernel prefers on this module's device; returns self."""
        from inferforge.kernels.int4_layout import kernel_layout

        layout = kernel_layout(self.packed.device, self.group_size, self.in_features)
        self.packed = self.packed_in(layout)
        self.layout = layout
        return self


class W8A8Linear(nn.Module):
    def __init__(self, weight_int8, w_scale, smooth, bias):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("smooth", smooth)          # per input channel: x is divided by it
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.w_scale[:, None] / self.smooth[None, :]

    def forward(self, x):
        from inferforge.kernels import int8_matmul, quantize_rows
        from inferforge.kernels.cpu_packed import int8_linear_cpu, use_cpu_packed

        lead = x.shape[:-1]
        # Per-token int8 of x / smooth: one fused Triton pass on a GPU, the same arithmetic in torch elsewhere.
        x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features), torch.int8, divisor=self.smooth)
        if use_cpu_packed(x):        # exact int32 products with torch._int_mm, not the int64 reference
            out = int8_linear_cpu(x_q, self.weight_int8, x_scale, self.w_scale, self.bias, out_dtype=x.dtype)
            return out.reshape(*lead, self.out_features)
        out = int8_matmul(x_q, self.weight_int8, x_scale, self.w_scale, self.bias, out_dtype=x.dtype)
        return out.reshape(*lead, self.out_features)


E4M3_MAX = 448.0


def quantize_fp8(t: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (a [1] tensor per tensor, or [rows] per row)."""
    amax = t.abs().amax() if granularity == "tensor" else t.abs().amax(dim=1)
    scale = (amax.float() / E4M3_MAX).clamp(min=1e-12).reshape(-1)
    div = scale if granularity == "tensor" else scale[:, None]
    return (t.float() / div).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class FP8Linear(nn.Module):
    def __init__(self, weight_fp8, w_scale, bias, granularity: str):
        super().__init__()
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", bias)
        self.granularity = granularity
        self.in_features, self.out_features = weight_fp8.shape[1], weight_fp8.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.w_scale if self.granularity == "tensor" else self.w_scale[:, None]
        return self.weight_fp8.float() * scale

    @staticmethod
    def native_available(device) -> bool:
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # torch._scaled_mm needs both matrix dimensions to be multiples of 16.
        if self.native_available(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            from inferforge.kernels import quantize_rows

            rows = self.granularity == "row"
            # Fused activation quantization: one kernel per row, two for a per-tensor scale.
            x_fp8, x_scale = quantize_rows(x2, torch.float8_e4m3fn, per_tensor=not rows)
            # Row-wise scaling in _scaled_mm produces bfloat16 only.
            out_dtype = torch.bfloat16 if rows else x.dtype
            out = torch._scaled_mm(x_fp8, self.weight_fp8.T, scale_a=x_scale[:, None] if rows else x_scale,
                                   scale_b=self.w_scale[None, :] if rows else self.w_scale,
                                   out_dtype=out_dtype).to(x.dtype)
        else:
            x_fp8, x_scale = quantize_fp8(x2, self.granularity)
            # Exact emulation: the same e4m3 values, float32 products and accumulation.
            a = x_fp8.float() * (x_scale if self.granularity == "tensor" else x_scale[:, None])
            out = (a @ self.dequantized_weight().T).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)


@register_quantize_handler(W8A8)
def _w8a8(linear: nn.Linear, config: W8A8, name: str, act_absmax=None) -> nn.Module:
    if act_absmax is None:
        raise UserInputError(f"{name}: W8A8 saw no calibration input for this layer; check the calibration data "
                             "reaches it or add it to skip")
    w = linear.weight.detach().float()
    alpha = config.smoothquant_alpha
    smooth = (act_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha))
    smooth = smooth.clamp(1e-2, 1e2)
    w_s = w * smooth[None, :]
    scale = (w_s.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w_s / scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return W8A8Linear(q, scale.float().contiguous(), smooth.float().contiguous(), bias)


@register_quantize_handler(FP8)
def _fp8(linear: nn.Linear, config: FP8, name: str) -> nn.Module:
    q, scale = quantize_fp8(linear.weight.detach(), config.granularity)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return FP8Linear(q, scale, bias, config.granularity)


@register_quantize_handler(Int8WeightOnly)
def _int8_weight_only(linear: nn.Linear, config: Int8WeightOnly, name: str) -> nn.Module:
    w = linear.weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return Int8WeightOnlyLinear(q, scale.float().contiguous(), bias)


def _int4_group_params(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w [..., group]."""
    if symmetric:
        scales = (w.abs().amax(dim=-1) / 7).clamp(min=1e-12)
        return scales, torch.full_like(scales, 8.0)
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    return scales, torch.round(-lo / scales).clamp(0, 15)


def _int4_codes(w, scales, zeros):
    return torch.clamp(torch.round(w / scales) + zeros, 0, 15)


def _gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group: int, symmetric: bool, block: int = 128,
               damp: float = 0.01, act_order: bool = True):
    """GPTQ with group-wise int4: returns codes [n, k] and per-group scales, zeros [n, k // group].

    With `act_order`, columns are quantized in order of decreasing Hessian diagonal (the inputs with
    the most energy first, so their error can still be compensated by the rest). The groups stay the
    stored, consecutive ones, so their scales and zeros are fixed up front from the original weights
    ("static groups"); without act_order each group's parameters come from its corrected weights."""
    w = weight.double().clone()
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = torch.zeros(n, k // group, dtype=w.dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    if act_order:
        s, z = _int4_group_params(w.reshape(n, k // group, group), symmetric)
        scales, zeros = s, z
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    block = max(block, group)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1, err1, hinv1 = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=w.dtype, device=w.device), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = int(perm[col]) // group          # the stored group of this column
            if not act_order and col % group == 0:   # parameters from the group's corrected weights
                scales[:, g], zeros[:, g] = _int4_group_params(w1[:, i:i + group], symmetric)
            s, z = scales[:, g], zeros[:, g]
            q = _int4_codes(w1[:, i], s, z)
            codes[:, col] = q
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return unpermuted, scales.float(), zeros.float()


@register_quantize_handler(Int4WeightOnly)
def _int4_weight_only(linear: nn.Linear, config: Int4WeightOnly, name: str, hessian=None, act_mean=None,
                      act_sample=None) -> nn.Module:
    from inferforge.kernels.int4_layout import kernel_layout
    from inferforge.kernels.reference import pack_int4

    n, k = linear.weight.shape
    g = config.group_size
    if k % g or k % 2:
        raise UserInputError(f"{name}: in_features ({k}) is not a multiple of the group size ({g}); choose a group "
                             f"size that divides it (--group-size, recipe key group_size) or keep the layer in float "
                             f"(--skip '{name}', recipe key skip)")
    input_scale = None
    if config.method == "awq":
        if act_mean is None:
            raise UserInputError(f"{name}: AWQ saw no calibration input for this layer; check the calibration data "
                                 f"reaches it or add it to skip")
        q, scales, zeros, input_scale = _awq_int4(linear.weight.detach().float(), act_mean, act_sample, g,
                                                  config.symmetric)
    elif config.method == "gptq":
        if hessian is None:
            raise UserInputError(f"{name}: GPTQ saw no calibration input for this layer; check the calibration data "
                                 f"reaches it or add it to skip")
        q, scales, zeros = _gptq_int4(linear.weight.detach(), hessian, g, config.symmetric)
    else:
        w = linear.weight.detach().float().reshape(n, k // g, g)
        scales, zeros = _int4_group_params(w, config.symmetric)
        q = _int4_codes(w, scales[..., None], zeros[..., None]).reshape(n, k)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    layout = kernel_layout(linear.weight.device, g, k)      # interleaved when quantizing on a GPU
    return Int4WeightOnlyLinear(pack_int4(q, layout), scales.contiguous(), zeros.contiguous(), bias, g, input_scale,
                                layout)


def _rtn_int4(w: torch.Tensor, group: int, symmetric: bool):
    n, k = w.shape
    grouped = w.reshape(n, k // group, group)
    scales, zeros = _int4_group_params(grouped, symmetric)
    q = _int4_codes(grouped, scales[..., None], zeros[..., None]).reshape(n, k)
    return q, scales, zeros


def _awq_int4(w: torch.Tensor, act_mean: torch.Tensor, x: torch.Tensor, group: int, symmetric: bool,
              grid: int = 20):
    """Search alpha in [0, 1): s = mean|x|^alpha / normalizer, quantize W * s, score ||x W^T - (x/s) Q^T||."""
    want = x @ w.T
    best = None
    for alpha in torch.arange(grid) / grid:
        s = act_mean.clamp(min=1e-5) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q, scales, zeros = _rtn_int4(w * s[None, :], group, symmetric)
        g = group
        deq = (q - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
        err = ((x / s) @ deq.T - want).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, q, scales, zeros, s)
    return best[1], best[2], best[3], best[4].float().contiguous()


def _run_with_hooks(model, names, calibration, record):
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: record(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    try:
        with torch.no_grad():
            for batch in calibration:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()


def collect_input_absmax(model: nn.Module, names: list[str], calibration, observer: str = "minmax",
                         max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """Per input channel, the |x| range each named nn.Linear sees on the calibration batches: the
    maximum over all of them (minmax), or the observer applied to the first `max_rows` input rows."""
    from inferforge.optimize.calibration import observe_range

    absmax, rows = {}, {}

    def record(name, x):
        if observer == "minmax":
            m = x.abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
        else:
            kept = rows.setdefault(name, [])
            have = sum(r.shape[0] for r in kept)
            if have < max_rows:
                kept.append(x[: max_rows - have].float().cpu())

    _run_with_hooks(model, names, calibration, record)
    for name, kept in rows.items():
        absmax[name] = observe_range(torch.cat(kept), observer)
    return absmax


def collect_input_samples(model: nn.Module, names: list[str], calibration, max_rows: int = 2048) -> dict[str, torch.Tensor]:
    """The first `max_rows` input rows (float32) each named nn.Linear sees on the calibration batches."""
    rows = {}

    def record(name, x):
        kept = rows.setdefault(name, [])
        have = sum(r.shape[0] for r in kept)
        if have < max_rows:
            kept.append(x[: max_rows - have].float())

    _run_with_hooks(model, names, calibration, record)
    return {name: torch.cat(kept) for name, kept in rows.items()}


def collect_hessians(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """H = 2/N * sum x x^T over every input row x each named nn.Linear sees on the calibration batches
    (a tensor batch is passed as model(batch), a dict as model(**batch))."""
    sums, counts = {}, {}

    def record(name, x):
        x = x.double()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    _run_with_hooks(model, names, calibration, record)
    return {name: 2 * sums[name] / counts[name] for name in sums}


@dataclass
class QuantizeReport:
    """Per replaced layer, the weight SQNR in dB; the layers kept in full precision (by the config's
    skip patterns, and by auto_skip to pass the gate); the held-out metrics and the gate's verdict."""

    config: object
    layers: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    auto_skipped: list[str] = field(default_factory=list)
    metrics: dict | None = None
    gate_failures: list[str] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.layers.items(), key=lambda kv: kv[1])[:n]


def quantize(model: nn.Module, config, *, calibration=None, gate=None, eval_data=None,
             auto_skip: bool = False, max_auto_skipped: int | None = None,
             raise_on_gate: bool = True) -> QuantizeReport:
    """Replace the model's nn.Linear layers in place with quantized ones per `config`.

    Returns a `QuantizeReport` with each layer's weight SQNR (dB, vs. the original weights). With a
    `gate` and held-out `eval_data`, the quantized model is compared with the original (`LMGate`:
    perplexity, top-1 agreement, KL on token batches; `EncoderGate`: mean-pooled embedding cosine on
    tokenizer batches); a missed gate raises `GateFailed`, unless
    `auto_skip=True`, which restores the layers with the lowest SQNR to full precision one at a
    time until the gate passes (they are listed in `report.auto_skipped`), at most `max_auto_skipped`
    of them when given. With `raise_on_gate=False` a missed gate is returned in
    `report.gate_failures` instead of raised (the caller words the message)."""
    if gate is not None:
        return _quantize_gated(model, config, calibration, gate, eval_data, auto_skip, max_auto_skipped,
                               raise_on_gate)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise UserInputError(f"no quantization handler for {type(config).__name__}; known configs: {known}")
    needs_data = getattr(config, "method", "rtn") in ("gptq", "awq") or isinstance(config, W8A8)
    if needs_data and calibration is None:
        raise UserInputError(f"{type(config).__name__} with these settings needs calibration data: "
                             "quantize(model, config, calibration=[batch, ...])")
    if not needs_data and calibration is not None:
        raise UserInputError(f"{type(config).__name__} with these settings uses no calibration data")
    report = QuantizeReport(config)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if any(fnmatch.fnmatch(name, pattern) for pattern in config.skip):
                report.skipped.append(name)
            else:
                targets.append((name, module))
    names = [n for n, _ in targets]
    stats, key = {}, None
    if isinstance(config, W8A8):
        stats, key = collect_input_absmax(model, names, calibration, observer=config.observer), "act_absmax"
    elif getattr(config, "method", None) == "awq":
        stats, key = collect_input_samples(model, names, calibration), "awq"
    elif needs_data:
        stats, key = collect_hessians(model, names, calibration), "hessian"
    for name, linear in targets:
        if key == "awq":
            sample = stats.get(name)
            extra = {"act_mean": None if sample is None else sample.abs().mean(dim=0), "act_sample": sample}
        else:
            extra = {key: stats.get(name)} if key else {}
        replacement = handler(linear, config, name, **extra).to(linear.weight.device)
        report.layers[name] = sqnr_db(linear.weight.detach(), replacement.dequantized_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return report


def _quantize_gated(model, config, calibration, gate, eval_data, auto_skip, max_auto_skipped=None,
                    raise_on_gate=True) -> QuantizeReport:
    import copy

    from inferforge.errors import GateFailed

    if not eval_data:
        raise UserInputError("a gate needs held-out eval_data: quantize(..., gate=LMGate(...), eval_data=[batch, ...])")
    original = copy.deepcopy(model).eval()
    report = quantize(model, config, calibration=calibration)
    report.metrics = gate.evaluate(original, model, eval_data)
    report.gate_failures = gate.failures(report.metrics)
    by_sensitivity = [name for name, _ in sorted(report.layers.items(), key=lambda kv: kv[1])]
    if max_auto_skipped is not None:
        by_sensitivity = by_sensitivity[:max(0, max_auto_skipped)]
    while report.gate_failures and auto_skip and by_sensitivity:
        name = by_sensitivity.pop(0)                  # the layer with the lowest SQNR goes back to full precision
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, copy.deepcopy(original.get_submodule(name)))
        report.auto_skipped.append(name)
        del report.layers[name]
        report.metrics = gate.evaluate(original, model, eval_data)
        report.gate_failures = gate.failures(report.metrics)
    if report.gate_failures and raise_on_gate:
        hint = "" if auto_skip else "; pass auto_skip=True to keep the most sensitive layers in full precision"
        raise GateFailed(f"quantization gate missed: {'; '.join(report.gate_failures)}{hint}")
    return report


QUANTIZED_FORMAT = "inferforge-quantized/1"
_CONFIG_TYPES = {cls.__name__: cls for cls in (Int8WeightOnly, Int4WeightOnly, W8A8, FP8)}


def save_quantized(model: nn.Module, directory, report: QuantizeReport) -> None:
    """Write `model.safetensors` (every parameter and buffer, quantized ones included; never pickle)
    and `quantization.json` (the config, each quantized layer's format and shape, the skipped layers
    and the per-layer SQNR), atomically."""
    import dataclasses
    import json
    from pathlib import Path

    from safetensors.torch import save_model

    from inferforge.fileio import atomic_write_text, atomic_write_via

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8WeightOnlyLinear):
            layers[name] = {"format": "int8", "in": module.in_features, "out": module.out_features,
                            "bias": module.bias is not None}
        elif isinstance(module, Int4WeightOnlyLinear):
            layers[name] = {"format": "int4", "in": module.in_features, "out": module.out_features,
                            "bias": module.bias is not None, "group_size": module.group_size,
                            "input_scale": module.input_scale is not None, "layout": module.layout}
        elif isinstance(module, W8A8Linear):
            layers[name] = {"format": "w8a8", "in": module.in_features, "out": module.out_features,
                            "bias": module.bias is not None}
        elif isinstance(module, FP8Linear):
            layers[name] = {"format": "fp8", "in": module.in_features, "out": module.out_features,
                            "bias": module.bias is not None, "granularity": module.granularity}
    meta = {"format": QUANTIZED_FORMAT,
            "config": {"type": type(report.config).__name__, **dataclasses.asdict(report.config)},
            "layers": layers, "skipped": report.skipped, "auto_skipped": report.auto_skipped,
            "metrics": report.metrics, "sqnr_db": report.layers}
    atomic_write_via(directory / "model.safetensors", lambda tmp: save_model(model, tmp, metadata={"format": QUANTIZED_FORMAT}))
    atomic_write_text(directory / "quantization.json", json.dumps(meta, indent=2) + "\n")


def load_quantized(model: nn.Module, directory) -> nn.Module:
    """Rebuild the quantized layers listed in `quantization.json` inside `model` (the same
    architecture, unquantized) and load `model.safetensors` into it; returns the model."""
    import json
    from pathlib import Path

    from safetensors.torch import load_model

    directory = Path(directory)
    path = directory / "quantization.json"
    if not path.is_file():
        raise UserInputError(f"{directory}: no quantization.json; not a directory written by save_quantized")
    meta = json.loads(path.read_text())
    if meta.get("format") != QUANTIZED_FORMAT:
        raise UserInputError(f"{path}: format {meta.get('format')!r} is not {QUANTIZED_FORMAT}")
    for name, info in meta["layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise UserInputError(f"{path}: the model has no layer {name!r}; load into the architecture that was "
                                 "quantized") from None
        if not isinstance(current, nn.Linear) or (current.in_features, current.out_features) != (info["in"], info["out"]):
            raise UserInputError(f"{path}: layer {name!r} is not an nn.Linear({info['in']}, {info['out']}) in this model")
        parent, _, child = name.rpartition(".")
        try:
            shell = quantized_shell(info)
        except UserInputError as e:
            raise UserInputError(f"{path}, layer {name!r}: {e}") from None
        setattr(model.get_submodule(parent) if parent else model, child, shell.to(current.weight.device))
    load_model(model, str(directory / "model.safetensors"), strict=True)
    for module in model.modules():
        if isinstance(module, Int4WeightOnlyLinear):
            module.use_kernel_layout()
    return model


def quantized_shell(info: dict) -> nn.Module:
    """An empty quantized layer for one `quantization.json` layer entry, to load its tensors into."""
    n, k = info["out"], info["in"]
    bias = torch.empty(n) if info["bias"] else None
    if info["format"] == "int8":
        return Int8WeightOnlyLinear(torch.empty(n, k, dtype=torch.int8), torch.empty(n), bias)
    if info["format"] == "w8a8":
        return W8A8Linear(torch.empty(n, k, dtype=torch.int8), torch.empty(n), torch.empty(k), bias)
    if info["format"] == "fp8":
        rows = n if info["granularity"] == "row" else 1
        return FP8Linear(torch.empty(n, k, dtype=torch.float8_e4m3fn), torch.empty(rows), bias, info["granularity"])
    if info["format"] == "int4":
        g = info["group_size"]
        # An entry without "layout" predates the field: the only layout then was int4-kpairs-v0.
        return Int4WeightOnlyLinear(torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, k // g),
                                    torch.empty(n, k // g), bias, g, torch.empty(k) if info.get("input_scale") else None,
                                    info.get("layout", "int4-kpairs-v0"))
    raise UserInputError(f"quantized layer format {info['format']!r} is not known to this version of inferforge")
