"""KV-cache memory planning: how much context and concurrency fit in a memory budget.

    weights         = sum of the checkpoint's tensor sizes (in the serving dtype); for a directory with
                      config.json only, the parameters of a Llama-family decoder counted from the config
                      (embeddings, per layer q/k/v/o and the gated MLP and two norms, final norm, lm_head
                      unless tied) at `torch_dtype` (bf16 when unset)
    activation_peak = the transient memory of one step of `max_step_tokens` tokens, by the formula in
                      `runtime/kv_budget.py` (the engine measures it on CUDA, and uses the same formula on CPU)
                      + on the CPU (`--device cpu`) what the engine's weight layout adds (`cpu_packed_bytes`,
                      runtime/cpu_linear.py): for `--cpu-linears copy` a packed copy of the float
                      q/k/v/o, MLP and LM-head weights, for `onednn` a tied LM head's copy, for `auto` the
                      larger of the two candidates (an upper bound on what the timing at load keeps)
    kv_bytes/token  = 2 (K and V) * layers * n_kv_heads * head_dim * bytes(kv dtype)
    kv_budget       = memory * (1 - reserve) - weights - activation_peak
    max_context(c)  = kv_budget / (c * kv_bytes/token), rounded down to whole cache blocks, capped at
                      the model's context window
    max_concurrency(n) = kv_budget / (n rounded up to whole blocks * kv_bytes/token)
    engine.num_blocks  = what `LLMEngine.from_pretrained(memory_budget=memory * (1 - reserve))` allocates
                      for `concurrency` (default 8) sequences of `max_context` (default: the window):
                      min(kv_budget // (block_size * kv_bytes/token), concurrency * ceil(max_context / block_size))

`--memory` is the device's whole memory; `reserve` (default 10%) is left for the CUDA context and
allocator fragmentation, as vLLM's gpu_memory_utilization=0.9. The KV arithmetic is shared with the
engine (`runtime/kv_budget.py`) so the two cannot drift.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from inferforge.checkpoint_files import read_config, read_safetensors_header
from inferforge.errors import UserInputError
from inferforge.runtime import kv_budget as kvb

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
        raise UserInputError(f"--memory {text!r}: give a size such as 80GiB, 24GB or 512MiB")
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
    weights_from: str = "safetensors headers"     # or "config.json" when the directory has no weights
    intermediate: int = 0
    vocab: int = 0
    tied_lm_head: bool = False       # the LM head is the embedding (tie_word_embeddings, or no lm_head.weight)


def read_model_shape(model_dir: str | Path, *, weights_dtype: str | None = None) -> ModelShape:
    """Shape of a Hugging Face decoder from config.json and the safetensors headers (no weights loaded)."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir, what="a Hugging Face decoder directory")
    cfg_path = model_dir / "config.json"
    try:
        layers, n_heads, hidden = (int(cfg[k]) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    except KeyError as e:
        raise UserInputError(f"{cfg_path}: missing {e.args[0]}; is this a decoder (Llama, Mistral, Qwen2) config?") from None
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    params, stored, names = 0, 0, set()
    for f in sorted(model_dir.glob("*.safetensors")):
        header = read_safetensors_header(f)
        names.update(header)
        for info in header.values():
            n = 1
            for s in info["shape"]:
                n *= s
            params += n
            stored += n * _SAFETENSORS_BYTES.get(info["dtype"], 2)
    source = "safetensors headers"
    stored_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    if params == 0:
        params, source = _parameters_from_config(cfg, cfg_path), "config.json"
        stored_dtype = stored_dtype if stored_dtype in DTYPE_BYTES else "bf16"
        stored = int(params * DTYPE_BYTES[stored_dtype])
    if weights_dtype:
        weight_bytes, dtype = int(params * _dtype_bytes(weights_dtype, "--weights-dtype")), weights_dtype
    else:
        weight_bytes, dtype = stored, stored_dtype or "as stored"
    return ModelShape(layers, n_heads, n_kv, head_dim, hidden, int(cfg.get("max_position_embeddings", 0)),
                      weight_bytes, params, dtype, source, int(cfg.get("intermediate_size", 0)),
                      int(cfg.get("vocab_size", 0)),
                      bool(cfg.get("tie_word_embeddings"))
                      or (bool(names) and not any(n.startswith("lm_head.") for n in names)))


def _parameters_from_config(cfg: dict, cfg_path: Path) -> int:
    """Parameters of a Llama-family decoder from its config (see the module docstring)."""
    try:
        hidden, inter, vocab = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise UserInputError(f"{cfg_path.parent}: no *.safetensors weights, and config.json lacks {e.args[0]} to count "
                             "the parameters from; add the weights or the key") from None
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    attention = hidden * heads * head_dim + 2 * hidden * kv + heads * head_dim * hidden
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attention += heads * head_dim + 2 * kv
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return int(cfg["num_hidden_layers"]) * per_layer + embeddings + hidden


PACKABLE_WEIGHT_DTYPES = ("fp32", "float32", "bf16", "bfloat16")


def packed_projection_bytes(shape: ModelShape) -> int:
    """The CPU engine's packed copy (MKL's or oneDNN's) of every q/k/v/o, MLP and LM-head weight
    (`runtime/cpu_linear.py`), at the weights' bytes per parameter."""
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    per_layer = shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * shape.intermediate
    return int((shape.layers * per_layer + shape.vocab * shape.hidden) * shape.weight_bytes / shape.parameters)


def cpu_packed_bytes(shape: ModelShape, max_num_seqs: int, layout: str = "auto") -> int:
    """What the CPU engine's linear layout adds to the weights (runtime/cpu_linear.py): "dense" nothing;
    "copy" a copy of every projection and the LM head; "onednn" a tied LM head's copy (the embedding
    stays). "auto" (timed at load) the most its candidates add: "copy" with more than DENSE_MAX_ROWS
    sequences, else "onednn"."""
    if shape.weights_dtype not in PACKABLE_WEIGHT_DTYPES or layout == "dense":
        return 0
    if layout == "copy" or (layout == "auto" and kvb.packs_by_default(max_num_seqs)):
        return packed_projection_bytes(shape)
    return int(shape.vocab * shape.hidden * shape.weight_bytes / shape.parameters) if shape.tied_lm_head else 0


def plan(model_dir: str | Path, *, memory: str | int, kv_cache_dtype: str = "bf16", weights_dtype: str | None = None,
         max_context: int | None = None, concurrency: int | None = None, block_size: int = 16,
         reserve: float = 0.10, max_step_tokens: int = 256, device: str = "cuda", cpu_linears: str = "auto") -> dict:
    """Memory plan for serving `model_dir` in `memory`: see the module docstring for the formulas.
    `device="cpu"` plans the CPU engine, counting what its weight layout `cpu_linears` adds to the
    weights (`cpu_packed_bytes`)."""
    if device not in ("cuda", "cpu"):
        raise UserInputError(f"--device must be cuda or cpu, got {device!r}")
    if cpu_linears not in kvb.CPU_LINEAR_FLAGS:
        raise UserInputError(f"--cpu-linears must be one of {', '.join(kvb.CPU_LINEAR_FLAGS)}, got {cpu_linears!r}")
    if cpu_linears != "auto" and device != "cpu":
        raise UserInputError(f"--cpu-linears {cpu_linears} is the CPU engine's weight layout: add --device cpu, or "
                             "drop --cpu-linears")
    for value, flag in ((max_context, "--max-context"), (concurrency, "--concurrency"), (block_size, "block_size"),
                        (max_step_tokens, "--max-step-tokens")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserInputError(f"{flag} must be a whole number >= 1, got {value!r}")
    if not 0 <= reserve < 1:
        raise UserInputError(f"--reserve must be in [0, 1), got {reserve}")
    total = parse_bytes(memory)
    if total <= 0:
        raise UserInputError(f"--memory must be more than 0 bytes, got {memory!r}")
    shape = read_model_shape(model_dir, weights_dtype=weights_dtype)
    kv_per_token = kvb.kv_bytes_per_token(shape.layers, shape.n_kv_heads, shape.head_dim,
                                          _dtype_bytes(kv_cache_dtype, "--kv-cache-dtype"))
    engine_seqs = concurrency or 8
    packed = cpu_packed_bytes(shape, engine_seqs, cpu_linears) if device == "cpu" else 0
    weight_bytes = shape.weight_bytes + packed
    activation = kvb.activation_peak_formula(
        hidden=shape.hidden, intermediate=shape.intermediate, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
        head_dim=shape.head_dim, vocab=shape.vocab, step_tokens=max_step_tokens, max_num_seqs=engine_seqs,
        act_bytes=4 if shape.weights_dtype in ("fp32", "float32") else 2)
    budget = kvb.kv_budget_bytes(total, weight_bytes=weight_bytes, activation_peak_bytes=activation,
                                 reserve=reserve)
    if budget <= 0:
        raise UserInputError(f"the weights ({weight_bytes / 2**30:.2f} GiB) and the activation peak "
                             f"({activation / 2**20:.1f} MiB for {max_step_tokens} tokens a step) do not fit in "
                             f"{memory} with {reserve:.0%} reserved; give more memory or quantize the weights "
                             "(--weights-dtype int8)")
    tokens = int(budget // kv_per_token)
    window = shape.context_window or None

    def context_for(c: int) -> int:
        per_seq = (tokens // c) // block_size * block_size
        return min(per_seq, window) if window else per_seq

    def concurrency_for(n: int) -> int:
        return tokens // (-(-n // block_size) * block_size)

    engine_context = min(max_context, window) if max_context and window else (max_context or window or block_size)
    contexts = sorted({1024, 4096, 8192, 32768, 131072, *([max_context] if max_context is not None else [])})
    concurrencies = sorted({1, 8, 32, 128, *([concurrency] if concurrency is not None else [])})
    return {
        "model": str(model_dir), "memory_bytes": total, "reserve": reserve, "kv_cache_dtype": kv_cache_dtype,
        "model_shape": asdict(shape), "weight_bytes": weight_bytes, "weights_from": shape.weights_from,
        "device": device, "packed_weight_bytes": packed, "cpu_linears": cpu_linears if device == "cpu" else None,
        "kv_bytes_per_token": kv_per_token, "activation_peak_bytes": activation, "max_step_tokens": max_step_tokens,
        "engine": {"max_num_seqs": engine_seqs, "max_context": engine_context, "num_blocks": kvb.num_blocks_for(
            budget, kv_per_token=kv_per_token, block_size=block_size, max_num_seqs=engine_seqs,
            max_context=engine_context)},
        "kv_budget_bytes": int(budget), "kv_tokens": tokens, "block_size": block_size,
        "max_context_by_concurrency": [{"concurrency": c, "max_context": context_for(c)} for c in concurrencies],
        "max_concurrency_by_context": [{"context": n, "max_concurrency": concurrency_for(n),
                                        "beyond_model_window": bool(window and n > window)} for n in contexts],
    }
