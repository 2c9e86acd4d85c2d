"""Quantized linear layers for `LlamaModel`, read from an artifact of `inferforge quantize --config`.

`quantization.json` lists every quantized `nn.Linear` by its transformers name (for example
`model.layers.0.self_attn.q_proj`) with its format and shape; `model.safetensors` holds their tensors
(`weight_int8` + `scale`, `packed` + `scales` + `zeros` [+ `input_scale`], ...) beside the float
tensors of everything else. Each is rebuilt as the module of `inferforge.optimize.quantize`, so the
engine runs the same arithmetic as the quantized transformers model, on the same kernels:
`Int8WeightOnlyLinear` -> `w8a16_matmul`, `Int4WeightOnlyLinear` -> `w4a16_matmul`, `W8A8Linear` ->
per-token int8 activations and `int8_matmul`, `FP8Linear` -> scaled e4m3 matmul (emulated below sm89).

`LlamaModel` runs q/k/v as one matmul and gate/up as another. For quantized layers `fuse_rows`
stacks their output channels into one module when that changes no number: every output channel
has its own scale (and int4 zero points per group of its own row), and nothing is applied per
*input* channel that differs between the layers (AWQ's input scale, SmoothQuant's divisor, a
per-tensor fp8 scale). Otherwise the layers run one after another (`ConcatLinear`).

On the CPU the int8 and int4 modules run PyTorch's packed kernels (`inferforge.kernels.cpu_packed`),
packed here once at load: fused projections after fusing, the other layers as they are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import UserInputError


class DenseLinear:
    """A float projection `x @ weight.T + bias` with the interface of the quantized modules."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class ConcatLinear:
    """Several projections of the same input, their outputs concatenated (q|k|v or gate|up)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def read_quantization(path: Path) -> dict | None:
    """The artifact's quantization.json, or None for a plain checkpoint directory."""
    from inferforge.optimize.quantize import QUANTIZED_FORMAT

    meta_path = Path(path) / "quantization.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{meta_path}: not valid JSON ({e}); the artifact is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != QUANTIZED_FORMAT or not isinstance(meta.get("layers"), dict):
        raise UserInputError(f"{meta_path}: not an {QUANTIZED_FORMAT} file")
    return meta


def take_quantized_linears(meta: dict, weights: dict[str, torch.Tensor], device) -> dict[str, nn.Module]:
    """Rebuild every quantized layer of `meta` from `weights` (its tensors are removed from the dict),
    on `device` with the stored dtypes; returns {transformers name: module}."""
    from inferforge.kernels.cpu_packed import prepare_cpu_packed
    from inferforge.optimize.quantize import quantized_shell

    layers = {}
    for name, info in meta["layers"].items():
        try:
            module = quantized_shell(info)
        except UserInputError as e:
            raise UserInputError(f"quantization.json, layer {name!r}: {e}") from None
        state = {}
        for key in module.state_dict():
            full = f"{name}.{key}"
            if full not in weights:
                raise UserInputError(f"quantized checkpoint is missing tensor {full!r} of layer {name!r}")
            state[key] = weights.pop(full)
        module.load_state_dict(state, strict=True)
        layers[name] = module.to(device).eval()
        if hasattr(module, "use_kernel_layout"):       # int4: the stored layout -> the device kernel's
            module.use_kernel_layout()
        if not name.endswith(_FUSED_PARTS):      # those are packed once fused (fused_projection)
            prepare_cpu_packed(layers[name])
    return layers


# The projections LlamaModel passes to fused_projection (q/k/v, gate/up).
_FUSED_PARTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _same(tensors) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


def fuse_rows(modules: list[nn.Module]) -> nn.Module | None:
    """One quantized module computing the concatenated outputs of `modules` (same input), or None
    when their formats or per-input-channel factors differ (see the module docstring)."""
    from inferforge.optimize.quantize import FP8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Linear

    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        return None
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)

    def cat(attr):
        return torch.cat([getattr(m, attr) for m in modules]).contiguous()

    if isinstance(first, Int8WeightOnlyLinear):
        return Int8WeightOnlyLinear(cat("weight_int8"), cat("scale"), bias)
    if isinstance(first, Int4WeightOnlyLinear):
        if any(m.input_scale is not None or m.group_size != first.group_size or m.layout != first.layout
               for m in modules):
            return None
        return Int4WeightOnlyLinear(cat("packed"), cat("scales"), cat("zeros"), bias, first.group_size,
                                    layout=first.layout)
    if isinstance(first, W8A8Linear):
        if not _same([m.smooth for m in modules]):
            return None
        return W8A8Linear(cat("weight_int8"), cat("w_scale"), first.smooth, bias)
    if isinstance(first, FP8Linear):
        if any(m.granularity != "row" for m in modules):
            return None
        return FP8Linear(cat("weight_fp8"), cat("w_scale"), bias, "row")
    return None


def fused_projection(parts: list, biases: list):
    """q/k/v (or gate/up) as one callable: `parts` are dense weights or quantized modules, `biases`
    the dense parts' biases (None where there is none). Returns (weight or module, bias or None):
    a dense weight with its bias for `F.linear` when every part is float, else a module."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts), (torch.cat(biases) if biases[0] is not None else None)
    from inferforge.kernels.cpu_packed import prepare_cpu_packed

    if all(isinstance(p, nn.Module) for p in parts):
        fused = fuse_rows(parts)
        if fused is not None:
            prepare_cpu_packed(fused)                # on the CPU: PyTorch's packed kernels, packed once here
            return fused, None
    for p in parts:
        prepare_cpu_packed(p)
    return ConcatLinear([p if isinstance(p, nn.Module) else DenseLinear(p, b) for p, b in zip(parts, biases)]), None


def call_cpu_kernels_directly(model) -> int:
    """On the CPU, put each quantized projection's packed kernel (`kernels/cpu_packed.py`) where the
    model calls it, in place of the module: a decode step then skips, on each of its projections, the
    module call, the INFERFORGE_CPU_PACKED check and the lookup that notices changed buffers (a few
    tens of microseconds each, about 2 ms of a 31 ms int8 step on the 300M benchmark model). The engine
    never changes its weights after loading, so the packed form cannot go stale. Returns how many
    projections were replaced; with INFERFORGE_CPU_PACKED=0 at load, none."""
    from inferforge.kernels.cpu_packed import packed_for, use_cpu_packed
    from inferforge.runtime.llama import LAYER_PROJECTIONS

    if not use_cpu_packed(model.embed):
        return 0

    def direct(op):
        if not isinstance(op, nn.Module):
            return op
        packed = packed_for(op)
        return op if packed is None else packed

    replaced = 0
    for layer in model.layers:
        for name in LAYER_PROJECTIONS:
            op = direct(layer[name])
            replaced += op is not layer[name]
            layer[name] = op
    head = direct(model.lm_head)
    replaced += head is not model.lm_head
    model.lm_head = head
    return replaced
