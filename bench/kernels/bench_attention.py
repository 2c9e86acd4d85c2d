"""Benchmark flash attention (prefill) against PyTorch's SDPA backends and flex_attention.

    python -m inferforge.bench.kernels.bench_attention --out bench/results/attention.md   # on a GPU
    python -m inferforge.bench.kernels.bench_attention --smoke                            # CPU: code paths only

Shapes: the FlashAttention-3 paper grid (batch x seq = 16k tokens, hidden 2048, head_dim 64/128/256,
seq 512 to 16k, causal and not), Llama-style GQA (32 query heads, 8 KV heads, head_dim 128) and a
variable-length batch. TFLOP/s counts 4 * seq_q * seq_k * heads * head_dim per sequence, half of it
when causal. The ceiling is a dense bf16 matmul (8192^3) measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from inferforge.bench.kernels.common import environment, time_ms, write_report


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool
    varlen: tuple[int, ...] = ()   # sequence lengths of a packed batch

    def flops(self) -> float:
        lens = self.varlen or (self.seq,) * self.batch
        per = sum(4 * s * s * self.n_heads * self.head_dim for s in lens)
        return per / 2 if self.causal else per


def fa3_grid(quick: bool) -> list[Shape]:
    seqs = (512, 2048, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    return [Shape(f"fa3 d{d} s{s}{' causal' if c else ''}", 16384 // s, s, 2048 // d, 2048 // d, d, c)
            for d in (64, 128, 256) for s in seqs for c in (False, True)]


def llama_and_varlen(quick: bool) -> list[Shape]:
    shapes = [Shape(f"llama-gqa 32/8 s{s} causal", max(1, 16384 // s), s, 32, 8, 128, True)
              for s in ((4096,) if quick else (2048, 8192))]
    lens = (3000, 517, 8192, 1200, 2000, 1475)
    shapes.append(Shape("varlen 6 seqs, 16k tokens, causal", len(lens), max(lens), 32, 8, 128, True, lens))
    return shapes


def smoke_shapes() -> list[Shape]:
    return [Shape("smoke d64 s64", 2, 64, 4, 4, 64, False), Shape("smoke gqa s48 causal", 1, 48, 4, 2, 80, True),
            Shape("smoke varlen causal", 3, 40, 4, 2, 64, True, (40, 7, 23))]


def make_inputs(shape: Shape, dtype, device):
    """Both layouts, made separately so no provider pays for a transpose: ours [b, s, h, d], SDPA's [b, h, s, d]."""
    g = torch.Generator(device=device).manual_seed(0)
    lens = shape.varlen
    if lens:
        total = sum(lens)
        q = torch.randn(total, shape.n_heads, shape.head_dim, dtype=dtype, device=device, generator=g)
        k = torch.randn(total, shape.n_kv_heads, shape.head_dim, dtype=dtype, device=device, generator=g)
        v = torch.randn_like(k)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return {"ours": (q, k, v), "cu": cu, "max": max(lens)}
    b, s, h, hk, d = shape.batch, shape.seq, shape.n_heads, shape.n_kv_heads, shape.head_dim
    ours = tuple(torch.randn(b, s, n, d, dtype=dtype, device=device, generator=g) for n in (h, hk, hk))
    sdpa = tuple(x.transpose(1, 2).contiguous() for x in ours)
    return {"ours": ours, "sdpa": sdpa}


def providers(shape: Shape, inputs, device):
    """name -> zero-argument callable, for every provider that supports the shape; plus skip reasons."""
    from inferforge.kernels import flash_attention

    fns, skipped = {}, {}
    if shape.varlen:
        q, k, v = inputs["ours"]
        fns["inferforge"] = lambda: flash_attention(q, k, v, causal=shape.causal, cu_seqlens_q=inputs["cu"],
                                                    cu_seqlens_k=inputs["cu"], max_seqlen_q=inputs["max"],
                                                    max_seqlen_k=inputs["max"])
        skipped["sdpa-*"] = "SDPA has no packed variable-length input"
        return fns, skipped
    q, k, v = inputs["ours"]
    fns["inferforge"] = lambda: flash_attention(q, k, v, causal=shape.causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    sq, sk, sv = inputs["sdpa"]
    gqa = shape.n_heads != shape.n_kv_heads
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if device == "cpu":
        backends = {"sdpa-math": SDPBackend.MATH}
    for name, backend in backends.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(sq, sk, sv, is_causal=shape.causal, enable_gqa=gqa)
        try:
            run()
            fns[name] = run
        except RuntimeError as e:   # the backend does not support this shape, dtype or GPU
            skipped[name] = str(e).splitlines()[0][:120]
    if device == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention)
            mask = None
            if shape.causal:
                mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, shape.seq, shape.seq, device=device)
            flex(sq, sk, sv, block_mask=mask, enable_gqa=gqa)
            fns["flex_attention"] = lambda: flex(sq, sk, sv, block_mask=mask, enable_gqa=gqa)
        except Exception as e:  # noqa: BLE001 - report any failure as a skip with its reason
            skipped["flex_attention"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return fns, skipped


def matmul_ceiling_tflops(device, dtype) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=dtype, device=device)
    b = torch.randn(8192, 8192, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, device)[0]
    return 2 * 8192**3 / ms / 1e9


def run(shapes, device, dtype) -> dict:
    ceiling = matmul_ceiling_tflops(device, dtype)
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        fns, skipped = providers(shape, inputs, device)
        results = {}
        for name, fn in fns.items():
            ms, p20, p80 = time_ms(fn, device)
            results[name] = {"ms": ms, "p20_ms": p20, "p80_ms": p80, "tflops": shape.flops() / ms / 1e9}
        sdpa = [r["tflops"] for n, r in results.items() if n.startswith("sdpa")]
        ours = results["inferforge"]["tflops"]
        rows.append({"shape": shape.name, "results": results, "skipped": skipped,
                     "ratio_vs_best_sdpa": ours / max(sdpa) if sdpa else None,
                     "fraction_of_matmul": ours / ceiling if ceiling else None})
        print(f"{shape.name:<36} " + "  ".join(f"{n} {r['tflops']:.1f}" for n, r in results.items()), file=sys.stderr)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    ratios = [r["ratio_vs_best_sdpa"] for r in rows if r["ratio_vs_best_sdpa"]]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    return {"environment": environment(device), "dtype": str(dtype).removeprefix("torch."),
            "matmul_ceiling_tflops": ceiling, "geomean_ratio_vs_best_sdpa": geomean, "rows": rows}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    names = []
    for row in report["rows"]:
        names += [n for n in row["results"] if n not in names]
    gpu = env["device"] == "cuda"
    unit = "TFLOP/s" if gpu else "GFLOP/s (CPU smoke run in Triton's interpreter: not a performance number)"
    scale = 1 if gpu else 1000
    lines = [f"# Flash attention forward, {report['dtype']}, {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             f"Dense {report['dtype']} matmul ceiling measured in this run: "
             f"{report['matmul_ceiling_tflops']:.0f} TFLOP/s." if report["matmul_ceiling_tflops"] else "", "",
             f"Values in {unit}; causal counts half the work. Ratio: inferforge over the fastest SDPA backend.", "",
             "| shape | " + " | ".join(names) + " | ratio vs best SDPA | of matmul peak |",
             "|---|" + "---|" * (len(names) + 2)]
    for row in report["rows"]:
        cells = [f"{row['results'][n]['tflops'] * scale:.3g}" if n in row["results"] else "-" for n in names]
        ratio = f"{row['ratio_vs_best_sdpa']:.2f}x" if row["ratio_vs_best_sdpa"] else "-"
        frac = f"{row['fraction_of_matmul']:.0%}" if row["fraction_of_matmul"] else "-"
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {ratio} | {frac} |")
    if report["geomean_ratio_vs_best_sdpa"]:
        lines += ["", f"Geometric mean of the ratio: **{report['geomean_ratio_vs_best_sdpa']:.2f}x**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the Markdown table here (and the JSON next to it)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, shapes = "cpu", torch.float16 if args.dtype == "float16" else torch.float32, smoke_shapes()
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to exercise the harness on the CPU")
        device, dtype = "cuda", getattr(torch, args.dtype)
        shapes = fa3_grid(args.quick) + llama_and_varlen(args.quick)
    report = run(shapes, device, dtype)
    write_report(args.out, to_markdown(report), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
