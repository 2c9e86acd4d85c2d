"""Weight-only quantized matmuls: y = x @ dequant(W)^T (+ bias), dequantizing W in registers.

`w8a16_matmul`: int8 weights `[N, K]` with one float32 scale per output channel `[N]`.
`w4a16_matmul`: int4 weights packed two per byte `[N, K // 2]` (even k in the low nibble, odd k in
the high one, both as unsigned 0..15), with float32 scales and zero points per group of
`group_size` input channels `[N, K // group_size]`: w = (q - zero) * scale.

Program (m, n, split) computes a BLOCK_M x BLOCK_N tile of the output over its share of K. At
small M (decode) the weights dominate the traffic, and one tile per (m, n) leaves most SMs idle,
so K is split across programs (split-K) and the float32 partial tiles are summed afterwards.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_dtype, check_tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _weight_only_kernel(
    X,                      # [M, K] activations
    W,                      # int8 [N, K] (BITS=8) or uint8 [N, K // 2] packed (BITS=4)
    Scales, Zeros,          # float32 [N] (BITS=8) or [N, K // GROUP] (BITS=4)
    Partial,                # float32 [SPLIT_K, M, N]
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_pk, stride_pm,
    k_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if BITS == 8:
            w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0).to(x.dtype)
        else:
            # Unpack BLOCK_K // 2 bytes into BLOCK_K nibbles, then dequantize with the tile's group
            # (BLOCK_K divides GROUP, so one scale and zero per output channel per tile).
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_b[None, :],
                             mask=n_mask[:, None] & (offs_b < (k_hi + 1) // 2)[None, :], other=0)
            low = (packed & 0xF).to(tl.float32)
            high = ((packed >> 4) & 0xF).to(tl.float32)
            q = tl.reshape(tl.join(low, high), [BLOCK_N, BLOCK_K])
            group = k0 // GROUP
            scale = tl.load(Scales + offs_n * stride_sn + group, mask=n_mask, other=0.0)
            zero = tl.load(Zeros + offs_n * stride_sn + group, mask=n_mask, other=0.0)
            w = ((q - zero[:, None]) * scale[:, None]).to(x.dtype)
            w = tl.where(k_mask[None, :], w, 0.0).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if BITS == 8:
        acc = acc * tl.load(Scales + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(Partial + split * stride_pk + offs_m[:, None] * stride_pm + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])


def _split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device) -> int:
    """Enough programs to fill the GPU twice over, each with at least 4 K-blocks of work."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(2 * sms, tiles), k // (4 * block_k), 16))


def _launch(x, w, scales, zeros, bias, *, n, k, bits, group, split_k):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not (x.is_cuda or _INTERPRET):
        from inferforge.kernels.reference import weight_only_matmul_reference

        return weight_only_matmul_reference(x, w, scales, zeros, bias, bits=bits, group_size=group)
    block_m = 16 if m <= 16 else (32 if _INTERPRET else 64)
    block_n = 32 if _INTERPRET else 64
    block_k = min(group, 32 if _INTERPRET else 64) if bits == 4 else (32 if _INTERPRET else 64)
    splits = split_k or _split_k(m, n, k, block_m, block_n, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    if m:
        _weight_only_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
            x2, w, scales, zeros if zeros is not None else scales, partial, m, n, k,
            x2.stride(0), w.stride(0), scales.stride(0), partial.stride(0), partial.stride(1), k_per_split,
            BITS=bits, GROUP=group, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
    out = partial.sum(0) if splits > 1 else partial[0]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def _check_common(x, w, bias):
    check(isinstance(x, torch.Tensor) and x.dim() >= 1, "x must be a tensor [..., in_features]")
    check_dtype("x", x)
    check(w.device == x.device, f"the weights must be on {x.device} like x, got {w.device}")
    if bias is not None:
        check(isinstance(bias, torch.Tensor) and bias.shape == (w.shape[0],),
              f"bias must be [out_features={w.shape[0]}], got {tuple(getattr(bias, 'shape', ()))}")


def w8a16_matmul(x, weight, scale, bias=None, *, split_k=None):
    """x `[..., K]` (fp16/bf16/fp32) times int8 `weight` `[N, K]` with float32 per-channel `scale`
    `[N]`: returns `x @ (weight * scale[:, None]).T + bias` in x's dtype, `[..., N]`."""
    check_tensor("weight", weight, dims=2, layout="int8 [out_features, in_features]")
    check(weight.dtype == torch.int8, f"weight must be int8, got {weight.dtype}")
    n, k = weight.shape
    _check_common(x, weight, bias)
    check(x.shape[-1] == k, f"x's last dimension must be in_features={k}, got {x.shape[-1]}")
    check(scale.shape == (n,) and scale.dtype == torch.float32, f"scale must be float32 [{n}], got {scale.dtype} "
                                                                f"{tuple(scale.shape)}")
    check(weight.stride(-1) == 1, "weight must be contiguous in its last dimension")
    return _launch(x, weight, scale, None, bias, n=n, k=k, bits=8, group=k, split_k=split_k)


def w4a16_matmul(x, packed, scales, zeros, bias=None, *, group_size=128, split_k=None):
    """x `[..., K]` times int4 weights packed two per byte, `packed` uint8 `[N, K // 2]`, with
    float32 `scales` and `zeros` `[N, K // group_size]` (w = (q - zero) * scale, q in 0..15).
    Returns `[..., N]` in x's dtype."""
    check_tensor("packed", packed, dims=2, layout="uint8 [out_features, in_features // 2]")
    check(packed.dtype == torch.uint8, f"packed must be uint8 (two int4 per byte), got {packed.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 2
    _check_common(x, packed, bias)
    check(x.shape[-1] == k, f"x's last dimension must be in_features={k}, got {x.shape[-1]}")
    check(group_size >= 16 and group_size & (group_size - 1) == 0,
          f"group_size must be a power of two >= 16, got {group_size}")
    check(k % group_size == 0, f"in_features ({k}) must be a multiple of group_size ({group_size})")
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        check(isinstance(t, torch.Tensor) and t.shape == (n, groups) and t.dtype == torch.float32 and t.is_contiguous(),
              f"{name} must be contiguous float32 [{n}, {groups}], got {getattr(t, 'dtype', None)} "
              f"{tuple(getattr(t, 'shape', ()))}")
    return _launch(x, packed, scales, zeros, bias, n=n, k=k, bits=4, group=group_size, split_k=split_k)
