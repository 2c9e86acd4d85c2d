"""Every shipped configuration of the prefill attention kernel, as compile-report specs.

`compile_specs()` is the "attention" provider of `inferforge.kernels.compile_report`: it lists what
`flash_attention` can launch on a Hopper GPU (sm_90) — each autotune config that `_prune` keeps,
crossed with the kernel's variants — and derives each signature from a representative launch through
Triton's own binder (`launch_signature`), so argument types, the constant-1 strides and the 16-byte
alignment hints are those of a real call.

Variants (the autotune key): dtype (bf16, fp16; fp32 runs the ieee path, not tensor cores), head_dim
(64, 128, 256), causal, sliding window, GQA group (1, 4), varlen, paged KV, and tensor descriptors
(TMA, used on sm_90 whenever the layout is 16-byte aligned; the pointer path otherwise and for paged KV).
Which set `compile_specs` returns: INFERFORGE_COMPILE_REPORT_SET=quick|default|full (see there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from inferforge.kernels.compile_report import KernelSpec, launch_signature


@dataclass(frozen=True)
class Variant:
    dtype: torch.dtype = torch.bfloat16
    head_dim: int = 128
    causal: bool = True
    window: bool = False
    gqa_group: int = 4
    varlen: bool = False
    paged: bool = False
    tma: bool = True

    def label(self) -> str:
        parts = [str(self.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp"),
                 f"d{self.head_dim}", "causal" if self.causal else "full"]
        parts += ["window"] * self.window + [f"gqa{self.gqa_group}"] + ["varlen"] * self.varlen
        parts += ["paged"] * self.paged + ["tma" if self.tma else "ptr"]
        return " ".join(parts)


MAIN = Variant()
VARIANTS = [
    MAIN,
    Variant(causal=False),                                   # the FA3 grid's non-causal d128 shape
    Variant(causal=False, gqa_group=1),
    Variant(head_dim=64, causal=False, gqa_group=1),
    Variant(head_dim=64),
    Variant(head_dim=256, causal=False, gqa_group=1),
    Variant(dtype=torch.float16),
    Variant(dtype=torch.float16, head_dim=64, causal=False, gqa_group=1),
    Variant(window=True),                                    # sliding window (Mistral-style, causal)
    Variant(varlen=True),                                    # packed variable-length batch
    Variant(varlen=True, window=True),
    Variant(varlen=True, paged=True, tma=False),             # chunked prefill over a paged KV cache
    Variant(tma=False),                                      # unaligned layouts take the pointer path
    Variant(causal=False, tma=False),
    Variant(dtype=torch.float32, tma=False),                 # fp32: ieee dot, no tensor cores
    Variant(dtype=torch.float32, head_dim=256, causal=False, gqa_group=1, tma=False),
]


def launch_args(v: Variant, *, block_m: int, block_n: int) -> dict:
    """The arguments `attention_triton` passes for a Llama-like batch (2 x 4096 tokens, 32 query heads,
    32 // gqa_group KV heads), with tiny CPU tensors standing in for the device ones."""
    from inferforge.kernels.attention import _UNBOUNDED

    n_heads, d, seq, batch, page = 32, v.head_dim, 4096, 2, 16
    n_kv = n_heads // v.gqa_group
    tensor = lambda dtype: torch.empty(64, dtype=dtype)   # noqa: E731 - only dtype and alignment matter
    total = batch * seq
    if v.varlen:
        qs, os_ = (0, n_heads * d, d), (0, n_heads * d, d)
        ks = (page * n_kv * d, n_kv * d, d) if v.paged else (0, n_kv * d, d)
        ls = (0, total, 1)                                    # Lse [n_heads, total_q]
    else:
        qs = os_ = (seq * n_heads * d, n_heads * d, d)
        ks = (seq * n_kv * d, n_kv * d, d)
        ls = (n_heads * seq, seq, 1)                          # Lse [batch, n_heads, seq_q]
    window = 4096 if v.window else _UNBOUNDED
    names = ("b", "s", "h")
    args = {"Q": tensor(v.dtype), "K": tensor(v.dtype), "V": tensor(v.dtype), "Out": tensor(v.dtype),
            "Lse": tensor(torch.float32),
            "CuSeqlensQ": tensor(torch.int32) if v.varlen else None,
            "CuSeqlensK": tensor(torch.int32) if v.varlen else None,
            "BlockTable": tensor(torch.int32) if v.paged else None}
    for prefix, strides in (("q", qs), ("k", ks), ("v", ks), ("o", os_)):
        args.update({f"stride_{prefix}{n}": st for n, st in zip(names, strides)})
    args.update(stride_lb=ls[0], stride_lh=ls[1], stride_ls=ls[2])
    args.update(stride_btb=seq // page if v.paged else 0, page_size=page if v.paged else 1, seqlen_q=seq,
                seqlen_k=seq, n_heads=n_heads, qk_scale=1.4426950408889634 / d**0.5, window_left=window,
                window_right=0 if v.window else _UNBOUNDED, seqlen_bucket=seq,
                HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), GQA_GROUP=v.gqa_group,
                IS_CAUSAL=v.causal, HAS_WINDOW=v.window, IS_VARLEN=v.varlen, RETURN_LSE=True,
                DOT_PRECISION="ieee" if v.dtype == torch.float32 else "tf32", USE_TMA=v.tma, PAGED=v.paged,
                BLOCK_M=block_m, BLOCK_N=block_n)
    return args


def shipped_configs(v: Variant) -> list:
    """The autotune configs `_prune` keeps for this variant (the list the GPU run times)."""
    from inferforge.kernels import attention

    d = max(16, 1 << (v.head_dim - 1).bit_length())
    precision = "ieee" if v.dtype == torch.float32 else "tf32"
    return attention._prune(attention._configs(), {"BLOCK_D": d}, BLOCK_D=d, DOT_PRECISION=precision)


def spec(v: Variant, config) -> KernelSpec:
    from inferforge.kernels.attention import _attention_fwd_kernel

    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    signature, constexprs, attrs = launch_signature(_attention_fwd_kernel, launch_args(v, block_m=bm, block_n=bn))
    # Every fp16/bf16 config (4 or 8 warps, 64- or 128-row tiles) compiles to wgmma on sm_90; fp32 inputs
    # run the ieee dot (no tensor cores) on purpose.
    expect = v.dtype != torch.float32
    return KernelSpec("attention", f"{v.label()} {bm}x{bn}", _attention_fwd_kernel, signature, constexprs,
                      num_warps=config.num_warps, num_stages=config.num_stages, expect_wgmma=expect, attrs=attrs)


QUICK = [MAIN, Variant(head_dim=64, causal=False, gqa_group=1), Variant(varlen=True, paged=True, tma=False)]


def compile_specs(level: str | None = None) -> list[KernelSpec]:
    """The configurations to compile, by `level` (default: INFERFORGE_COMPILE_REPORT_SET, else "default"):
    "quick": the main variant's smallest and largest tile, plus d64 and paged KV (4 compiles, the
    test suite's quick guard); "default": every config of the main variant (bf16 d128 causal GQA, TMA)
    and the first kept config of every other variant; "full": every config of every variant."""
    level = level or os.environ.get("INFERFORGE_COMPILE_REPORT_SET", "default")
    if level not in ("quick", "default", "full"):
        raise ValueError(f"compile report set {level!r}: choose quick, default or full")
    specs = []
    for v in QUICK if level == "quick" else VARIANTS:
        configs = shipped_configs(v)
        if level == "quick":
            configs = [configs[0], configs[-1]] if v == MAIN else configs[:1]
        elif level == "default" and v != MAIN:
            configs = configs[:1]
        specs += [spec(v, config) for config in configs]
    return specs
