"""Dynamic activation quantization in one pass: per-token (per-row) int8 or fp8 e4m3 with a float32 scale.

`quantize_rows(x, dtype=torch.int8)` returns `(q, scale)` with `q = round(x / scale)` clamped to the
format's range and `scale[m] = max(|x[m, :]|) / qmax` (int8: 127, e4m3: 448), the same numbers as
`inferforge.kernels.reference.quantize_rows_reference`. An optional `divisor` `[K]` divides x first
(SmoothQuant's per-input-channel smoothing), and a given `scale` (one float32 for the whole tensor)
replaces the per-row one, and `per_tensor=True` computes one scale for the whole tensor in a second
small kernel (per-row maxima, then every program reduces them: no torch scalar ops between launches).

One program per row reads the row twice (the second read comes from cache): once for the maximum,
once to quantize. torch's version of the same arithmetic takes five to seven kernels, each a full
pass over x in float32, which at M = 4096 costs about as much as the int8 matmul it feeds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from inferforge.kernels._checks import check, check_dtype, check_tensor, new_output, reference_fallback

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INT8_MAX = 127.0
E4M3_MAX = 448.0


@triton.jit
def _round_half_even(v):
    # torch.round's rule, exact for |v| < 2**23 (libdevice's rint is not available in the interpreter).
    f = tl.floor(v)
    diff = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(diff > 0.5, f + 1.0, tl.where(diff < 0.5, f, tl.where(f_is_odd, f + 1.0, f)))


@triton.jit
def _row_absmax(x_row, Divisor, K, HAS_DIVISOR: tl.constexpr, BLOCK_K: tl.constexpr):
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_DIVISOR:
            x = tl.math.div_rn(x, tl.load(Divisor + offs, mask=offs < K, other=1.0))
        amax = tl.maximum(amax, tl.abs(x))
    return tl.max(amax, axis=0)


@triton.jit
def _row_absmax_kernel(X, Divisor, RowMax, K, stride_xm, HAS_DIVISOR: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(RowMax + row, _row_absmax(X + row * stride_xm, Divisor, K, HAS_DIVISOR, BLOCK_K))


@triton.jit
def _quantize_rows_kernel(
    X, Divisor, RowMax, Q, Scale,
    M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, TO_INT8: tl.constexpr, HAS_DIVISOR: tl.constexpr, MODE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # MODE 0: a scale per row. 1: one given scale. 2: per tensor, from the per-row maxima in RowMax
    # (every program reduces them, M floats from L2; program 0 writes the scale).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    if MODE == 1:
        scale = tl.load(Scale)
    elif MODE == 2:
        maxima = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, M, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            maxima = tl.maximum(maxima, tl.load(RowMax + offs_r, mask=offs_r < M, other=0.0))
        scale = tl.maximum(tl.math.div_rn(tl.max(maxima, axis=0), QMAX), 1e-12)
        if row == 0:
            tl.store(Scale, scale)
    else:
        scale = tl.maximum(tl.math.div_rn(_row_absmax(x_row, Divisor, K, HAS_DIVISOR, BLOCK_K), QMAX), 1e-12)
        tl.store(Scale + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_DIVISOR:
            x = tl.math.div_rn(x, tl.load(Divisor + offs, mask=offs < K, other=1.0))
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        if TO_INT8:
            q = _round_half_even(v).to(tl.int8)
        else:
            q = v.to(Q.dtype.element_ty)
        tl.store(Q + row * stride_qm + offs, q, mask=offs < K)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8, *, divisor: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` `[M, K]` (fp16/bf16/fp32) to `dtype` (int8 or float8_e4m3fn).

    Returns `(q [M, K] in dtype, scale)`: float32 `[M]` (a scale per row), or `[1]` with `per_tensor`
    (one scale from the whole tensor's maximum) or when `scale` (one float32) is given. With `divisor`
    `[K]`, quantizes `x / divisor` instead."""
    check_tensor("x", x, dims=2, layout="[M, K]")
    check_dtype("x", x)
    check(dtype in (torch.int8, torch.float8_e4m3fn), f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    check(not (per_tensor and scale is not None), "pass either scale (a static scale) or per_tensor=True, not both")
    m, k = x.shape
    if divisor is not None:
        check(isinstance(divisor, torch.Tensor) and divisor.shape == (k,) and divisor.dtype == torch.float32,
              f"divisor must be float32 [{k}], got {getattr(divisor, 'dtype', None)} {tuple(getattr(divisor, 'shape', ()))}")
        divisor = divisor.contiguous()
    if scale is not None:
        check(isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.dtype == torch.float32,
              "scale must be a one-element float32 tensor (per-tensor quantization)")
    # The interpreter rounds float32 -> fp8 wrongly when rounding carries into the next power of two, so
    # fp8 on the CPU always takes the reference.
    use_kernel = x.is_cuda or (_INTERPRET and dtype == torch.int8)
    if not use_kernel:
        from inferforge.kernels.reference import quantize_rows_reference

        if dtype == torch.int8:   # fp8 on the CPU takes the reference by design (above)
            reference_fallback("quantize_rows")
        return quantize_rows_reference(x, dtype, divisor=divisor, scale=scale, per_tensor=per_tensor)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = new_output((m, k), dtype, x.device)
    if scale is not None:
        out_scale = scale.reshape(1).float()
    else:
        out_scale = new_output((1,) if per_tensor else (m,), torch.float32, x.device)
    block_k = min(triton.next_power_of_2(max(k, 1)), 256 if _INTERPRET else 1024)
    warps = 4 if block_k >= 512 else 2
    row_max = out_scale
    if per_tensor:
        if m == 0:
            out_scale.fill_(1e-12)
            return q, out_scale
        row_max = torch.empty(m, dtype=torch.float32, device=x.device)
        _row_absmax_kernel[(m,)](x, divisor if divisor is not None else out_scale, row_max, k, x.stride(0),
                                 HAS_DIVISOR=divisor is not None, BLOCK_K=block_k, num_warps=warps)
    if m:
        _quantize_rows_kernel[(m,)](
            x, divisor if divisor is not None else out_scale, row_max, q, out_scale, m, k, x.stride(0), q.stride(0),
            QMAX=INT8_MAX if dtype == torch.int8 else E4M3_MAX, TO_INT8=dtype == torch.int8,
            HAS_DIVISOR=divisor is not None, MODE=2 if per_tensor else (1 if scale is not None else 0),
            BLOCK_K=block_k, BLOCK_R=256 if _INTERPRET else 1024, num_warps=warps,
        )
    return q, out_scale
