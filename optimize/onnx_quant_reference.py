"""Static activation scales for the QDQ export of W8A8 / FP8 artifacts, and the PyTorch model it is checked against.

The artifact's W8A8 and FP8 layers quantize activations dynamically (a scale per token, or per
tensor per call). TensorRT needs constant scales, so the exported graph quantizes each layer's
input with one static per-tensor scale, `s_x = max|x'| / qmax` over the calibration text, where
x' = x * (1/smooth) for SmoothQuant (x itself for FP8) and qmax = 127 (int8) or 448 (e4m3).

`StaticQDQLinear` does exactly the graph's arithmetic in PyTorch (float32):
    int8:  x_dq = clamp(round_half_even(x' / s_x), -128, 127) * s_x      (ONNX QuantizeLinear saturates to int8)
    fp8:   x_dq = e4m3(clamp(x' / s_x, -448, 448)) * s_x
    y      = x_dq @ (W_q * s_w)^T + bias
so ONNX vs this reference is tight, and `static_agreement` measures what the static scales cost
against the artifact's dynamic model on held-out text.

For weight-only formats `DequantizedLinear` is the graph's arithmetic too (and the artifact's on
the CPU): `y = (x [/ input_scale]) @ dequantize(W_q)^T + bias` in float32, the same on any device
(the artifact's GPU kernels may accumulate differently).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import UserInputError


class StaticQDQLinear(nn.Module):
    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, act_scale: float,
                 input_multiplier: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        scale = weight_scale if weight_scale.numel() == 1 else weight_scale[:, None]
        self.register_buffer("weight", weight_q.float() * scale.float())          # [N, K], what DequantizeLinear gives
        self.register_buffer("act_scale", torch.tensor(act_scale, dtype=torch.float32))
        self.register_buffer("input_multiplier", input_multiplier)
        self.register_buffer("bias", bias)
        self.fp8 = weight_q.dtype == torch.float8_e4m3fn
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]

    def forward(self, x):
        xf = x.float()
        if self.input_multiplier is not None:
            xf = xf * self.input_multiplier
        v = xf / self.act_scale
        if self.fp8:
            q = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
        else:
            q = torch.round(v).clamp(-128.0, 127.0)
        out = (q * self.act_scale) @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)


class DequantizedLinear(nn.Module):
    def __init__(self, module):
        from inferforge.kernels.reference import dequantize_weight_only_reference

        super().__init__()
        divisor = getattr(module, "input_scale", None)
        if hasattr(module, "packed"):   # int4: (q - zero) * scale, without AWQ's 1/s (x is divided instead)
            weight = dequantize_weight_only_reference(module.packed, module.scales, module.zeros, bits=4,
                                                      group_size=module.group_size, layout=module.layout)
        else:                           # int8: q * scale
            weight = module.weight_int8.float() * module.scale.float()[:, None]
        self.register_buffer("weight", weight)
        self.register_buffer("input_divisor", None if divisor is None else divisor.float().clone())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float().clone())
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x):
        xf = x.float()
        if self.input_divisor is not None:
            xf = xf / self.input_divisor
        out = xf @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)


def weight_only_reference(model: nn.Module, layers: list[str]) -> nn.Module:
    """A copy of the quantized `model` whose named weight-only layers are `DequantizedLinear`."""
    reference = copy.deepcopy(model).eval()
    for name in layers:
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent) if parent else reference, child,
                DequantizedLinear(reference.get_submodule(name)))
    return reference


def input_multiplier(module) -> torch.Tensor | None:
    """1/smooth (float32 [K]) for a W8A8 layer; None for FP8."""
    smooth = getattr(module, "smooth", None)
    return None if smooth is None else (1.0 / smooth.float()).contiguous()


def weight_codes(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8 or float8_e4m3fn, scale float32 [N] or [1]) of a W8A8 / FP8 layer."""
    if hasattr(module, "weight_int8"):
        return module.weight_int8, module.w_scale.float()
    return module.weight_fp8, module.w_scale.float().reshape(-1)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_calibration(artifact: Path, manifest: dict, calibration, *, flag: str = "--calibration FILE"):
    """The text for static scales and the agreement check: (file, calibration batches, held-out batches).

    `calibration` when given; else the artifact's own calibration file (its manifest records the file
    name), looked for in the working directory and beside the artifact, and used only when its
    calibration sequences hash as the manifest records. The split is the quantize step's:
    `num_samples` sequences of `seq_len` tokens calibrate, the next `max(1, num_samples // 2)` are held out."""
    from transformers import AutoTokenizer

    from inferforge.optimize.calibration import load_token_batches
    from inferforge.optimize.llm_quantize import _tokens_sha256

    fmt = manifest["quantization"]["format"]
    settings = (manifest.get("steps") or [{}])[0].get("settings", {})
    num_samples, seq_len = int(settings.get("num_samples", 16)), int(settings.get("seq_len", 128))
    held = max(1, num_samples // 2)
    tokenizer = AutoTokenizer.from_pretrained(artifact)

    def batches(path):
        hint = (f"the export calibrates static activation scales on {num_samples} sequences of {seq_len} tokens and "
                f"checks {held} held out (the quantize step's split): give a longer {flag}")
        return load_token_batches(path, tokenizer, num_samples=num_samples + held, seq_len=seq_len, too_short_hint=hint)

    if calibration is not None:
        path = Path(calibration)
        if not path.is_file():
            raise UserInputError(f"{flag.split()[0]} {path}: no such file")
        found = batches(path)
        return path, found[:num_samples], found[num_samples:]
    data = manifest["quantization"].get("data") or {}
    name, recorded = data.get("file"), manifest["quantization"].get("calibration_sha256")
    for candidate in ([Path(name), artifact.parent / name] if name else []):
        if candidate.is_file():
            found = batches(candidate)
            if _tokens_sha256(found[:num_samples]) == recorded:
                return candidate, found[:num_samples], found[num_samples:]
    where = (f"its calibration file {name!r} is not in the working directory or beside the artifact with the "
             "recorded content" if name else "the artifact records no calibration file")
    raise UserInputError(f"{artifact}: exporting {fmt} needs calibration text for static activation scales, and "
                         f"{where}; pass {flag}")


@torch.no_grad()
def collect_static_scales(model: nn.Module, names: list[str], batches) -> dict[str, float]:
    """Per named W8A8 / FP8 layer, max|x'| / qmax over every input row it sees on `batches` (run through
    `model`, the artifact's dynamic quantized model)."""
    absmax: dict[str, float] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        mult = input_multiplier(module)

        def record(mod, args, name=name, mult=mult):
            x = args[0].float()
            value = float((x * mult if mult is not None else x).abs().amax())
            absmax[name] = max(absmax.get(name, 0.0), value)
        hooks.append(module.register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [n for n in names if n not in absmax]
    if missing:
        raise UserInputError(f"layer {missing[0]!r} saw no calibration input; check the calibration text reaches it")
    qmax = {name: 448.0 if hasattr(model.get_submodule(name), "weight_fp8") else 127.0 for name in names}
    return {name: max(absmax[name] / qmax[name], 1e-12) for name in names}


def static_reference(model: nn.Module, scales: dict[str, float]) -> nn.Module:
    """A copy of `model` whose named W8A8 / FP8 layers are `StaticQDQLinear` with the given scales."""
    reference = copy.deepcopy(model).eval()
    for name, act_scale in scales.items():
        module = reference.get_submodule(name)
        codes, w_scale = weight_codes(module)
        bias = None if module.bias is None else module.bias.detach().float().clone()
        replacement = StaticQDQLinear(codes, w_scale, act_scale, input_multiplier(module), bias)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent) if parent else reference, child, replacement)
    return reference


@torch.no_grad()
def static_agreement(dynamic: nn.Module, static: nn.Module, batches) -> dict:
    """Top-1 agreement (share of positions whose argmax matches) and the largest |logit difference|
    of the static-scale model against the artifact's dynamic one on `batches` ([1, seq] int64)."""
    agree = count = 0
    max_diff = 0.0
    for batch in batches:
        a, b = dynamic(batch).logits.float(), static(batch).logits.float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += a.shape[0] * a.shape[1]
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {"top1_agreement": agree / count, "max_logit_diff": max_diff, "positions": count}
