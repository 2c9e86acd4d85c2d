"""Weight-only quantized matmuls: y = x @ dequant(W)^T (+ bias), dequantizing W in registers.

`w8a16_matmul`: int8 weights `[N, K]` with one float32 scale per output channel `[N]`.
`w4a16_matmul`: int4 weights packed two per byte `[N, K // 2]` (unsigned 0..15) in one of the
layouts of int4_layout.py (`layout=`: `int4-kpairs-v0`, even k low / odd k high, or
`int4-interleaved-v1`, the two contiguous halves of each 32-k unit), with float32 scales and zero
points per group of `group_size` input channels `[N, K // group_size]`: w = (q - zero) * scale.

Paths, chosen per (M bucket, N, K, format, layout) by the tuner on a GPU (fixed defaults otherwise):
- M = 1: the GEMV of weight_only_gemv.py (CUDA cores, long K slices, one launch);
- M = 2-16: the tiled kernel below with BLOCK_M = 16 and split-K;
- M > 16: the tiled kernel, or dequantize-then-cuBLAS (`TileConfig.dequantize_first`).

Program (m, n, split) of the tiled kernel computes a BLOCK_M x BLOCK_N tile of the output over its
share of K; with several splits the float32 partial tiles are summed by a second small kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.kernels import int4_layout
from inferforge.kernels._checks import check, check_dtype, check_tensor, new_output, reference_fallback
from inferforge.kernels.weight_only_gemv import GemvConfig, gemv

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int_to_float(q_plus_bias, bias: tl.constexpr):
    # Exact int -> float32 without the (quarter-rate) conversion unit: for 0 <= v < 2**23, the bits
    # 0x4B000000 | v are the float 2**23 + v. `q_plus_bias` is the int32 value q + bias, bias making it >= 0.
    return (q_plus_bias | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _int4_k_of_nibbles(k0, INTERLEAVED: tl.constexpr, BLOCK_K: tl.constexpr):
    # The k of the low and high nibbles of the tile's bytes (int4_layout.py), each [BLOCK_K // 2].
    offs_j = tl.arange(0, BLOCK_K // 2)
    if INTERLEAVED:
        k_lo = k0 + (offs_j // 16) * 32 + offs_j % 16
        return k_lo, k_lo + 16
    else:
        return k0 + 2 * offs_j, k0 + 2 * offs_j + 1


@triton.jit
def _int4_halves(w_rows, Scales, Zeros, offs_n, n_mask, k0, k_hi, stride_sn,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Dequantized float32 weights of the low and high nibbles of the tile's bytes, each [BLOCK_N, BLOCK_K // 2].
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (2 * offs_b < k_hi)[None, :], other=0)
    scale = tl.load(Scales + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
    zero = tl.load(Zeros + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
    return ((packed & 0xF).to(tl.float32) - zero) * scale, ((packed >> 4).to(tl.float32) - zero) * scale


@triton.jit
def _dequantize_int4_tile(w_rows, Scales, Zeros, offs_n, n_mask, k0, k_hi, stride_sn,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The float32 [BLOCK_N, BLOCK_K] weights at k0: BLOCK_K // 2 bytes unpacked into nibbles in k
    # order, (q - zero) * scale with the tile's group (BLOCK_K divides GROUP: one scale and zero per row).
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (2 * offs_b < k_hi)[None, :], other=0)
    q = tl.reshape(tl.join((packed & 0xF).to(tl.float32), ((packed >> 4) & 0xF).to(tl.float32)), [BLOCK_N, BLOCK_K])
    scale = tl.load(Scales + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
    zero = tl.load(Zeros + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
    return (q - zero) * scale


@triton.jit
def _weight_only_kernel(
    X,                      # [M, K] activations
    W,                      # int8 [N, K] (BITS=8) or uint8 [N, K // 2] packed (BITS=4)
    Scales, Zeros,          # float32 [N] (BITS=8) or [N, K // GROUP] (BITS=4)
    Bias,                   # [N] (HAS_BIAS and not SPLIT)
    Out,                    # [M, N] in x's dtype, or float32 partials [SPLITS, M, N] when SPLIT
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ok, stride_om,
    k_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERLEAVED: tl.constexpr = False,
):
    # The accumulator is transposed, [BLOCK_N, BLOCK_M]: on the tensor-core path the dequantized
    # weights are the dot's first operand, which Hopper's wgmma can take straight from registers,
    # while x (small) goes through shared memory.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    if BLOCK_M == 1:
        # Decode (M = 1): elementwise products summed on the FMA units into a [BLOCK_N, width] tile,
        # reduced once after the loop. Int4: byte j holds k = 2j (low nibble) and 2j + 1 (high), met by
        # the even and odd entries of x (a tiny, cached vector) instead of re-interleaving the nibbles.
        WIDTH: tl.constexpr = BLOCK_K if BITS == 8 else BLOCK_K // 2
        x_row = X + pid_m.to(tl.int64) * stride_xm           # BLOCK_M = 1: the grid has one program per row
        partial = tl.zeros([BLOCK_N, WIDTH], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if BITS == 8:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                q = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
                x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                partial += _int_to_float(q.to(tl.int32) + 128, 128.0) * x[None, :]
            else:
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b_mask = 2 * offs_b < k_hi
                packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0).to(tl.int32)
                scale = tl.load(Scales + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
                zero_scaled = scale * tl.load(Zeros + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
                w_lo = _int_to_float(packed & 0xF, 0.0) * scale - zero_scaled
                w_hi = _int_to_float((packed >> 4) & 0xF, 0.0) * scale - zero_scaled
                k_of_lo, k_of_hi = _int4_k_of_nibbles(k0, INTERLEAVED, BLOCK_K)
                x_lo = tl.load(x_row + k_of_lo, mask=b_mask, other=0.0).to(tl.float32)
                x_hi = tl.load(x_row + k_of_hi, mask=b_mask, other=0.0).to(tl.float32)
                partial += w_lo * x_lo[None, :] + w_hi * x_hi[None, :]
        acc = tl.sum(partial, axis=1)[:, None]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            if BITS == 4 and INTERLEAVED:
                # Two dots, one per nibble half, against x's matching columns: no register interleave.
                k_of_lo, k_of_hi = _int4_k_of_nibbles(k0, True, BLOCK_K)
                x_lo = tl.load(x_rows + k_of_lo[None, :], mask=m_mask[:, None] & (k_of_lo < k_hi)[None, :], other=0.0)
                x_hi = tl.load(x_rows + k_of_hi[None, :], mask=m_mask[:, None] & (k_of_hi < k_hi)[None, :], other=0.0)
                w_lo, w_hi = _int4_halves(w_rows, Scales, Zeros, offs_n, n_mask, k0, k_hi, stride_sn,
                                          GROUP, BLOCK_N, BLOCK_K)
                acc += tl.dot(w_lo.to(x_lo.dtype), tl.trans(x_lo), input_precision=DOT_PRECISION)
                acc += tl.dot(w_hi.to(x_hi.dtype), tl.trans(x_hi), input_precision=DOT_PRECISION)
            else:
                x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if BITS == 8:
                    q = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
                    w = _int_to_float(q.to(tl.int32) + 128, 128.0).to(x.dtype)
                else:   # masked-off x is zero, so the weights past k_hi need no mask
                    w = _dequantize_int4_tile(w_rows, Scales, Zeros, offs_n, n_mask, k0, k_hi, stride_sn,
                                              GROUP, BLOCK_N, BLOCK_K).to(x.dtype)
                acc += tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
    if BITS == 8:
        acc = acc * tl.load(Scales + offs_n, mask=n_mask, other=0.0)[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        tl.store(Out + split * stride_ok + offs_m[None, :] * stride_om + offs_n[:, None], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(Out + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(Out.dtype.element_ty),
                 mask=out_mask)


@triton.jit
def _sum_splits_kernel(Partial, Bias, Out, total, N, splits, stride_pk, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # Out[m, n] = sum over splits of Partial[s, m, n] (+ bias[n]), in the output dtype: one launch.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(Partial + s * stride_pk + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(W, Scales, Zeros, Out, N, K, stride_wn, stride_sn,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INTERLEAVED: tl.constexpr = False):
    # Out [N, K] (x's dtype) = the dequantized weights; BLOCK_K divides GROUP for int4.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    if BITS == 8:
        w = tl.load(w_rows + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        w = w * tl.load(Scales + offs_n, mask=n_mask, other=0.0)[:, None]
    elif INTERLEAVED:   # each nibble half is stored at its own k: no interleave in registers
        w_lo, w_hi = _int4_halves(w_rows, Scales, Zeros, offs_n, n_mask, k0, K, stride_sn, GROUP, BLOCK_N, BLOCK_K)
        k_of_lo, k_of_hi = _int4_k_of_nibbles(k0, True, BLOCK_K)
        out_rows = Out + offs_n[:, None].to(tl.int64) * K
        tl.store(out_rows + k_of_lo[None, :], w_lo.to(Out.dtype.element_ty), mask=n_mask[:, None] & (k_of_lo < K)[None, :])
        tl.store(out_rows + k_of_hi[None, :], w_hi.to(Out.dtype.element_ty), mask=n_mask[:, None] & (k_of_hi < K)[None, :])
    else:
        w = _dequantize_int4_tile(w_rows, Scales, Zeros, offs_n, n_mask, k0, K, stride_sn, GROUP, BLOCK_N, BLOCK_K)
    if BITS == 8 or not INTERLEAVED:
        tl.store(Out + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(Out.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 2          # split K until the grid has about waves x (SM count) programs
    # Instead of the fused kernel: dequantize the weights to x's dtype in one pass, then torch's
    # matmul (cuBLAS). Costs a weight-sized temporary and 2-2.5x the weight-only bytes, but at prefill
    # sizes the tensor cores run at full speed; the tuner times it against the fused tiles for M > 16.
    dequantize_first: bool = False


def _default_config(m: int, bits: int, group: int) -> TileConfig | GemvConfig:
    if _INTERPRET:
        if m == 1:
            return GemvConfig(16, min(group, 32) if bits == 4 else 32)
        return TileConfig(16 if m <= 16 else 32, 32, min(group, 32) if bits == 4 else 32)
    block_k = min(group, 128) if bits == 4 else 128
    if m == 1:
        return GemvConfig(64, min(group, 128), 8) if bits == 4 else GemvConfig(64, 128, 8)
    if bits == 8 and m > 16:
        return TileConfig(*INT8_TILES_LARGE_M[0])     # 64x64x64 int8 tiles spill on sm_90
    return TileConfig(16 if m <= 16 else 64, 64, min(block_k, 64) if m > 16 else block_k)


def _candidates(m: int, bits: int, group: int) -> list[TileConfig | GemvConfig]:
    """The tile shapes the GPU tuner times for one M range. At small M the weights are the traffic and
    the question is how many bytes are in flight: bigger tiles, and more programs (`waves`) through
    more K splits."""
    ks = [k for k in (64, 128, 256) if bits == 8 or k <= group][-2:]

    warps = tile_warps
    if m == 1:     # the GEMV first; the tiles it replaces stay candidates, so tuning never picks worse
        # Warps so that each thread holds at most 16 weight bytes per tile (32 int4 codes or 16 int8 weights):
        # more spilled on sm_90 (compile_report.py, weight_only family).
        gemv_ks = [bk for bk in (64, 128, 256) if bk <= group][-2:] if bits == 4 else [128, 256]
        per_warp = 1024 if bits == 4 else 512
        gemvs = [GemvConfig(bn, bk, max(4, bn * bk // per_warp), waves=wv)
                 for bn in (16, 32, 64) for bk in gemv_ks for wv in (2, 8) if bn * bk // per_warp <= 8]
    if m <= 16:
        shapes = [(1, bn, bk) for bn in (32, 64, 128) for bk in ks] if m == 1 else []
        if bits == 8:
            shapes += INT8_TILES_SMALL_M
        else:
            shapes += [(16, bn, bk) for bn in ((64, 128) if m == 1 else (32, 64, 128)) for bk in ks]
        tiles = [TileConfig(bm, bn, bk, warps(bm, bn, bk), waves=wv) for bm, bn, bk in shapes for wv in (2, 8)]
        return (gemvs if m == 1 else []) + tiles
    if bits == 8:
        shapes = INT8_TILES_LARGE_M[:2] if m <= 64 else INT8_TILES_LARGE_M[1:]
        return [TileConfig(bm, bn, b, warps(bm, bn, b), waves=1 if m > 64 else 2) for bm, bn, b in shapes] + \
            [_DEQUANTIZE_FIRST]
    bk = min(128, ks[-1])
    sizes = (32, 64) if m <= 64 else (64, 128)
    return [TileConfig(bm, bn, b, warps(bm, bn, b), waves=1 if m > 64 else 2)
            for bm in sizes for bn in (64, 128) for b in sorted({64, bk})] + [_DEQUANTIZE_FIRST]


# int8 tensor-core tiles that compile for sm_90 without spilling (compile report, weight_only family;
# with `warps` below). Larger int8 tiles spilled 12-3832 bytes: 16x64x256, 16x128x*, 32x64x128,
# 32x128x*, 64x64x*, 64x128x128, 128x64x128, 128x128x*.
INT8_TILES_SMALL_M = [(16, 32, 128), (16, 32, 256), (16, 64, 128)]
INT8_TILES_LARGE_M = [(32, 64, 64), (64, 128, 64), (128, 64, 64)]


def tile_warps(bm: int, bn: int, bk: int) -> int:
    return 8 if bm * bn >= 8192 or bn * bk >= 16384 else 4


_DEQUANTIZE_FIRST = TileConfig(0, 64, 64, dequantize_first=True)
_TUNED: dict[tuple, TileConfig] = {}


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else triton.next_power_of_2(m)


def _pick_config(x2, w, scales, zeros, bias, *, n, k, bits, group, layout) -> TileConfig | GemvConfig:
    """A per-shape tile config: timed once per (M bucket, N, K, format) on a GPU (CUDA-graph replays,
    so launch overhead does not decide, over weight copies that outgrow L2), the fixed default under the interpreter, with
    INFERFORGE_AUTOTUNE=0, or while a CUDA graph is being captured."""
    m = x2.shape[0]
    default = _default_config(m, bits, group)
    if _INTERPRET or not x2.is_cuda or os.environ.get("INFERFORGE_AUTOTUNE") == "0" \
            or torch.cuda.is_current_stream_capturing():
        return default
    key = (_m_bucket(m), n, k, bits, group, x2.dtype, x2.device.index, layout)
    if key not in _TUNED:
        from triton.testing import do_bench_cudagraph

        weights = _weights_beyond_l2(w, x2.device)
        timed = []
        for cfg in _candidates(m, bits, group):
            turn = iter(range(1 << 62))

            def fn(cfg=cfg, turn=turn):
                # Each replay reads another copy, as a model's layers do: no timing from a warm L2.
                return _run(x2, weights[next(turn) % len(weights)], scales, zeros, bias, n=n, k=k, bits=bits,
                            group=group, cfg=cfg, split_k=None, layout=layout)
            try:
                timed.append((do_bench_cudagraph(fn, rep=10), cfg))
            except Exception:  # noqa: BLE001 - a config that does not compile or fit is skipped
                continue
        del weights
        _TUNED[key] = min(timed, key=lambda t: t[0])[1] if timed else default
    return _TUNED[key]


def _weights_beyond_l2(w: torch.Tensor, device) -> list[torch.Tensor]:
    """`w` and enough temporary copies that cycling through them reads twice the L2 cache (a few
    tens of MB at most, freed after tuning); just `w` if memory is short."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    copies = max(1, min(16, -(-2 * l2 // max(w.numel() * w.element_size(), 1))))
    try:
        return [w] + [w.clone() for _ in range(copies - 1)]
    except torch.OutOfMemoryError:
        return [w]


def _split_k(m: int, n: int, k: int, cfg: TileConfig, device) -> int:
    """Enough programs to fill the GPU `waves` times over, each with at least 2 K-blocks of work."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    return max(1, min(triton.cdiv(cfg.waves * sms, tiles), k // (2 * cfg.block_k), 32))


def dequantize(w, scales, zeros, *, bits: int, group: int, dtype: torch.dtype, k: int,
               layout: str = int4_layout.KPAIRS) -> torch.Tensor:
    """The weights as a dense `[N, K]` tensor of `dtype`, in one Triton pass (the reference elsewhere);
    `layout` is the int4 packing (int4_layout.py)."""
    n = w.shape[0]
    if not (w.is_cuda or _INTERPRET):
        from inferforge.kernels.reference import dequantize_weight_only_reference

        reference_fallback("dequantize")
        return dequantize_weight_only_reference(w, scales, zeros, bits=bits, group_size=group, layout=layout).to(dtype)
    out = new_output((n, k), dtype, w.device)
    block_n = 32 if _INTERPRET else 64
    block_k = min(group, 32 if _INTERPRET else 128) if bits == 4 else (32 if _INTERPRET else 128)
    if n and k:
        _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            w, scales, zeros if zeros is not None else scales, out, n, k, w.stride(0), scales.stride(0),
            BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, INTERLEAVED=layout == int4_layout.INTERLEAVED,
            num_warps=8)   # 4 spills on sm_90 with the interleaved stores
    return out


def _run(x2, w, scales, zeros, bias, *, n, k, bits, group, cfg: TileConfig | GemvConfig, split_k,
         layout=int4_layout.KPAIRS):
    m = x2.shape[0]
    interleaved = bits == 4 and layout == int4_layout.INTERLEAVED
    if isinstance(cfg, GemvConfig):
        return gemv(x2, w, scales, zeros, bias, n=n, k=k, bits=bits, group=group, interleaved=interleaved, cfg=cfg,
                    splits=split_k)
    if cfg.dequantize_first:
        dense = dequantize(w, scales, zeros, bits=bits, group=group, dtype=x2.dtype, k=k, layout=layout)
        return torch.nn.functional.linear(x2, dense, bias)
    splits = split_k or _split_k(m, n, k, cfg, x2.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    out = new_output((m, n), x2.dtype, x2.device)
    if m == 0:
        return out
    dest = new_output((splits, m, n), torch.float32, x2.device) if splits > 1 else out
    _weight_only_kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)](
        x2, w, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, dest, m, n, k,
        x2.stride(0), w.stride(0), scales.stride(0), dest.stride(0) if splits > 1 else 0, n, k_per_split,
        BITS=bits, GROUP=group, DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        HAS_BIAS=bias is not None, SPLIT=splits > 1, INTERLEAVED=interleaved,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            dest, bias if bias is not None else scales, out, m * n, n, splits, dest.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def _launch(x, w, scales, zeros, bias, *, n, k, bits, group, split_k, layout=int4_layout.KPAIRS):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    if not (x.is_cuda or _INTERPRET):
        from inferforge.kernels.reference import weight_only_matmul_reference

        reference_fallback(f"w{bits}a16_matmul")
        return weight_only_matmul_reference(x, w, scales, zeros, bias, bits=bits, group_size=group, layout=layout)
    if bias is not None:
        bias = bias.contiguous()
    cfg = _pick_config(x2, w, scales, zeros, bias, n=n, k=k, bits=bits, group=group, layout=layout)
    return _run(x2, w, scales, zeros, bias, n=n, k=k, bits=bits, group=group, cfg=cfg, split_k=split_k,
                layout=layout).reshape(*lead, n)


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


def w4a16_matmul(x, packed, scales, zeros, bias=None, *, group_size=128, split_k=None, layout=int4_layout.KPAIRS):
    """x `[..., K]` times int4 weights packed two per byte, `packed` uint8 `[N, K // 2]` in `layout`
    (`int4-kpairs-v0` or `int4-interleaved-v1`, see int4_layout.py), with float32 `scales` and
    `zeros` `[N, K // group_size]` (w = (q - zero) * scale, q in 0..15). Returns `[..., N]` in x's dtype."""
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
    int4_layout.check_layout(layout, k=k, group=group_size)
    return _launch(x, packed, scales, zeros, bias, n=n, k=k, bits=4, group=group_size, split_k=split_k, layout=layout)
