"""The weight-only kernels' shipped configurations, for the sm_90 compile report (compile_report.py).

Covers, with bf16 activations: the M = 1 GEMV (defaults and the tuner's candidates, single-pass and
the atomic split path, both int4 layouts), the split-K tiles for M = 2-16 (BLOCK_M = 16), the tensor-
core tiles for M > 16 and the dequantize pass of dequantize-then-cuBLAS. Only BLOCK_M >= 64 tiles are
expected to use wgmma; the GEMV runs on the FMA units by design.
"""

from __future__ import annotations

from inferforge.kernels.compile_report import KernelSpec

_GROUP = 128          # the shipped int4 group size (Llama-3 shapes: K = 4096, 14336)


def _gemv_spec(bits, layout_interleaved, block_n, block_k, splits, num_warps):
    from inferforge.kernels.weight_only_gemv import _gemv_kernel

    signature = {"X": "*bf16", "W": "*i8" if bits == 8 else "*u8", "Scales": "*fp32", "Zeros": "*fp32",
                 "Bias": "*bf16", "Out": "*bf16", "Partial": "*fp32", "Counters": "*i32",
                 "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "k_per_split": "i32"}
    constexprs = {"BITS": bits, "GROUP": _GROUP if bits == 4 else 4096, "INTERLEAVED": layout_interleaved,
                  "HAS_BIAS": False, "SPLITS": splits, "BLOCK_N": block_n, "BLOCK_K": block_k}
    signature.update({name: "constexpr" for name in constexprs})
    layout = ("interleaved" if layout_interleaved else "kpairs") if bits == 4 else "int8"
    label = f"gemv w{bits} {layout} {block_n}x{block_k} splits{splits}"
    return KernelSpec("weight_only", label, _gemv_kernel, signature, constexprs, num_warps=num_warps)


def _tile_spec(bits, block_m, block_n, block_k, split, num_warps, interleaved=True):
    from inferforge.kernels.weight_only_matmul import _weight_only_kernel

    signature = {"X": "*bf16", "W": "*i8" if bits == 8 else "*u8", "Scales": "*fp32", "Zeros": "*fp32",
                 "Bias": "*bf16", "Out": "*fp32" if split else "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ok": "i32", "stride_om": "i32",
                 "k_per_split": "i32"}
    constexprs = {"BITS": bits, "GROUP": _GROUP if bits == 4 else 4096, "DOT_PRECISION": "tf32", "HAS_BIAS": False,
                  "SPLIT": split, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "INTERLEAVED": bits == 4 and interleaved}
    signature.update({name: "constexpr" for name in constexprs})
    layout = ("interleaved" if interleaved else "kpairs") if bits == 4 else "int8"
    label = f"tile w{bits} {layout} {block_m}x{block_n}x{block_k}{' split' if split else ''}"
    return KernelSpec("weight_only", label, _weight_only_kernel, signature, constexprs, num_warps=num_warps,
                      expect_wgmma=block_m >= 64)


def _dequantize_spec(bits, block_n, block_k):
    from inferforge.kernels.weight_only_matmul import _dequantize_kernel

    signature = {"W": "*i8" if bits == 8 else "*u8", "Scales": "*fp32", "Zeros": "*fp32", "Out": "*bf16",
                 "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sn": "i32"}
    constexprs = {"BITS": bits, "GROUP": _GROUP if bits == 4 else 4096, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "INTERLEAVED": bits == 4}
    signature.update({name: "constexpr" for name in constexprs})
    return KernelSpec("weight_only", f"dequantize w{bits} {block_n}x{block_k}", _dequantize_kernel, signature,
                      constexprs, num_warps=8)


def compile_specs() -> list[KernelSpec]:
    from inferforge.kernels.weight_only_matmul import INT8_TILES_LARGE_M, INT8_TILES_SMALL_M, tile_warps

    specs = []
    # M = 1: the default GEMV (64 x group) and the tuner's widest and narrowest tiles, each combining
    # splits with atomics (splits 4) and without (splits 1); the old k-pairs layout at the default.
    for bits in (4, 8):
        specs += [_gemv_spec(bits, True, 64, 128, splits, 8) for splits in (1, 4)]
        specs += [_gemv_spec(bits, True, 16, 128 if bits == 4 else 256, 4, 4 if bits == 4 else 8)]
    specs.append(_gemv_spec(4, False, 64, 128, 4, 8))
    # M = 2-16: split-K tiles with 16 rows.
    specs += [_tile_spec(4, 16, bn, 128, True, 8 if bn * 128 >= 16384 else 4) for bn in (32, 64, 128)]
    specs += [_tile_spec(4, 16, 64, 128, True, 4, interleaved=False)]
    # int8: every tile the tuner may time (weight_only_matmul.INT8_TILES_*), so none of them may spill.
    specs += [_tile_spec(8, bm, bn, bk, True, tile_warps(bm, bn, bk)) for bm, bn, bk in INT8_TILES_SMALL_M]
    specs += [_tile_spec(8, bm, bn, bk, False, tile_warps(bm, bn, bk)) for bm, bn, bk in INT8_TILES_LARGE_M]
    # M > 16: tensor-core tiles, and the dequantize pass before cuBLAS.
    specs += [_tile_spec(4, 64, 64, 64, False, 4), _tile_spec(4, 64, 128, 128, False, 8)]
    specs += [_dequantize_spec(4, 64, 128), _dequantize_spec(8, 64, 128)]
    return specs
