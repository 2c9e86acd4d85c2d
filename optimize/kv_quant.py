"""KV-cache quantization: per-layer, per-KV-head scales for int8 or fp8 caches, from calibration prompts.

The scale maps the largest |K| (or |V|) a head produced on the calibration prompts to the top of the
format's range (127 for int8, 448 for e4m3), times `headroom` (> 1 leaves room for larger values
at serving time; int8 saturates beyond it, fp8 keeps a coarser but finite grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferforge.errors import UserInputError

FORMAT_MAX = {"int8": 127.0, "fp8": 448.0}


@dataclass(frozen=True)
class KVCacheQuant:
    dtype: str = "int8"
    headroom: float = 1.1

    def __post_init__(self):
        if self.dtype not in FORMAT_MAX:
            raise UserInputError(f"KVCacheQuant: dtype must be 'int8' or 'fp8', got {self.dtype!r}")
        if self.headroom < 1.0:
            raise UserInputError(f"KVCacheQuant: headroom must be >= 1, got {self.headroom}")


def calibrate_kv_scales(model, prompts, config: KVCacheQuant = KVCacheQuant()) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `prompts` (token-id lists) through `model` (a `LlamaModel`) with a float cache and return
    float32 `(k_scales, v_scales)`, each `[num_layers, n_kv_heads]`, for `LLMEngine.from_pretrained(...,
    kv_cache_dtype=config.dtype, kv_scales=...)`."""
    from inferforge.kernels import PagedKVCache
    from inferforge.runtime.engine import LLMEngine

    if not prompts:
        raise UserInputError("calibrate_kv_scales needs at least one prompt")
    spec = model.spec
    k_max = torch.zeros(spec.num_layers, spec.n_kv_heads, device=model.device)
    v_max = torch.zeros_like(k_max)

    def observe(layer, k, v):
        k_max[layer] = torch.maximum(k_max[layer], k.detach().abs().amax(dim=(0, 2)).float())
        v_max[layer] = torch.maximum(v_max[layer], v.detach().abs().amax(dim=(0, 2)).float())

    longest = max(len(p) for p in prompts) + 1
    cache = PagedKVCache(num_layers=spec.num_layers, num_blocks=-(-longest // 16) * len(prompts) + 1,
                         n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, dtype=model.dtype, device=model.device)
    engine = LLMEngine(model, cache, max_num_seqs=len(prompts), max_context=spec.max_position_embeddings)
    model.kv_observer = observe
    try:
        engine.generate([list(p) for p in prompts], max_new_tokens=1, stop_token_ids=[])
    finally:
        model.kv_observer = None
    top = FORMAT_MAX[config.dtype]
    scale = lambda m: (m * config.headroom / top).clamp(min=1e-8).float().contiguous()  # noqa: E731
    return scale(k_max), scale(v_max)
