"""Two deliberately bad kernel configurations for the compile report's own tests (the "guard" family):
one whose tile cannot fit in registers, one whose fp16 dot cannot use Hopper's wgmma.

Imported by the report's subprocess (no TRITON_INTERPRET) through INFERFORGE_COMPILE_PROVIDERS, with
this folder on PYTHONPATH: under pytest the interpreter is on and these kernels cannot be compiled."""

import triton
import triton.language as tl

from inferforge.kernels.compile_report import KernelSpec


@triton.jit
def _tile_matmul(A, B, C, BLOCK: tl.constexpr):   # A, B, C: [BLOCK, BLOCK] row-major
    offs = tl.arange(0, BLOCK)
    idx = offs[:, None] * BLOCK + offs[None, :]
    c = tl.dot(tl.load(A + idx), tl.load(B + idx))
    tl.store(C + idx, c)


@triton.jit
def _tile_normalize(X, Y, BLOCK: tl.constexpr):   # X, Y: [BLOCK, BLOCK] fp32; Y = X / column sums of X
    offs = tl.arange(0, BLOCK)
    idx = offs[:, None] * BLOCK + offs[None, :]
    x = tl.load(X + idx)
    tl.store(Y + idx, x / tl.sum(x, axis=0)[None, :])   # the whole tile stays live across the reduction


def compile_specs() -> list[KernelSpec]:
    signature = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(2)}
    return [
        # A 128x128 fp32 tile live in one warp: 512 values per thread, over the 255-register limit.
        KernelSpec("guard", "spills: 128x128 tile, 1 warp", _tile_normalize, {"X": "*fp32", "Y": "*fp32",
                   "BLOCK": "constexpr"}, {"BLOCK": 128}, num_warps=1, num_stages=1, attrs=attrs),
        # wgmma needs a warpgroup (4 warps): one warp gets Ampere's mma.sync, so expecting wgmma must fail.
        KernelSpec("guard", "no wgmma: 16x16 tile, 1 warp", _tile_matmul, signature, {"BLOCK": 16},
                   num_warps=1, num_stages=1, expect_wgmma=True, attrs=attrs),
    ]
