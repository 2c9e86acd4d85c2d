"""KV-cache memory planning: how much context and concurrency fit in a memory budget.

    weights         = sum of the checkpoint's tensor sizes (in the serving dtype)
    kv_bytes/token  = 2 (K and V) * layers * n_kv_heads * head_dim * bytes(kv dtype)
    kv_budget       = memory * (1 - reserve) - weights
    max_context(c)  = kv_budget / (c * kv_bytes/token), rounded down to whole cache blocks, capped at
                      the model's context window
    max_concurrency(n) = kv_budget / (n rounded up to whole blocks * kv_bytes/token)

`reserve` (default 10%) is left for activations, the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from inferforge.errors import UserInputError

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1,
               "int4": 0.5}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1,
                      "I32": 4, "I64": 8, "I16": 2, "BOOL": 1}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '24 GB', '512MiB' or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserInputError(f"memory {text!r}: give a size such as 80GiB, 24GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _dtype_bytes(name: str, what: str) -> float:
    if name not in DTYPE_BYTES:
        raise UserInputError(f"{what} {name!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelShape:
    layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    context_window: int
    weight_bytes: int
    parameters: int
    weights_dtype: str


def read_model_shape(model_dir: str | Path, *, weights_dtype: str | None = None) -> ModelShape:
    """Shape of a Hugging Face decoder from config.json and the safetensors headers (no weights loaded)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserInputError(f"{model_dir}: no config.json; give a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    try:
        layers, n_heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    except KeyError as e:
        raise UserInputError(f"{cfg_path}: missing {e.args[0]}; is this a decoder (Llama, Mistral, Qwen2) config?") from None
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    params, stored = 0, 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for s in info["shape"]:
                n *= s
            params += n
            stored += n * _SAFETENSORS_BYTES.get(info["dtype"], 2)
    if params == 0:
        raise UserInputError(f"{model_dir}: no *.safetensors weights to size the model from")
    if weights_dtype:
        weight_bytes, dtype = int(params * _dtype_bytes(weights_dtype, "weights dtype")), weights_dtype
    else:
        weight_bytes, dtype = stored, str(cfg.get("torch_dtype") or cfg.get("dtype") or "as stored")
    return ModelShape(layers, n_heads, n_kv, head_dim, hidden, int(cfg.get("max_position_embeddings", 0)),
                      weight_bytes, params, dtype)


def plan(model_dir: str | Path, *, memory: str | int, kv_cache_dtype: str = "bf16", weights_dtype: str | None = None,
         max_context: int | None = None, concurrency: int | None = None, block_size: int = 16,
         reserve: float = 0.10) -> dict:
    """Memory plan for serving `model_dir` in `memory`: see the module docstring for the formulas."""
    shape = read_model_shape(model_dir, weights_dtype=weights_dtype)
    total = parse_bytes(memory)
    if not 0 <= reserve < 1:
        raise UserInputError(f"reserve must be in [0, 1), got {reserve}")
    kv_per_token = 2 * shape.layers * shape.n_kv_heads * shape.head_dim * _dtype_bytes(kv_cache_dtype, "kv cache dtype")
    budget = total * (1 - reserve) - shape.weight_bytes
    if budget <= 0:
        raise UserInputError(f"the weights ({shape.weight_bytes / 2**30:.2f} GiB) do not fit in {memory} with "
                             f"{reserve:.0%} reserved; give more memory or quantize the weights (--weights-dtype int8)")
    tokens = int(budget // kv_per_token)
    window = shape.context_window or None

    def context_for(c: int) -> int:
        per_seq = (tokens // c) // block_size * block_size
        return min(per_seq, window) if window else per_seq

    def concurrency_for(n: int) -> int:
        return tokens // (-(-n // block_size) * block_size)

    contexts = sorted({1024, 4096, 8192, 32768, 131072, *([max_context] if max_context else [])})
    concurrencies = sorted({1, 8, 32, 128, *([concurrency] if concurrency else [])})
    return {
        "model": str(model_dir), "memory_bytes": total, "reserve": reserve, "kv_cache_dtype": kv_cache_dtype,
        "model_shape": asdict(shape), "weight_bytes": shape.weight_bytes, "kv_bytes_per_token": kv_per_token,
        "kv_budget_bytes": int(budget), "kv_tokens": tokens, "block_size": block_size,
        "max_context_by_concurrency": [{"concurrency": c, "max_context": context_for(c)} for c in concurrencies],
        "max_concurrency_by_context": [{"context": n, "max_concurrency": concurrency_for(n),
                                        "beyond_model_window": bool(window and n > window)} for n in contexts],
    }
