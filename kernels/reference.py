"""Plain PyTorch references for the kernels: slow, obviously correct, and the spec the kernels are tested against."""

from __future__ import annotations

import math

import torch


def _visible(q_len: int, k_len: int, *, causal: bool, window: tuple[int, int], device) -> torch.Tensor:
    """Boolean [q_len, k_len]: query i sees key j. Causal and windows align to the bottom right:
    query i sits at key position i + k_len - q_len (FlashAttention 2.1+ convention)."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    left, right = window
    ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _attend(q, k, v, *, causal, sm_scale, window, dtype):
    """One sequence. q [s_q, h, d], k/v [s_k, h_kv, d] -> (out [s_q, h, d] in `dtype`, lse [h, s_q] float32)."""
    s_q, n_heads, _ = q.shape
    s_k, n_kv, _ = k.shape
    group = n_heads // n_kv
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * sm_scale
    visible = _visible(s_q, s_k, causal=causal, window=window, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                 # -inf where a row sees nothing
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    probs = probs.masked_fill(~visible, 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out, lse.float()


def attention_reference(q, k, v, *, causal=False, sm_scale=None, window=(-1, -1), cu_seqlens_q=None,
                        cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False,
                        compute_dtype=torch.float32, block_table=None):
    """Reference for `inferforge.kernels.flash_attention` (same arguments), computed in `compute_dtype`.

    Returns the output in the input dtype (or in `compute_dtype` when that is float64, for error
    measurement), and with `return_lse` the float32 log-sum-exp: `[batch, n_heads, seq_q]`, or
    `[n_heads, total_q]` for variable-length input. A query row that sees no key gets zeros and an
    LSE of -inf.
    """
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    out_dtype = compute_dtype if compute_dtype == torch.float64 else q.dtype
    kwargs = dict(causal=causal, sm_scale=sm_scale, window=tuple(window), dtype=compute_dtype)
    if cu_seqlens_q is None:
        outs, lses = zip(*(_attend(q[b], k[b], v[b], **kwargs) for b in range(q.shape[0]))) if q.shape[0] else ((), ())
        out = torch.stack(outs) if outs else q.new_zeros(q.shape, dtype=compute_dtype)
        lse = torch.stack(lses) if lses else q.new_zeros((0, q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        for b in range(len(cq) - 1):
            if cq[b + 1] == cq[b]:
                continue
            if block_table is not None:   # gather the sequence's keys through its block table
                n, page = ck[b + 1] - ck[b], k.shape[1]
                pages = block_table[b, : -(-n // page)].long()
                kb = k[pages].reshape(-1, *k.shape[2:])[:n]
                vb = v[pages].reshape(-1, *v.shape[2:])[:n]
            else:
                kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
            o, l_ = _attend(q[cq[b]:cq[b + 1]], kb, vb, **kwargs)
            out[cq[b]:cq[b + 1]] = o
            lse[:, cq[b]:cq[b + 1]] = l_
    out = out.to(out_dtype)
    return (out, lse) if return_lse else out


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """[num_blocks, block_size, n_kv_heads, d] cache (float, fp8 or int8) -> `dtype`, times per-head scales."""
    out = cache.to(dtype)
    if scale is not None:
        out = out * scale.to(dtype)[None, None, :, None]
    return out


def quantize_for_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What `append_kv` stores for new tokens x [num_tokens, n_kv_heads, d]: a cast, or x / scale
    rounded to int8 (symmetric, clamped to +-127) or cast to fp8 e4m3 (saturating at +-448)."""
    if cache_dtype == torch.int8:
        return torch.round(x.float() / scale[None, :, None]).clamp(-127, 127).to(torch.int8)
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale[None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return x.to(cache_dtype)


def append_kv_reference(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """Reference for `append_kv`: writes in place; slot -1 is skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize_for_cache(k[keep], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize_for_cache(v[keep], v_cache.dtype, v_scale)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, *, sm_scale=None, k_scale=None,
                                     v_scale=None, window=None, compute_dtype=torch.float32):
    """Reference for `paged_decode_attention`: gathers each sequence's KV through its block table.

    q [batch, n_heads, d]; caches [num_blocks, block_size, n_kv_heads, d]; block_tables int32
    [batch, max_blocks]; seq_lens int32 [batch]. With `window`, only the last `window` tokens are
    attended. Returns [batch, n_heads, d] in q's dtype (compute_dtype if float64); a sequence of
    length 0 gets zeros.
    """
    batch, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    keys = dequantize_cache(k_cache, k_scale, compute_dtype)
    values = dequantize_cache(v_cache, v_scale, compute_dtype)
    out = torch.zeros(batch, n_heads, head_dim, dtype=compute_dtype, device=q.device)
    for b in range(batch):
        length = int(seq_lens[b])
        if length == 0:
            continue
        pages = block_tables[b, : (length + block_size - 1) // block_size].long()
        kb = keys[pages].reshape(-1, n_kv, head_dim)[:length]
        vb = values[pages].reshape(-1, n_kv, head_dim)[:length]
        start = max(0, length - window) if window else 0
        kb, vb = kb[start:], vb[start:]
        group = n_heads // n_kv
        kb = kb.repeat_interleave(group, dim=1)
        vb = vb.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].to(compute_dtype), kb) * sm_scale
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), vb)
    return out if compute_dtype == torch.float64 else out.to(q.dtype)


def unpack_int4(packed: torch.Tensor, layout: str = "int4-kpairs-v0") -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] codes in k order; by default even k from the low nibble, odd k
    from the high one (`int4-kpairs-v0`; the layouts are in int4_layout.py)."""
    from inferforge.kernels.int4_layout import unpack

    return unpack(packed, layout)


def pack_int4(q: torch.Tensor, layout: str = "int4-kpairs-v0") -> torch.Tensor:
    """uint8 values 0..15 [N, K] (K even) -> uint8 [N, K // 2] in `layout`, which `w4a16_matmul` reads."""
    from inferforge.kernels.int4_layout import pack

    return pack(q, layout)


def dequantize_weight_only_reference(w, scales, zeros, *, bits, group_size, compute=torch.float32,
                                     layout="int4-kpairs-v0"):
    """The dense [N, K] weights of a w8a16 (bits=8) or w4a16 (bits=4, packed in `layout`) layer."""
    if bits == 8:
        return w.to(compute) * scales.to(compute)[:, None]
    q = unpack_int4(w, layout).to(compute)
    expand = lambda t: t.to(compute).repeat_interleave(group_size, dim=1)  # noqa: E731
    return (q - expand(zeros)) * expand(scales)


def weight_only_matmul_reference(x, w, scales, zeros, bias, *, bits, group_size, layout="int4-kpairs-v0"):
    """Reference for `w8a16_matmul` (bits=8) and `w4a16_matmul` (bits=4): dequantize, then matmul in
    float32 (float64 when x is float64)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = dequantize_weight_only_reference(w, scales, zeros, bits=bits, group_size=group_size, compute=compute,
                                              layout=layout)
    out = x.to(compute) @ weight.T
    if bias is not None:
        out = out + bias.to(compute)
    return out.to(x.dtype)


def int8_matmul_reference(x_q, w_q, x_scale, w_scale, bias=None, *, out_dtype=torch.float16):
    """Reference for `int8_matmul`: exact integer products (int64 here), then the scales."""
    acc = (x_q.cpu().long() @ w_q.cpu().long().T).double()           # CUDA has no int64 matmul
    out = acc * x_scale.cpu().double()[:, None] * w_scale.cpu().double()[None, :]
    if bias is not None:
        out = out + bias.cpu().double()
    return out.to(out_dtype).to(x_q.device)


def quantize_rows_reference(x, dtype=torch.int8, *, divisor=None, scale=None, per_tensor=False):
    """Reference for `quantize_rows`: per-row (or the given per-tensor) symmetric scale, round half to
    even (int8) or round to nearest e4m3 (torch's cast), clamped to the format's range."""
    qmax = 127.0 if dtype == torch.int8 else 448.0
    xf = x.float()
    if divisor is not None:
        xf = xf / divisor
    if per_tensor:
        scale = (xf.abs().amax().reshape(1) / qmax).clamp(min=1e-12) if xf.numel() else torch.full((1,), 1e-12)
        v = xf / scale
    elif scale is None:
        scale = (xf.abs().amax(dim=1) / qmax).clamp(min=1e-12)
        v = xf / scale[:, None]
    else:
        scale = scale.reshape(1).float()
        v = xf / scale
    v = v.clamp(-qmax, qmax)
    return (torch.round(v) if dtype == torch.int8 else v).to(dtype), scale
