"""W8A8 matmul: int8 activations x int8 weights -> int32 accumulators, scaled per token and per channel.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]), accumulated exactly in
int32 on the integer tensor cores; each program computes one BLOCK_M x BLOCK_N output tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_tensor, new_output, reference_fallback

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET or os.environ.get("INFERFORGE_AUTOTUNE") == "0":
        return [triton.Config({"BLOCK_M": 32 if _INTERPRET else 64, "BLOCK_N": 32 if _INTERPRET else 64,
                               "BLOCK_K": 32 if _INTERPRET else 128}, num_warps=4)]
    shapes = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 3), (128, 128, 128, 4, 4),
              (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 256, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes]


@triton.autotune(configs=_configs(), key=["m_bucket", "N", "K"])
@triton.jit
def _int8_matmul_kernel(
    X, W,                   # int8 [M, K], int8 [N, K]
    XScale, WScale,         # float32 [M], [N]
    Bias, Out,              # [N] (HAS_BIAS), [M, N] in the output dtype
    M, N, K, stride_xm, stride_wn, stride_om,
    m_bucket,               # next power of two of M: the autotuning key, so every M does not re-tune
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column of W while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
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

        reference_fallback("int8_matmul")
        return int8_matmul_reference(x_q, w_q, x_scale, w_scale, bias, out_dtype=out_dtype)
    out = new_output((m, n), out_dtype, x_q.device)
    if m == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_matmul_kernel[grid](
        x_q, w_q, x_scale, w_scale, bias if bias is not None else x_scale, out, m, n, k,
        x_q.stride(0), w_q.stride(0), out.stride(0), triton.next_power_of_2(m), HAS_BIAS=bias is not None, GROUP_M=8,
    )
    return out
