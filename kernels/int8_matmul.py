"""W8A8 matmul: int8 activations x int8 weights -> int32 accumulators, scaled per token and per channel.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]), accumulated exactly in
int32 on the integer tensor cores; each program computes one BLOCK_M x BLOCK_N output tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int8_matmul_kernel(
    X, W,                   # int8 [M, K], int8 [N, K]
    XScale, WScale,         # float32 [M], [N]
    Bias, Out,              # [N] (HAS_BIAS), [M, N] in the output dtype
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
    out = acc.to(tl.float32) * tl.load(XScale + offs_m, mask=m_mask, other=0.0)[:, None]
    out = out * tl.load(WScale + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def int8_matmul(x_q, w_q, x_scale, w_scale, bias=None, *, out_dtype=torch.float16):
    """int8 `x_q` `[M, K]` times int8 `w_q` `[N, K]`^T with float32 per-token `x_scale` `[M]` and
    per-channel `w_scale` `[N]`: returns `[M, N]` in `out_dtype`."""
    check_tensor("x_q", x_q, dims=2, layout="int8 [M, K]")
    check_tensor("w_q", w_q, dims=2, layout="int8 [N, K]")
    check(x_q.dtype == torch.int8 and w_q.dtype == torch.int8, f"x_q and w_q must be int8, got {x_q.dtype}, {w_q.dtype}")
    (m, k), n = x_q.shape, w_q.shape[0]
    check(w_q.shape[1] == k, f"x_q is [M, {k}] but w_q is {tuple(w_q.shape)}: the K dimensions differ")
    check(x_scale.shape == (m,) and w_scale.shape == (n,) and x_scale.dtype == w_scale.dtype == torch.float32,
          f"x_scale must be float32 [{m}] and w_scale float32 [{n}]")
    x_q, w_q, x_scale, w_scale = x_q.contiguous(), w_q.contiguous(), x_scale.contiguous(), w_scale.contiguous()
    if not (x_q.is_cuda or _INTERPRET):
        from inferforge.kernels.reference import int8_matmul_reference

        return int8_matmul_reference(x_q, w_q, x_scale, w_scale, bias, out_dtype=out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    block = 32 if _INTERPRET else 64
    _int8_matmul_kernel[(triton.cdiv(m, block), triton.cdiv(n, block))](
        x_q, w_q, x_scale, w_scale, bias if bias is not None else x_scale, out, m, n, k,
        x_q.stride(0), w_q.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=block, BLOCK_N=block, BLOCK_K=32 if _INTERPRET else 128, num_warps=4,
    )
    return out
