"""A compact Llama-family decoder (Llama, Mistral, Qwen2) that runs on the toolkit's own kernels.

Weights are read straight from a Hugging Face checkpoint directory (config.json + safetensors);
transformers' modules are not used. The forward pass works on a flat batch of tokens from many
sequences at once (continuous batching): linear layers see `[num_tokens, hidden]`, and attention
is split by what each sequence is doing this step:
- decode (one new token): `paged_decode_attention` over the sequence's cached K/V;
- prefill chunk (several prompt tokens): the chunk attends to its cached prefix plus itself,
  causally: `flash_attention` in its paged mode reads the K/V through the block table (variable
  length; causal aligned to the bottom right does exactly this).
New K/V are written to the paged cache with `append_kv` before attention reads them.

A quantized artifact (`inferforge quantize --config`, with quantization.json) loads its quantized
linear layers as the modules of `inferforge.optimize.quantize`, running on the toolkit's
weight-only, int8 and fp8 kernels (see `inferforge/llama_quantized.py`); layers kept in float stay
dense weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from inferforge.errors import UserInputError

SUPPORTED = ("llama", "mistral", "qwen2")

# The keys of a layer's dict that hold a projection (a weight tensor, a quantized module or a packed
# callable): q/k/v fused, the attention output, gate/up fused, the MLP output.
LAYER_PROJECTIONS = ("qkv", "self_attn.o_proj", "gate_up", "mlp.down_proj")


@dataclass(frozen=True)
class LlamaSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    sliding_window: int | None = None   # Mistral: each token sees itself and the W - 1 tokens before it

    @classmethod
    def from_config(cls, cfg: dict, *, source: str = "config.json") -> LlamaSpec:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED:
            raise UserInputError(f"{source}: model_type {model_type!r} is not supported; the engine runs "
                                 f"{', '.join(SUPPORTED)} checkpoints")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise UserInputError(f"{source}: Qwen2 with use_sliding_window (a window on some layers only) is not "
                                 "supported")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default", None):
            raise UserInputError(f"{source}: rope_scaling type {scaling.get('rope_type')!r} is not supported "
                                 "(supported: default, llama3)")
        return cls(
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), eos_token_ids=eos,
            sliding_window=int(window) if window else None,
        )


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3 scaling (long wavelengths divided by `factor`,
    short ones kept, a smooth blend in between) when the config asks for it."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, d]; cos/sin [tokens, d/2]. Rotates the pairs (i, i + d/2), as Hugging Face does."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos `[c, c]` and signed sin `[-s, s]`, `[tokens, 1, d]` (broadcast over heads), for
    `rotate`, once per step."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1)[:, None, :], torch.cat([-sin, sin], dim=-1)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the tables of `rope_tables`: x * cos + [x2, x1] * [-s, s] is Hugging Face's
    x * cos + rotate_half(x) * sin, the same numbers (negation is exact); [x2, x1] is x rolled by
    d/2. x [tokens, heads, d]; q and k heads can go in one call."""
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * signed_sin
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:   # one fused op, the same numbers
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@dataclass
class StepBatch:
    """What one forward step runs: a flat token batch and, per sequence, its part of it.

    `decode` rows come first, one token each; `prefill` entries are chunks of prompts."""

    tokens: torch.Tensor            # int64 [num_tokens]
    positions: torch.Tensor         # int64 [num_tokens]
    slot_mapping: torch.Tensor      # int64 [num_tokens]
    num_decode: int
    decode_block_tables: torch.Tensor | None = None   # int32 [num_decode, max_blocks]
    decode_seq_lens: torch.Tensor | None = None       # int32 [num_decode] (cached tokens incl. the new one)
    prefill: list = field(default_factory=list)       # [(num_new, context_len, block_table list)]
    logits_rows: torch.Tensor | None = None           # rows of the flat batch whose logits are needed
    decode_gather: object = None                      # CPU decode: the rows and mask every layer reads (built once)

    def __post_init__(self):
        """Prefill metadata for the paged attention kernel, built once per step (not per layer)."""
        if not self.prefill:
            return
        device = self.tokens.device
        lens_q = [n for n, _, _ in self.prefill]
        lens_k = [c for _, c, _ in self.prefill]
        width = max(len(t) for _, _, t in self.prefill)
        tables = torch.zeros(len(self.prefill), width, dtype=torch.int32)
        for i, (_, _, table) in enumerate(self.prefill):
            tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        self.prefill_block_tables = tables.to(device)
        self.prefill_cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
        self.prefill_cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
        self.prefill_max_q, self.prefill_max_k = max(lens_q), max(lens_k)


def _linear(x: torch.Tensor, op, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A projection: a dense weight `[out, in]` through `F.linear`, or a quantized module (bias inside)."""
    return F.linear(x, op, bias) if isinstance(op, torch.Tensor) else op(x)


class LlamaModel:
    """Weights and the forward pass. Use `LlamaModel.load(dir, dtype=..., device=...)`.

    `quantized` maps transformers layer names (`model.layers.0.self_attn.q_proj`, `lm_head`) to the
    quantized modules that replace those dense weights."""

    def __init__(self, spec: LlamaSpec, weights: dict[str, torch.Tensor], *, dtype, device,
                 quantized: dict | None = None):
        from inferforge.runtime.llama_quantized import fused_projection

        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        quantized = quantized or {}
        if "model.embed_tokens.weight" not in weights and spec.tie_word_embeddings and "lm_head.weight" in weights:
            weights = {**weights, "model.embed_tokens.weight": weights["lm_head.weight"]}   # one copy of a tied pair

        def w(name):
            if name not in weights:
                raise UserInputError(f"checkpoint is missing tensor {name!r}")
            return weights[name].to(device=device, dtype=dtype)

        def proj(name):   # a dense weight, or the quantized module of that layer
            return quantized[name] if name in quantized else w(name + ".weight")

        def bias(name):
            return w(name + ".bias") if spec.attention_bias and name not in quantized else None

        unsupported = sorted(n for n in weights if re.fullmatch(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.\w+)\.bias", n))
        if unsupported:   # Llama's attention_bias also biases o_proj, mlp_bias the MLP: this forward has neither
            raise UserInputError(f"checkpoint has {unsupported[0]!r}: biases on the attention output or MLP "
                                 "projections (Llama's attention_bias or mlp_bias) are not supported by the engine; "
                                 "Qwen2-style q/k/v biases are")
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        if "lm_head" in quantized:
            self.lm_head = quantized["lm_head"]
        else:
            self.lm_head = self.embed if spec.tie_word_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            layer = {name: w(p + name + ".weight") for name in ("input_layernorm", "post_attention_layernorm")}
            layer["self_attn.o_proj"] = proj(p + "self_attn.o_proj")
            layer["mlp.down_proj"] = proj(p + "mlp.down_proj")
            # q, k and v as one matmul; gate and up as another (quantized ones where the format allows).
            qkv = [p + f"self_attn.{n}_proj" for n in "qkv"]
            layer["qkv"], layer["qkv_bias"] = fused_projection([proj(n) for n in qkv], [bias(n) for n in qkv])
            gate_up = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            layer["gate_up"], _ = fused_projection([proj(n) for n in gate_up], [None, None])
            self.layers.append(layer)
        self.inv_freq = rope_inv_freq(spec).to(device)
        # Called as kv_observer(layer, k, v) with each step's new keys (after RoPE) and values,
        # [tokens, n_kv_heads, head_dim]; KV-cache calibration uses it.
        self.kv_observer = None

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = None, device="cpu") -> LlamaModel:
        from safetensors.torch import load_file

        from inferforge.checkpoint_files import check_safetensors_files, read_config

        path = Path(path)
        cfg_path = path / "config.json"
        cfg = read_config(path, what="a Hugging Face checkpoint directory")
        spec = LlamaSpec.from_config(cfg, source=str(cfg_path))
        files = check_safetensors_files(path)   # a truncated file: a message naming it, not a SafetensorError
        if not files:
            raise UserInputError(f"{path}: no *.safetensors weights")
        # On the CPU the tensors are read into memory of their own (pread), not views of the file's
        # map: a projection the engine drops after packing it (runtime/cpu_linear.py, "onednn") is
        # then freed, where a map shared with the embedding and norms would stay resident.
        read = {"backend": "pread"} if torch.device(device).type == "cpu" else {}     # safetensors >= 0.8
        weights = {}
        for f in files:
            weights.update(load_file(str(f), **read))
        if dtype is None:
            stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            dtype = getattr(torch, stored) if torch.device(device).type == "cuda" else torch.float32
        from inferforge.runtime.llama_quantized import read_quantization, take_quantized_linears

        meta = read_quantization(path)
        quantized = take_quantized_linears(meta, weights, device) if meta else None
        return cls(spec, weights, dtype=dtype, device=device, quantized=quantized)

    def pack_dense_linears(self, batch_rows: int | None = None, *, dense: bool = True) -> int:
        """Pack every dense projection and the LM head for the CPU (`runtime/cpu_linear.py`); q/k/v's
        bias moves into its projection. `dense=True` keeps the dense weight and adds a packed copy for
        batched steps (MKL's for decode batches of `batch_rows` rows where it can); `dense=False` keeps
        oneDNN's layout only. Returns the bytes added: with `dense=False` only a tied LM head's copy
        (the embedding stays)."""
        from inferforge.runtime.cpu_linear import PackedDenseLinear

        extra = 0

        def pack(op, bias=None):
            nonlocal extra
            if not isinstance(op, torch.Tensor):
                return op, bias                      # quantized, or packed already
            packed = PackedDenseLinear(op, bias, batch_rows=batch_rows, dense=dense)
            if dense or op is self.embed:
                extra += packed.packed_bytes
            return packed, None

        for layer in self.layers:
            layer["qkv"], layer["qkv_bias"] = pack(layer["qkv"], layer["qkv_bias"])
            for name in LAYER_PROJECTIONS:
                if name != "qkv":
                    layer[name], _ = pack(layer[name])
        self.lm_head, _ = pack(self.lm_head)
        return extra

    # ------------------------------------------------------------------ forward
    def forward(self, batch: StepBatch, cache) -> torch.Tensor:
        """Runs one step; returns float32 logits `[len(batch.logits_rows), vocab]`."""
        from inferforge.kernels import append_kv
        from inferforge.kernels.kv_cache import cpu_row_write_slots, write_kv_rows

        spec = self.spec
        h = self.embed[batch.tokens]
        cos, sin = rope_tables(batch.positions, self.inv_freq)
        # On the CPU with a float cache, new K/V are row copies at slots checked once for all layers.
        row_slots = cpu_row_write_slots(batch.slot_mapping, cache.k_pools[0], cache.v_pools[0], h.dtype)
        nq, nkv, d = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.head_dim
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer["input_layernorm"], spec.rms_norm_eps)
            qkv = _linear(x, layer["qkv"], layer["qkv_bias"])
            qk = rotate(qkv[:, :nq + nkv].reshape(-1, spec.n_heads + spec.n_kv_heads, d), cos, sin)
            q, k = qk[:, :spec.n_heads], qk[:, spec.n_heads:]
            v = qkv[:, nq + nkv:].reshape(-1, spec.n_kv_heads, d)
            if self.kv_observer is not None:
                self.kv_observer(i, k, v)
            if row_slots is not None:
                write_kv_rows(k, v, cache.k_pools[i], cache.v_pools[i], row_slots)
            else:
                k_scale = cache.k_scales[i] if cache.quantized else None
                v_scale = cache.v_scales[i] if cache.quantized else None
                append_kv(k.contiguous(), v.contiguous(), cache.k_pools[i], cache.v_pools[i], batch.slot_mapping,
                          k_scale=k_scale, v_scale=v_scale)
            attn = self._attention(q, k, v, batch, cache, i)
            h = h + _linear(attn.reshape(-1, nq), layer["self_attn.o_proj"])
            x = rms_norm(h, layer["post_attention_layernorm"], spec.rms_norm_eps)
            gate, up = _linear(x, layer["gate_up"]).chunk(2, dim=-1)
            h = h + _linear(F.silu(gate) * up, layer["mlp.down_proj"])
        h = rms_norm(h[batch.logits_rows], self.norm, spec.rms_norm_eps)
        return _linear(h, self.lm_head).float()

    def _attention(self, q, k, v, batch: StepBatch, cache, layer: int) -> torch.Tensor:
        from inferforge.kernels import flash_attention, paged_decode_attention
        from inferforge.kernels._checks import reference_fallback
        from inferforge.kernels.decode_attention import (
            DecodeGather,
            paged_decode_attention_torch,
            uses_torch_decode_path,
        )
        from inferforge.kernels.reference import dequantize_cache

        nd = batch.num_decode
        k_scale = cache.k_scales[layer] if cache.quantized else None
        v_scale = cache.v_scales[layer] if cache.quantized else None
        if nd and uses_torch_decode_path(q.device):
            # The batched PyTorch path with its gather rows and mask built once per step, not per layer
            # (the engine's tables and lengths are checked when it builds them).
            if batch.decode_gather is None:
                batch.decode_gather = DecodeGather(batch.decode_block_tables, batch.decode_seq_lens, cache.block_size,
                                                   window=self.spec.sliding_window)
            reference_fallback("paged_decode_attention")
            decoded = paged_decode_attention_torch(
                q[:nd], cache.k_pools[layer], cache.v_pools[layer], batch.decode_block_tables, batch.decode_seq_lens,
                sm_scale=1.0 / math.sqrt(self.spec.head_dim), k_scale=k_scale, v_scale=v_scale, gather=batch.decode_gather)
            if not batch.prefill:
                return decoded                     # a pure decode step: no output buffer to fill
            out = torch.empty_like(q)
            out[:nd] = decoded
        elif nd:
            out = torch.empty_like(q)
            out[:nd] = paged_decode_attention(q[:nd].contiguous(), cache.k_pools[layer], cache.v_pools[layer],
                                              batch.decode_block_tables, batch.decode_seq_lens,
                                              k_scale=k_scale, v_scale=v_scale, window=self.spec.sliding_window)
        else:
            out = torch.empty_like(q)
        if batch.prefill:
            # Each chunk attends to its cached prefix plus itself, read through its block table.
            # The prefill kernel reads float K/V: for a quantized cache the blocks the chunks use are
            # dequantized into a small temporary pool (the decode kernel dequantizes in registers).
            tables = batch.prefill_block_tables
            k_pool, v_pool = cache.k_pools[layer], cache.v_pools[layer]
            if cache.quantized:   # dequantize only the blocks these chunks read, renumbered 0..n-1
                used, tables = torch.unique(tables, return_inverse=True)
                tables = tables.to(torch.int32)
                k_pool = dequantize_cache(k_pool[used], k_scale, q.dtype)
                v_pool = dequantize_cache(v_pool[used], v_scale, q.dtype)
            window = (self.spec.sliding_window - 1, 0) if self.spec.sliding_window else (-1, -1)
            out[nd:] = flash_attention(q[nd:].contiguous(), k_pool, v_pool, causal=True, window=window,
                                       cu_seqlens_q=batch.prefill_cu_q,
                                       cu_seqlens_k=batch.prefill_cu_k, max_seqlen_q=batch.prefill_max_q,
                                       max_seqlen_k=batch.prefill_max_k, block_table=tables)
        return out


def shift_cached_keys(model: LlamaModel, cache, blocks: list[int], shift: int) -> None:
    """Re-rotate the keys in `blocks` (every layer) from position p to p - shift.

    RoPE rotates each pair by position * frequency, so moving a key `shift` positions earlier is
    one more rotation by -shift * frequency; values are position-free and stay as they are."""
    if not blocks:
        return
    angle = -shift * model.inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    index = torch.tensor(blocks, dtype=torch.long, device=model.device)
    for pool in cache.k_pools:
        keys = pool[index]                                   # [n, block_size, n_kv, d]
        flat = keys.reshape(-1, keys.shape[2], keys.shape[3])
        rotated = apply_rope(flat, cos.expand(flat.shape[0], -1), sin.expand(flat.shape[0], -1))
        pool[index] = rotated.reshape(keys.shape).to(pool.dtype)
