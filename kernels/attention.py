"""Fused (flash) attention forward for prefill: causal, GQA/MQA, variable length, sliding window.

Each program instance computes one BLOCK_M tile of query rows for one (sequence, query head):
it streams the visible key/value blocks of the matching KV head through an online softmax
(running max `m`, running sum `l`, unnormalized accumulator `acc`, all fp32) and writes
`acc / l` once. Scores are scaled by `sm_scale * log2(e)` so the exponentials are `exp2`.

Masks align to the bottom right (FlashAttention 2.1+): query row i sits at key position
`i + seq_k - seq_q`; causal keeps keys at or before it, `window=(left, right)` keeps keys within
`[pos - left, pos + right]` (-1 is unbounded). Key blocks entirely outside a tile's visible band
are never loaded: the loop bounds are computed from the band, and the loop runs in three stages
so that only blocks that straddle its edges (or the end of the sequence) pay for the element mask.

GQA: query head h reads KV head `h // (n_heads // n_kv_heads)` through the strides; K/V are never
copied or expanded. head_dim is padded to the next power of two (>= 16) with masked loads.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FIXED_CONFIG = os.environ.get("INFERFORGE_AUTOTUNE") == "0"


# fp32 inputs run the ieee dot on CUDA cores (FMA), whose operands live in registers: small tiles with
# 8 warps, the only ones that compile without spills on sm_90 (64x64 with 4 warps spills 138 KB).
_FP32_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
                 triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=1)]


def _configs():
    # One small config under the interpreter (it runs programs one by one in numpy) and when
    # INFERFORGE_AUTOTUNE=0 (GPU correctness tests: no compile-every-config cost).
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if _FIXED_CONFIG:
        # The first config that `_prune` keeps is used; the second fits head_dim 256 in shared memory.
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2), *_FP32_CONFIGS]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3)] + _FP32_CONFIGS


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot win: 128-row tiles need 8 warps (with 4, 128x64 at head_dim
    128 spills 48-52 bytes per thread on sm_90: `python -m inferforge.kernels.compile_report`); at head_dim
    256 only 64x64 tiles with 2 stages fit H100's 227 KiB of shared memory (fp16: 128x64x3 needs 256 KiB)."""
    block_d = kwargs.get("BLOCK_D") or (named_args or {}).get("BLOCK_D", 64)
    # 32-row tiles are the fp32 (ieee) configs; the interpreter's single config passes either way.
    if kwargs.get("DOT_PRECISION") == "ieee":
        fp32 = [c for c in configs if c.kwargs["BLOCK_M"] == 32]
        fp32 = [c for c in fp32 if block_d < 256 or c.kwargs["BLOCK_N"] <= 16] or fp32
        return (fp32 or configs)[:1] if _FIXED_CONFIG else (fp32 or configs)
    configs = [c for c in configs if c.kwargs["BLOCK_M"] >= 64] or configs
    kept = [c for c in configs if not (c.kwargs["BLOCK_M"] == 128 and c.num_warps < 8)]
    if block_d >= 256:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] <= 64 and c.num_stages <= 2] or kept
    return kept[:1] if _FIXED_CONFIG else kept


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, stride_ks, stride_vs, start, end, k_len,
                   q_pos, qk_scale, window_left, window_right, offs_n, offs_d, d_mask,
                   block_table, page_size, stride_kb, stride_vb,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
                   PAGED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l, m) over key blocks [start, end); MASKED applies the element mask.

    PAGED: key t of the sequence is in cache block `block_table[t // page_size]`, slot `t % page_size`."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < k_len
        if PAGED:
            physical = tl.load(block_table + cols // page_size, mask=n_mask, other=0).to(tl.int64)
            k_rows = physical * stride_kb + (cols % page_size) * stride_ks
            v_rows = physical * stride_vb + (cols % page_size) * stride_vs
        else:
            k_rows = cols * stride_ks
            v_rows = cols * stride_vs
        if USE_TMA:
            k = k_desc.load([start_n, 0])
        else:
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = n_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (cols[None, :] >= q_pos[:, None] - window_left)
                visible = visible & (cols[None, :] <= q_pos[:, None] + window_right)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(),
                 key=["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "GQA_GROUP", "IS_VARLEN", "USE_TMA", "PAGED", "DOT_PRECISION",
                      "seqlen_bucket"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "n_heads", "window_left", "window_right", "seqlen_bucket"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse,               # Q/Out: [batch, seq_q, n_heads, d] or [total_q, n_heads, d]; K/V: [.., n_kv_heads, d]
    CuSeqlensQ, CuSeqlensK,          # int32 [batch + 1] (varlen only)
    BlockTable,                      # int32 [batch, max_blocks] (PAGED: K/V are [num_blocks, page_size, n_kv_heads, d])
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,  # Lse: [batch, n_heads, seq_q] or [n_heads, total_q] (stride_lb = 0)
    stride_btb, page_size,
    seqlen_q, seqlen_k, n_heads,
    qk_scale,                         # sm_scale * log2(e)
    window_left, window_right,        # >= 0 when HAS_WINDOW; a huge value stands for "unbounded"
    seqlen_bucket,                    # unused by the code: next power of two of seqlen_q, so autotune picks per bucket
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GQA_GROUP: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, PAGED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid: (batch * n_heads, query blocks); axis 0 allows 2^31 - 1 programs, axis 1 only 65535.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    kv_head = head // GQA_GROUP

    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + batch).to(tl.int64)
        q_len = (tl.load(CuSeqlensQ + batch + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuSeqlensK + batch).to(tl.int64)
        k_len = (tl.load(CuSeqlensK + batch + 1) - k_start).to(tl.int32)
        if PAGED:
            k_start = 0     # keys are addressed through the block table, not packed
    else:
        q_start = 0
        k_start = 0
        q_len = seqlen_q
        k_len = seqlen_k
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len

    q_base = Q + batch * stride_qb + q_start * stride_qs + head * stride_qh
    if PAGED:
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
    else:
        k_base = K + batch * stride_kb + k_start * stride_ks + kv_head * stride_kh
        v_base = V + batch * stride_vb + k_start * stride_vs + kv_head * stride_vh
    if PAGED:
        block_table = BlockTable + batch * stride_btb
    else:
        block_table = CuSeqlensQ        # unused placeholder
    if USE_TMA:
        # Tensor descriptors (TMA on Hopper) over this sequence's [len, head_dim] slice of one head:
        # the hardware zero-fills rows past the sequence end and columns past head_dim.
        q_desc = tl.make_tensor_descriptor(q_base, shape=[q_len, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[k_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[k_len, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([m_start, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                    other=0.0)

    # Key position of each query row, and the visible band [lo, hi) of this tile.
    diag = k_len - q_len
    q_pos = offs_m + diag
    lo = 0
    hi = k_len
    if HAS_WINDOW:
        lo = tl.maximum(m_start + diag - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, m_start + BLOCK_M - 1 + diag + window_right + 1)
    if IS_CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M - 1 + diag + 1)
    hi = tl.maximum(hi, 0)

    # Blocks in [full_lo, full_hi) are visible to every row of the tile and need no element mask;
    # only the blocks at the band's edges, [lo, full_lo) and [full_hi, hi), are masked.
    full_lo = lo
    full_hi = k_len
    if HAS_WINDOW:
        full_lo = tl.maximum(lo, m_start + BLOCK_M - 1 + diag - window_left)
        full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(full_hi, m_start + diag + window_right + 1)
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, m_start + diag + 1)
    full_hi = tl.maximum(full_hi, 0)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    if not USE_TMA:
        k_desc = k_base
        v_desc = v_base

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, stride_ks, stride_vs, lo, full_lo,
                                   k_len, q_pos, qk_scale, window_left, window_right, offs_n, offs_d, d_mask,
                                   block_table, page_size, stride_kb, stride_vb, True, IS_CAUSAL, HAS_WINDOW, USE_TMA,
                                   PAGED, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, stride_ks, stride_vs, full_lo,
                                   full_hi, k_len, q_pos, qk_scale, window_left, window_right, offs_n, offs_d, d_mask,
                                   block_table, page_size, stride_kb, stride_vb, False, IS_CAUSAL, HAS_WINDOW, USE_TMA,
                                   PAGED, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, stride_ks, stride_vs, full_hi,
                                   hi, k_len, q_pos, qk_scale, window_left, window_right, offs_n, offs_d, d_mask,
                                   block_table, page_size, stride_kb, stride_vb, True, IS_CAUSAL, HAS_WINDOW, USE_TMA,
                                   PAGED, DOT_PRECISION, BLOCK_N)

    # A row that sees no key returns zeros (and LSE -inf), never NaN.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = (Out + batch * stride_ob + (q_start + offs_m[:, None]) * stride_os + head * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if RETURN_LSE:
        # Natural-log LSE of the scaled scores: (m + log2 l) / log2(e).
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(Lse + batch * stride_lb + head * stride_lh + (q_start + offs_m) * stride_ls, lse, mask=m_mask)


_UNBOUNDED = 1 << 30
# "auto": tensor descriptors on Hopper and newer when Triton has them and the layout allows;
# "off": always the pointer path; "on": always descriptors (tests use it under the interpreter).
_TMA_MODE = os.environ.get("INFERFORGE_ATTENTION_TMA", "auto")


def _tma_layout_ok(*tensors) -> bool:
    """Descriptors need 16-byte aligned base addresses and row strides (last dimension contiguous)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _use_tma(q, k, v) -> bool:
    if _TMA_MODE == "off" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if _TMA_MODE == "on":
        return True
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9 and _tma_layout_ok(q, k, v)


def _set_allocator(device) -> None:
    """Device-side descriptors need scratch memory from Triton's allocator. It is a context
    variable (per thread), so it is set on every launch that uses descriptors; that is cheap."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def _empty(shape, *, dtype, device):
    """Output allocation; tests replace it with a NaN-filled one so unwritten elements show."""
    return torch.empty(shape, dtype=dtype, device=device)


def attention_triton(q, k, v, *, causal, sm_scale, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     return_lse, block_table=None):
    """Launch the kernel on validated inputs (see `flash_attention`); returns (out, lse or None)."""
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        _, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        qs = (0, q.stride(0), q.stride(1))
        if block_table is not None:   # paged caches [num_blocks, page_size, n_kv_heads, d]
            n_kv = k.shape[2]
            ks, vs = k.stride()[:3], v.stride()[:3]
        else:
            ks = (0, k.stride(0), k.stride(1))
            vs = (0, v.stride(0), v.stride(1))
    else:
        batch, seqlen_q, n_heads, head_dim = q.shape
        seqlen_k, n_kv = k.shape[1], k.shape[2]
        qs, ks, vs = q.stride()[:3], k.stride()[:3], v.stride()[:3]
    out = _empty(q.shape, dtype=q.dtype, device=q.device)
    os_ = (0, out.stride(0), out.stride(1)) if varlen else out.stride()[:3]
    if varlen:
        lse = _empty((n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
        ls = (0, lse.stride(0), lse.stride(1))
    else:
        lse = _empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
        ls = lse.stride()
    left, right = window
    has_window = left >= 0 or right >= 0
    grid = lambda meta: (batch * n_heads, triton.cdiv(max(seqlen_q, 1), meta["BLOCK_M"]))  # noqa: E731
    paged = block_table is not None
    use_tma = not paged and _use_tma(q, k, v)
    if use_tma:
        _set_allocator(q.device)
    if batch * n_heads > 0 and q.numel() > 0:
        _attention_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_table,
            *qs, *ks, *vs, *os_, *ls,
            block_table.stride(0) if paged else 0, k.shape[1] if paged else 1,
            seqlen_q, seqlen_k, n_heads,
            sm_scale * 1.4426950408889634,
            left if left >= 0 else _UNBOUNDED, right if right >= 0 else _UNBOUNDED, triton.next_power_of_2(max(seqlen_q, 1)),
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GQA_GROUP=n_heads // n_kv,
            IS_CAUSAL=causal, HAS_WINDOW=has_window, IS_VARLEN=varlen, RETURN_LSE=return_lse,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=use_tma, PAGED=paged,
        )
    return out, (lse if return_lse else None)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------------------------
# Public op: checks, dispatch, and registration as a PyTorch custom op (works under torch.compile).


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _INTERPRET


@torch.library.custom_op("inferforge::flash_attention_fwd", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                        cu_seqlens_k: torch.Tensor | None, causal: bool, sm_scale: float, window_left: int,
                        window_right: int, max_seqlen_q: int, max_seqlen_k: int,
                        block_table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = dict(causal=causal, sm_scale=sm_scale, window=(window_left, window_right), cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=True,
                  block_table=block_table)
    if _use_triton(q):
        return attention_triton(q, k, v, **kwargs)
    from inferforge.kernels._checks import reference_fallback
    from inferforge.kernels.reference import attention_reference

    reference_fallback("flash_attention")
    return attention_reference(q, k, v, **kwargs)


@_flash_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, window_left, window_right, max_seqlen_q, max_seqlen_k,
      block_table):
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, block_table=None):
    from inferforge.kernels._checks import (
        check,
        check_dtype,
        check_last_dim_contiguous,
        check_same,
        check_tensor,
    )

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    paged = block_table is not None
    check(not paged or varlen, "block_table needs variable-length input: pass cu_seqlens_q and cu_seqlens_k")
    if varlen:
        check(cu_seqlens_q is not None and cu_seqlens_k is not None,
              "cu_seqlens_q and cu_seqlens_k must be given together (variable-length input)")
        check_tensor("q", q, dims=3, layout="[total_q, n_heads, head_dim] (variable length)")
        kv_dims, kv_layout = ((4, "[num_blocks, page_size, n_kv_heads, head_dim] (paged)") if paged
                              else (3, "[total_k, n_kv_heads, head_dim] (variable length)"))
        check_tensor("k", k, dims=kv_dims, layout=kv_layout)
        check_tensor("v", v, dims=kv_dims, layout=kv_layout)
    else:
        check_tensor("q", q, dims=4, layout="[batch, seq_q, n_heads, head_dim]")
        check_tensor("k", k, dims=4, layout="[batch, seq_k, n_kv_heads, head_dim]")
        check_tensor("v", v, dims=4, layout="[batch, seq_k, n_kv_heads, head_dim]")
        check_same("q, k, v", q.shape[0], k.shape[0], v.shape[0], what="batch size")
    check(k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_same("q, k, v", q.device, k.device, v.device, what="device")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    check_same("q, k, v", q.dtype, k.dtype, v.dtype, what="dtype")
    head_dim, n_heads, n_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    check(k.shape[-1] == head_dim, f"q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    check(1 <= head_dim <= 256, f"head_dim must be between 1 and 256, got {head_dim}")
    check(n_kv >= 1 and n_heads % n_kv == 0,
          f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv}) for GQA/MQA")
    check(len(window) == 2 and all(isinstance(w, int) and w >= -1 for w in window),
          f"window must be (left, right) with integers >= -1 (-1: unbounded), got {window!r}")
    if not varlen:
        return None, None
    if paged:
        check(isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and block_table.dtype == torch.int32
              and block_table.shape[0] == cu_seqlens_q.shape[0] - 1 and block_table.device == q.device,
              f"block_table must be an int32 tensor [batch={cu_seqlens_q.shape[0] - 1}, max_blocks] on {q.device}, got "
              f"{getattr(block_table, 'dtype', type(block_table).__name__)} {tuple(getattr(block_table, 'shape', ()))}")
    totals = (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
              ("cu_seqlens_k", cu_seqlens_k, None if paged else k.shape[0]))
    for name, cu, total in totals:
        check(isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.dtype == torch.int32,
              f"{name} must be a 1-D int32 tensor [batch + 1], got "
              f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        check(cu.device == q.device, f"{name} must be on {q.device}, got {cu.device}")
        check(cu.shape[0] >= 2, f"{name} must have batch + 1 >= 2 entries, got {cu.shape[0]}")
        if not torch.compiler.is_compiling():
            values = cu.tolist()
            check(values[0] == 0 and values[-1] == (values[-1] if total is None else total)
                  and all(a <= b for a, b in zip(values, values[1:])),
                  f"{name} must start at 0, never decrease, and end at the total length {total}, got {values}")
    check(cu_seqlens_q.shape == cu_seqlens_k.shape,
          f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got {cu_seqlens_q.shape[0]} and "
          f"{cu_seqlens_k.shape[0]}")
    longest_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if max_seqlen_q is None else max_seqlen_q
    longest_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if max_seqlen_k is None else max_seqlen_k
    if paged and not torch.compiler.is_compiling():
        capacity = block_table.shape[1] * k.shape[1]
        check(int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) <= capacity,
              f"a context length exceeds block_table's capacity (max_blocks * page_size = {capacity})")
    if not torch.compiler.is_compiling() and (max_seqlen_q is not None or max_seqlen_k is not None):
        check(longest_q >= int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()),
              f"max_seqlen_q ({max_seqlen_q}) is smaller than the longest query sequence")
        check(longest_k >= int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()),
              f"max_seqlen_k ({max_seqlen_k}) is smaller than the longest key sequence")
    return longest_q, longest_k


def flash_attention(q, k, v, *, causal=False, sm_scale=None, window=(-1, -1), cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, return_lse=False, block_table=None, dispatch=True):
    """Fused attention forward: softmax(q k^T * sm_scale + mask) v, without materializing the scores.

    Shapes (FlashAttention layout): `q` `[batch, seq_q, n_heads, head_dim]`, `k`/`v`
    `[batch, seq_k, n_kv_heads, head_dim]` with `n_heads` a multiple of `n_kv_heads` (MHA, GQA, MQA).
    Variable length: `q` `[total_q, n_heads, head_dim]`, `k`/`v` `[total_k, n_kv_heads, head_dim]`,
    and int32 `cu_seqlens_q`/`cu_seqlens_k` `[batch + 1]` (zero-length sequences allowed);
    `max_seqlen_q/k` avoid a device sync when given.

    Paged KV (chunked prefill over a KV cache): with int32 `block_table` `[batch, max_blocks]`,
    `k`/`v` are cache pools `[num_blocks, page_size, n_kv_heads, head_dim]` and `cu_seqlens_k`
    gives each sequence's context length (cached prefix plus the new tokens); key t of sequence b
    is read from block `block_table[b, t // page_size]`, slot `t % page_size`. Requires varlen `q`.

    `causal` and `window=(left, right)` (-1: unbounded) align to the bottom right when
    seq_q != seq_k: query i sits at key position i + seq_k - seq_q. A query that sees no key gets
    zeros. head_dim up to 256 (any size); fp16, bf16 or fp32; the last dimension must be contiguous,
    other strides are free. `sm_scale` defaults to 1/sqrt(head_dim).

    Returns the output (input dtype, shape of `q`), and with `return_lse` also the float32
    log-sum-exp of the scaled scores: `[batch, n_heads, seq_q]`, or `[n_heads, total_q]` for
    variable-length input (-inf for rows that see no key).

    Runs the Triton kernel on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (Triton's
    interpreter); otherwise the PyTorch reference (`inferforge.kernels.reference`). On CUDA, a dense
    call whose shape a measured table says PyTorch's SDPA runs faster on this GPU goes to that SDPA
    backend (`inferforge.kernels.attention_dispatch`); `dispatch=False` or
    INFERFORGE_ATTENTION_DISPATCH=kernel always runs the kernel.
    """
    window = tuple(window)
    longest_q, longest_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window,
                                         block_table)
    if sm_scale is None:
        sm_scale = default_scale(q.shape[-1])
    if dispatch and q.is_cuda and not torch.compiler.is_compiling():
        from inferforge.kernels.attention_dispatch import maybe_sdpa

        out = maybe_sdpa(q, k, v, causal=bool(causal), sm_scale=float(sm_scale), window=window,
                         varlen=cu_seqlens_q is not None, return_lse=return_lse)
        if out is not None:
            return out
    out, lse = _flash_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, bool(causal), float(sm_scale),
                                   int(window[0]), int(window[1]), longest_q or 0, longest_k or 0, block_table)
    return (out, lse) if return_lse else out
