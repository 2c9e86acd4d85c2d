"""Paged decode attention: one new query token per sequence against its KV cache, read through a
block table, split across programs along the sequence for long contexts (flash-decoding).

Program (b, g, split) handles sequence b, KV head g and one contiguous chunk of the sequence: it
serves all GQA query heads of KV head g at once (a [BLOCK_H, head_dim] query tile), so every KV
block is read once. Keys and values are gathered BLOCK_N tokens at a time: token t lives in physical
block `block_tables[b, t // block_size]` at slot `t % block_size`. Each chunk keeps an online
softmax; with one split the program writes the final output, otherwise it writes its normalized
partial output and log2-sum-exp, and a second kernel merges the splits by their LSE.

fp8 (e4m3) and int8 caches are dequantized in registers: values are cast to the query dtype
(exact for both), the per-KV-head key scale is folded into the score scale and the value scale is
applied to the accumulator once.

On a CPU without the Triton interpreter, `paged_decode_attention_torch` runs instead: the same
math for the whole batch in a few PyTorch ops (one block-table gather, a length mask, GQA by
reshaping q); `kernels/reference.py` keeps the per-sequence loop as the spec both are tested against.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_dtype, check_tensor, reference_fallback

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
QUANTIZED_CACHE_DTYPES = (torch.int8, torch.float8_e4m3fn)


@triton.jit(do_not_specialize=["window", "block_size"])
def _paged_decode_kernel(
    Q,                          # [batch, n_heads, d]
    KCache, VCache,             # [num_blocks, block_size, n_kv_heads, d]
    BlockTables,                # int32 [batch, max_blocks]
    SeqLens,                    # int32 [batch]
    KScale, VScale,             # float32 [n_kv_heads] (QUANTIZED only)
    Out,                        # [batch, n_heads, d] (NUM_SPLITS == 1)
    PartialOut,                 # float32 [batch, n_heads, NUM_SPLITS, d] (NUM_SPLITS > 1)
    PartialLse,                 # float32 [batch, n_heads, NUM_SPLITS], log2 units
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb, stride_tn,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    qk_scale, window, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GQA_GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, QUANTIZED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b)
    start = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GQA_GROUP
    d_mask = offs_d < HEAD_DIM
    heads = g * GQA_GROUP + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    scale = qk_scale
    if QUANTIZED:
        scale = scale * tl.load(KScale + g)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        tokens = t0 + offs_n
        t_mask = tokens < hi
        physical = tl.load(BlockTables + b * stride_tb + (tokens // block_size) * stride_tn, mask=t_mask, other=0)
        row = physical.to(tl.int64) * stride_kb + (tokens % block_size) * stride_ks
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + row[:, None] + g * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        row_v = physical.to(tl.int64) * stride_vb + (tokens % block_size) * stride_vs
        v = tl.load(VCache + row_v[:, None] + g * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    if QUANTIZED:
        acc = acc * tl.load(VScale + g)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :], out,
                 mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _merge_splits_kernel(
    PartialOut,                 # float32 [batch, n_heads, num_splits, d]
    PartialLse,                 # float32 [batch, n_heads, num_splits], log2 units
    Out,                        # [batch, n_heads, d]
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max); splits without keys weigh 0."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(PartialLse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    parts = tl.load(PartialOut + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def uses_torch_decode_path(device: torch.device) -> bool:
    """Whether `paged_decode_attention` runs `paged_decode_attention_torch` on this device (a CPU
    outside the Triton interpreter)."""
    return device.type != "cuda" and not _INTERPRET


class DecodeGather:
    """The per-step half of `paged_decode_attention_torch`: which cache rows each sequence reads and
    which of them it sees. It depends only on the block tables, lengths and window, so a model builds
    it once per step and every layer reuses it.

    One sequence whose blocks are consecutive in the pool (a fresh cache hands them out in order)
    needs no gather at all: `span` = (first block, first visible token, length), and each layer's
    keys and values are a view of the pool, sliced to the visible tokens, with no mask."""

    def __init__(self, block_tables, seq_lens, block_size: int, *, window=None, max_seq_len=None):
        batch = seq_lens.shape[0]
        self.longest = int(seq_lens.max()) if max_seq_len is None and batch else (max_seq_len or 0)
        self.num_blocks = -(-self.longest // block_size)
        self.tokens = self.num_blocks * block_size
        self.span = None
        if batch == 1 and self.num_blocks:
            table = block_tables[0, :self.num_blocks].long()
            first = int(table[0])
            length = int(seq_lens[0])
            if length and torch.equal(table, torch.arange(first, first + self.num_blocks, device=table.device)):
                self.span = (first, max(length - window, 0) if window is not None else 0, length)
                self.empty = None
                return
        self.flat_tables = block_tables[:, :self.num_blocks].long().flatten()
        token = torch.arange(self.tokens, device=seq_lens.device)[None, :]
        lens = seq_lens.to(torch.int64)[:, None]
        visible = token < lens                                          # [batch, tokens]
        if window is not None:
            visible &= token >= lens - window
        self.visible = visible[:, None, None, :]
        self._masks = {}
        self.hidden_rows = (~visible).flatten().nonzero().squeeze(1)    # rows of [batch * tokens]
        empty = seq_lens == 0
        self.empty = empty[:, None, None] if batch and bool(empty.any()) else None

    def attn_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 where visible, -inf elsewhere) in `dtype`, built once for all layers:
        SDPA would convert a boolean mask on every call."""
        mask = self._masks.get(dtype)
        if mask is None:
            mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            mask = self._masks[dtype] = mask.masked_fill_(~self.visible, float("-inf"))
        return mask


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale, k_scale=None, v_scale=None,
                                 window=None, max_seq_len=None, gather: DecodeGather | None = None):
    """The CPU path of `paged_decode_attention` (same arguments, already checked): the whole batch in
    a few tensor ops, no loop over sequences.

    One gather of the block tables brings every sequence's first `ceil(max_len / block_size)` blocks
    into `[batch, tokens, n_kv, d]`; a mask from `seq_lens` (and `window`) hides the padding. GQA
    reshapes q to `[batch, n_kv, group, d]` so each KV head is read once by its `group` query
    heads, which are the query rows of one fused `scaled_dot_product_attention` call with an additive
    mask, in float32 (float64 for float64 q). int8/fp8 caches are cast, and their per-KV-head scales
    folded into q (k's scale) and the output (v's). A sequence of
    length 0 gets zeros. `max_seq_len` (an int) saves reading `seq_lens.max()` when the caller knows it;
    `gather` (a `DecodeGather` of these tables, lengths and window) saves building the rows and mask.
    A single sequence in consecutive blocks reads views of the pool instead (`DecodeGather.span`).
    """
    batch, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    plan = gather or DecodeGather(block_tables, seq_lens, block_size, window=window, max_seq_len=max_seq_len)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if plan.longest == 0:
        return torch.zeros_like(q)

    if plan.span is not None:   # one sequence in consecutive blocks: views of the pool, no copy, no mask
        first, start, end = plan.span

        def span_rows(cache):
            rows = cache[first:first + plan.num_blocks].reshape(-1, n_kv, head_dim)[start:end]
            return rows.to(compute).transpose(0, 1)[None]              # [1, n_kv, tokens, d]

        keys, values, mask = span_rows(k_cache), span_rows(v_cache), None
    else:
        keys, values = _gather_rows(k_cache, plan, compute), _gather_rows(v_cache, plan, compute)
        mask = plan.attn_mask(compute)
    query = q.reshape(batch, n_kv, group, head_dim).to(compute)
    if k_scale is not None and k_cache.dtype in QUANTIZED_CACHE_DTYPES:
        query = query * k_scale.to(compute)[None, :, None, None]     # q . (k * s) == (q * s) . k
    # One fused SDPA call: the `group` query heads of a KV head are its query rows.
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                           scale=sm_scale)   # [batch, n_kv, group, d]
    if v_scale is not None and v_cache.dtype in QUANTIZED_CACHE_DTYPES:
        out = out * v_scale.to(compute)[None, :, None, None]
    out = out.reshape(batch, n_heads, head_dim)
    if plan.empty is not None:   # a sequence with no tokens saw only -inf scores (NaN probabilities): zeros
        out = out.masked_fill(plan.empty, 0.0)
    return out.to(q.dtype)


def _gather_rows(cache, plan: DecodeGather, compute: torch.dtype) -> torch.Tensor:
    """[batch * num_blocks, block_size * n_kv * d] by index_select (row copies), viewed as [batch, n_kv,
    tokens, d]: token t of sequence b is row t of its gathered blocks, as the block table orders them.
    Slots past a sequence's length (never written, possibly NaN) are zeroed in the copy: the mask
    alone does not stop a NaN key or value from reaching the output."""
    n_kv, head_dim = cache.shape[2], cache.shape[3]
    batch = plan.visible.shape[0]
    rows = cache.reshape(cache.shape[0], -1).index_select(0, plan.flat_tables).to(compute)
    rows = rows.view(batch * plan.tokens, n_kv * head_dim).index_fill_(0, plan.hidden_rows, 0)
    return rows.view(batch, plan.tokens, n_kv, head_dim).transpose(1, 2)


def _num_splits(batch: int, n_kv: int, max_tokens: int, device) -> int:
    """Enough programs to fill the GPU twice over, at least 256 tokens per split, at most 32 splits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = triton.cdiv(2 * sms, max(batch * n_kv, 1))
    return max(1, min(want, triton.cdiv(max_tokens, 256), 32))


def _empty(shape, *, dtype, device):
    """Output allocation; tests replace it with a NaN-filled one so unwritten elements show."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_cache_args(name_k, k_cache, name_v, v_cache, k_scale, v_scale, n_kv, head_dim, dtype):
    check_tensor(name_k, k_cache, dims=4, layout="[num_blocks, block_size, n_kv_heads, head_dim]")
    check(k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
          f"{name_k} and {name_v} must have the same shape and dtype, got {tuple(k_cache.shape)} {k_cache.dtype} "
          f"and {tuple(v_cache.shape)} {v_cache.dtype}")
    check(k_cache.shape[2] == n_kv and k_cache.shape[3] == head_dim,
          f"{name_k} must be [num_blocks, block_size, {n_kv}, {head_dim}], got {tuple(k_cache.shape)}")
    if k_cache.dtype in QUANTIZED_CACHE_DTYPES:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            check(isinstance(scale, torch.Tensor) and scale.shape == (n_kv,) and scale.dtype == torch.float32,
                  f"{name} must be a float32 tensor [n_kv_heads={n_kv}] for a {k_cache.dtype} cache, got "
                  f"{None if scale is None else (scale.dtype, tuple(scale.shape))}")
    else:
        check(k_cache.dtype == dtype, f"{name_k} must be {dtype} (like the new tokens), int8 or float8_e4m3fn, "
                                      f"got {k_cache.dtype}")


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale=None, k_scale=None, v_scale=None,
                           window=None, num_splits=None):
    """Attention of one new query token per sequence over its paged KV cache.

    q `[batch, n_heads, head_dim]` (fp16, bf16 or fp32); `k_cache`/`v_cache`
    `[num_blocks, block_size, n_kv_heads, head_dim]` in q's dtype, or int8 / float8_e4m3fn with
    float32 per-KV-head `k_scale`/`v_scale` `[n_kv_heads]`; int32 `block_tables` `[batch, max_blocks]`
    (any physical blocks, any order) and int32 `seq_lens` `[batch]` (tokens already in the cache,
    the new one included). `window` attends only the last `window` tokens. `num_splits` splits each
    sequence across programs (default: enough to fill the GPU). Returns `[batch, n_heads, head_dim]`
    in q's dtype; a sequence of length 0 gets zeros.
    """
    check_tensor("q", q, dims=3, layout="[batch, n_heads, head_dim]")
    check_dtype("q", q)
    batch, n_heads, head_dim = q.shape
    check(isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4,
          "k_cache must have 4 dimensions [num_blocks, block_size, n_kv_heads, head_dim]")
    n_kv = k_cache.shape[2]
    check(n_kv >= 1 and n_heads % n_kv == 0, f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    check(1 <= head_dim <= 256, f"head_dim must be between 1 and 256, got {head_dim}")
    _check_cache_args("k_cache", k_cache, "v_cache", v_cache, k_scale, v_scale, n_kv, head_dim, q.dtype)
    check_tensor("block_tables", block_tables, dims=2, layout="int32 [batch, max_blocks]")
    check(block_tables.dtype == torch.int32 and block_tables.shape[0] == batch,
          f"block_tables must be int32 [batch={batch}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    check_tensor("seq_lens", seq_lens, dims=1, layout="int32 [batch]")
    check(seq_lens.dtype == torch.int32 and seq_lens.shape[0] == batch,
          f"seq_lens must be int32 [batch={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        check(t.device == q.device, f"{name} must be on {q.device} like q, got {t.device}")
    check(q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
          "q, k_cache and v_cache must be contiguous in their last dimension; pass .contiguous()")
    check(window is None or (isinstance(window, int) and window >= 1), f"window must be None or an int >= 1, got {window!r}")
    check(num_splits is None or (isinstance(num_splits, int) and num_splits >= 1),
          f"num_splits must be None or an int >= 1, got {num_splits!r}")
    block_size = k_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if not q.is_cuda and batch:   # value checks need the data on the host: free on CPU, a sync on a GPU
        longest = int(seq_lens.max())
        check(int(seq_lens.min()) >= 0 and longest <= capacity,
              f"seq_lens must be between 0 and max_blocks * block_size = {capacity}, got up to {longest}")
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if uses_torch_decode_path(q.device):
        reference_fallback("paged_decode_attention")
        return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=sm_scale,
                                            k_scale=k_scale, v_scale=v_scale, window=window,
                                            max_seq_len=longest if batch else 0)
    splits = num_splits or _num_splits(batch, n_kv, min(capacity, window or capacity), q.device)
    # The kernel indexes these small vectors with unit stride.
    seq_lens = seq_lens.contiguous()
    if k_cache.dtype in QUANTIZED_CACHE_DTYPES:
        k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
    out = _empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    partial_out = _empty((batch, n_heads, splits, head_dim), dtype=torch.float32, device=q.device) if splits > 1 else out
    partial_lse = _empty((batch, n_heads, splits), dtype=torch.float32, device=q.device) if splits > 1 else out
    quantized = k_cache.dtype in QUANTIZED_CACHE_DTYPES
    group = n_heads // n_kv
    block_d = max(16, triton.next_power_of_2(head_dim))
    if batch == 0:
        return out
    _paged_decode_kernel[(batch, n_kv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale if quantized else q, v_scale if quantized else q,
        out, partial_out, partial_lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], *block_tables.stride(),
        out.stride(0), out.stride(1),
        *(partial_out.stride()[:3] if splits > 1 else (0, 0, 0)), *(partial_lse.stride()[:2] if splits > 1 else (0, 0)),
        sm_scale * 1.4426950408889634, window or (1 << 30), block_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, GQA_GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=32 if _INTERPRET else 64, NUM_SPLITS=splits, QUANTIZED=quantized,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, n_heads)](
            partial_out, partial_lse, out, *partial_out.stride()[:3], *partial_lse.stride()[:2], out.stride(0),
            out.stride(1), NUM_SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), HEAD_DIM=head_dim,
            BLOCK_D=block_d,
        )
    return out
