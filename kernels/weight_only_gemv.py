"""Weight-only GEMV for decode (M = 1): y[n] = sum_k x[k] * dequant(W)[n, k] (+ bias[n]), on the FMA units.

At M = 1 there is nothing for tensor cores to reuse: each weight byte is read once and used once, so
the kernel's job is to keep enough bytes in flight and to spend as few instructions per weight as the
bandwidth leaves room for (an H100 has about 5 FP32 operations per int4 weight at full bandwidth).

Program (n_block, split) owns BLOCK_N output rows and one long slice of K (a few programs along K,
"reverse split-K": long contiguous runs of each weight row, few partial sums to combine):

    W rows  n_block*BLOCK_N ..  | split 0: k 0 .. k_per_split | split 1 | ... |
    per row and tile of BLOCK_K k (inside one group):
        qx = sum_k q[k] x[k]                 (one multiply-add per weight, codes as floats)
        xs = sum_k x[k]
        y += scale * (qx - zero * xs)        (scale and zero loaded once per tile)

That is (q - zero) * scale summed over the tile, with the zero point and scale applied once per tile
(once per group with the shipped BLOCK_K = group size) instead of once per weight. int8 is symmetric with a per-row scale: y = scale * sum_k q[k] x[k].

Int4 bytes are unpacked as `b & 0xF` and `b >> 4`. In `int4-interleaved-v1` these are contiguous halves
of each 32-k unit (see int4_layout.py), met by contiguous runs of x; in `int4-kpairs-v0` they are
even and odd k, met by x's even and odd entries.

Splits are combined in one launch: each program atomically adds its float32 partial into a workspace
row, then increments its column block's counter; the program that arrives last reads the sum, adds
the bias and writes y in x's dtype, and resets the workspace and counter to zero, so the cached
workspace needs no memset before the next call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import new_output


@triton.jit
def _codes_to_float(v):
    # Exact int -> float32 for 0 <= v < 2**23 without the conversion unit: the bits 0x4B000000 | v are 2**23 + v.
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_kernel(
    X,                      # [K] activations (fp16 / bf16 / fp32)
    W,                      # int8 [N, K] (BITS=8) or uint8 [N, K // 2] packed int4 (BITS=4)
    Scales, Zeros,          # float32 [N] (BITS=8) or [N, K // GROUP] (BITS=4)
    Bias,                   # [N] (HAS_BIAS)
    Out,                    # [N] in x's dtype
    Partial,                # float32 [N], all zero on entry and on exit (SPLITS > 1)
    Counters,               # int32 [cdiv(N, BLOCK_N)], all zero on entry and on exit (SPLITS > 1)
    N, K, stride_wn, stride_sn, k_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if BITS == 8:
        qx = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            q = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            x = tl.load(X + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            qx += (_codes_to_float(q.to(tl.int32) + 128) - 128.0) * x[None, :]
        acc = tl.sum(qx, axis=1) * tl.load(Scales + offs_n, mask=n_mask, other=0.0)
    else:
        # k_per_split and K are multiples of GROUP, and BLOCK_K divides GROUP: no tile crosses k_hi or a
        # group. One flat loop (so Triton pipelines its loads); the row sums per tile are the price of
        # applying zero and scale per tile instead of per weight (per group when BLOCK_K == GROUP).
        HALF: tl.constexpr = BLOCK_K // 2
        offs_j = tl.arange(0, HALF)                          # byte within the tile
        if INTERLEAVED:                                      # byte 16u + i: k 32u + i (lo), 32u + 16 + i (hi)
            k_of_lo = (offs_j // 16) * 32 + offs_j % 16
            k_of_hi = k_of_lo + 16
        else:                                                # byte j: k 2j (lo), 2j + 1 (hi)
            k_of_lo = 2 * offs_j
            k_of_hi = k_of_lo + 1
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            packed = tl.load(w_rows + (k0 // 2 + offs_j)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
            x_lo = tl.load(X + k0 + k_of_lo).to(tl.float32)
            x_hi = tl.load(X + k0 + k_of_hi).to(tl.float32)
            qx = _codes_to_float(packed & 0xF) * x_lo[None, :] + _codes_to_float(packed >> 4) * x_hi[None, :]
            group = k0 // GROUP
            scale = tl.load(Scales + offs_n * stride_sn + group, mask=n_mask, other=0.0)
            zero = tl.load(Zeros + offs_n * stride_sn + group, mask=n_mask, other=0.0)
            acc += scale * (tl.sum(qx, axis=1) - zero * tl.sum(x_lo + x_hi, axis=0))
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Out + offs_n, acc.to(Out.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(Partial + offs_n, acc, mask=n_mask, sem="relaxed")
        # acq_rel: this program's adds are visible before its count, and the last one sees everyone's.
        arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            # Every other split's add happened before its count (release), read from L2 (.cg), not L1.
            total = tl.load(Partial + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(Partial + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_mask)
            if HAS_BIAS:
                total += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(Out + offs_n, total.to(Out.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(Counters + pid_n, 0)


@dataclass(frozen=True)
class GemvConfig:
    """A GEMV launch configuration; shares `block_m` / `dequantize_first` with the tiled kernel's
    TileConfig so code that reads the tuner's choice can treat both alike."""

    block_m: ClassVar[int] = 1
    dequantize_first: ClassVar[bool] = False
    block_n: int
    block_k: int             # int4: divides the group size
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4           # split K until about waves x (SM count) programs run
    min_k_per_split: int = 512


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device, n: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 [n] partial sums and int32 [blocks] counters, cached per (device, stream, size):
    the kernel leaves them zero, so reuse costs nothing. A new stream (or a CUDA-graph capture) gets
    its own, so concurrent calls never share one."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, n, blocks)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(n, dtype=torch.float32, device=device),
                            torch.zeros(blocks, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def gemv_splits(n: int, k: int, bits: int, group: int, cfg: GemvConfig, sms: int) -> int:
    """How many slices of K: enough programs for `waves` x `sms`, each slice at least
    `min_k_per_split` long (a whole number of groups for int4, of BLOCK_K for int8)."""
    step = group if bits == 4 else cfg.block_k
    steps = triton.cdiv(k, step)
    want = triton.cdiv(cfg.waves * sms, triton.cdiv(n, cfg.block_n))
    return max(1, min(want, steps, k // max(cfg.min_k_per_split, step)))


def gemv(x1, w, scales, zeros, bias, *, n, k, bits, group, interleaved: bool, cfg: GemvConfig,
         splits: int | None = None) -> torch.Tensor:
    """x1 `[1, K]` (contiguous) times the weight-only `w`: returns `[1, N]` in x's dtype. `splits`
    overrides the number of K slices (tests); the grid is (cdiv(N, BLOCK_N), splits)."""
    if bits == 4:
        assert group % cfg.block_k == 0 and k % group == 0, (group, cfg.block_k, k)
    sms = torch.cuda.get_device_properties(x1.device).multi_processor_count if x1.is_cuda else 1
    splits = splits or gemv_splits(n, k, bits, group, cfg, sms)
    step = group if bits == 4 else cfg.block_k
    k_per_split = triton.cdiv(triton.cdiv(k, splits), step) * step
    splits = triton.cdiv(k, k_per_split) if k else 1
    out = new_output((1, n), x1.dtype, x1.device)
    if n == 0:
        return out
    blocks = triton.cdiv(n, cfg.block_n)
    partial, counters = _workspace(x1.device, n, blocks) if splits > 1 else (scales, scales)
    _gemv_kernel[(blocks, splits)](
        x1, w, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        partial, counters, n, k, w.stride(0), scales.stride(0), k_per_split,
        BITS=bits, GROUP=group, INTERLEAVED=interleaved, HAS_BIAS=bias is not None, SPLITS=splits,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
