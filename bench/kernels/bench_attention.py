"""Benchmark flash attention (prefill) against PyTorch: SDPA backends by name and flex_attention.

    python -m inferforge.bench.kernels.bench_attention --quick --out OUT/attention-bf16.md \\
        --dispatch-table OUT/attention_dispatch.json                       # on a GPU
    python -m inferforge.bench.kernels.bench_attention --dry-run           # shapes, providers, no GPU
    python -m inferforge.bench.kernels.bench_attention --smoke             # CPU: code paths only

Shapes (bf16 by default): head_dim 128 non-causal over 16k tokens (the headline TFLOP/s); Llama-style
causal GQA (32 query heads, 8 KV heads, head_dim 128) at 1k..16k tokens per sequence, batch x seq =
16k; a packed variable-length batch; a causal sliding window. Without --quick, the FlashAttention-3
paper grid (hidden 2048, head_dim 64/128/256, seq 512..16k, causal or not) is added.

Providers: `inferforge` is the Triton kernel itself (`dispatch=False`: never the SDPA dispatcher);
`sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient` are PyTorch's SDPA backends on SDPA's own layout
[b, h, s, d]; `flex` is torch.compile'd flex_attention with a block mask (causal, sliding window, or
document ids for varlen). Varlen's SDPA rows run on a zero-padded [batch, max_len] copy (padding not
timed); sliding-window SDPA rows take a boolean [s, s] mask (flash has no mask input).

FLOPs = 4 * head_dim * n_heads * (visible query-key pairs), with causal counted as seq^2 / 2 per
sequence (FlashAttention's convention) and a window counting its exact band. Speed-up = the fastest
other provider's time / the kernel's time, per shape; the GQA sweep's geometric mean is the target.

GPU time of the quick grid, estimated (not yet measured): kernel autotune compiles up to 14 configs
for each of 4 autotune keys (about 3 s each: ~170 s, less with a warm Triton cache), flex compiles per
mask and shape (~15-25 s first, then ~5 s: ~60 s), timing 8 shapes x <= 6 providers with do_bench
(warm-up 25 ms, 100 ms of repetitions: ~20 s); about 4-5 minutes in all.
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
    window: int = -1               # left window (causal sliding window: each query sees window + 1 keys)
    group: str = ""                # "gqa-sweep" shapes make the geometric mean

    def lengths(self) -> tuple[int, ...]:
        return self.varlen or (self.seq,) * self.batch

    def flops(self) -> float:
        pairs = 0
        for s in self.lengths():
            if self.window >= 0:   # row i sees min(i, window) + 1 keys
                w = min(self.window, s - 1)
                pairs += (w + 1) * s - w * (w + 1) // 2
            else:
                pairs += s * s / 2 if self.causal else s * s
        return 4 * self.head_dim * self.n_heads * pairs


def fa3_grid(quick: bool) -> list[Shape]:
    seqs = (512, 2048, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    return [Shape(f"fa3 d{d} s{s}{' causal' if c else ''}", 16384 // s, s, 2048 // d, 2048 // d, d, c)
            for d in (64, 128, 256) for s in seqs for c in (False, True)]


def issue_grid() -> list[Shape]:
    """The shapes behind the published numbers (each is in the quick grid)."""
    shapes = [Shape("d128 s16384 non-causal (16k tokens)", 1, 16384, 16, 16, 128, False, group="headline")]
    shapes += [Shape(f"gqa 32/8 d128 s{s} causal", 16384 // s, s, 32, 8, 128, True, group="gqa-sweep")
               for s in (1024, 2048, 4096, 8192, 16384)]
    lens = (3000, 517, 8192, 1200, 2000, 1475)
    shapes.append(Shape("varlen 6 seqs 16k tokens causal gqa", len(lens), max(lens), 32, 8, 128, True, lens))
    shapes.append(Shape("window 4096 s8192 causal gqa", 2, 8192, 32, 8, 128, True, window=4095))
    return shapes


def smoke_shapes() -> list[Shape]:
    return [Shape("smoke d64 s64", 2, 64, 4, 4, 64, False), Shape("smoke gqa s48 causal", 1, 48, 4, 2, 80, True),
            Shape("smoke varlen causal", 3, 40, 4, 2, 64, True, (40, 7, 23)),
            Shape("smoke window causal", 1, 48, 4, 2, 64, True, window=15)]


def provider_names(shape: Shape, device: str) -> list[str]:
    sdpa = ["sdpa-math"] if device == "cpu" else ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient"]
    if shape.window >= 0 and device != "cpu":
        sdpa.remove("sdpa-flash")          # flash takes no mask
    return ["inferforge", *sdpa] + (["flex"] if device == "cuda" else [])


def make_inputs(shape: Shape, dtype, device):
    """Ours [b, s, h, d] (packed for varlen) and SDPA's [b, h, s, d] (zero-padded for varlen), made separately
    so no provider pays for a transpose or the padding."""
    g = torch.Generator(device=device).manual_seed(0)
    h, hk, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    if shape.varlen:
        total = sum(shape.varlen)
        ours = tuple(torch.randn(total, n, d, dtype=dtype, device=device, generator=g) for n in (h, hk, hk))
        cu = torch.tensor([0, *torch.tensor(shape.varlen).cumsum(0).tolist()], dtype=torch.int32, device=device)
        padded = []
        for x in ours:
            p = x.new_zeros(shape.batch, shape.seq, x.shape[1], d)
            for i, n in enumerate(shape.varlen):
                p[i, :n] = x[cu[i]:cu[i] + n]
            padded.append(p.transpose(1, 2).contiguous())
        doc = torch.repeat_interleave(torch.arange(shape.batch, device=device),
                                      torch.tensor(shape.varlen, device=device))
        return {"ours": ours, "cu": cu, "max": shape.seq, "sdpa": tuple(padded), "doc": doc,
                "packed": tuple(x.transpose(0, 1).unsqueeze(0).contiguous() for x in ours)}
    ours = tuple(torch.randn(shape.batch, shape.seq, n, d, dtype=dtype, device=device, generator=g) for n in (h, hk, hk))
    return {"ours": ours, "sdpa": tuple(x.transpose(1, 2).contiguous() for x in ours)}


def _flex(shape: Shape, inputs, device, gqa):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    if shape.varlen:
        doc = inputs["doc"]
        q, k, v = inputs["packed"]
        mask_mod = lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki)  # noqa: E731
        n = q.shape[2]
    else:
        q, k, v = inputs["sdpa"]
        n = shape.seq
        left = shape.window
        if left >= 0:
            mask_mod = lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= left)  # noqa: E731
        else:
            mask_mod = (lambda b, h, qi, ki: qi >= ki) if shape.causal else None
    mask = create_block_mask(mask_mod, None, None, n, n, device=device) if mask_mod else None
    return lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)


def providers(shape: Shape, inputs, device):
    """name -> zero-argument callable for every provider that runs the shape; plus skip reasons."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from inferforge.kernels import flash_attention

    fns, skipped = {}, {}
    q, k, v = inputs["ours"]
    window = (shape.window, 0) if shape.window >= 0 else (-1, -1)
    if shape.varlen:
        cu, longest = inputs["cu"], inputs["max"]
        fns["inferforge"] = lambda: flash_attention(q, k, v, causal=shape.causal, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                    max_seqlen_q=longest, max_seqlen_k=longest, dispatch=False)
    else:
        fns["inferforge"] = lambda: flash_attention(q, k, v, causal=shape.causal, window=window, dispatch=False)
    sq, sk, sv = inputs["sdpa"]
    gqa = shape.n_heads != shape.n_kv_heads
    mask = None
    if shape.window >= 0:
        i = torch.arange(shape.seq, device=device)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= shape.window)
    backends = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
    repeated = None
    for name in provider_names(shape, device):
        if name.startswith("sdpa"):
            def run(backend=backends[name], kv=(sk, sv), gqa=gqa):
                with sdpa_kernel(backend):
                    return sdpa(sq, *kv, attn_mask=mask, is_causal=shape.causal and mask is None, enable_gqa=gqa)
            try:
                run()
                fns[name] = run
            except RuntimeError as e:   # the backend does not support this shape, dtype or GPU
                skipped[name] = str(e).splitlines()[0][:120]
            if name in skipped and gqa:
                # A backend without enable_gqa still runs GQA on K/V heads repeated beforehand (not timed);
                # the dispatcher never picks such a row (it calls SDPA with enable_gqa).
                group = shape.n_heads // shape.n_kv_heads
                repeated = repeated or (sk.repeat_interleave(group, 1), sv.repeat_interleave(group, 1))
                try:
                    run(kv=repeated, gqa=False)
                    fns[name] = lambda run=run: run(kv=repeated, gqa=False)
                    skipped[name + " (enable_gqa)"] = skipped.pop(name) + "; timed with K/V heads repeated"
                except RuntimeError:
                    pass
        elif name == "flex":
            try:
                fn = _flex(shape, inputs, device, gqa)
                fn()
                fns[name] = fn
            except Exception as e:  # noqa: BLE001 - report any failure as a skip with its reason
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return fns, skipped


def matmul_ceiling_tflops(device, dtype) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=dtype, device=device)
    b = torch.randn(8192, 8192, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, device)[0]
    return 2 * 8192**3 / ms / 1e9


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(shape: Shape, results: dict, skipped: dict) -> dict:
    """One report row: times, TFLOP/s, and the kernel's speed-up over the fastest other provider."""
    for r in results.values():
        r["tflops"] = shape.flops() / r["ms"] / 1e9
    others = {n: r["ms"] for n, r in results.items() if n != "inferforge"}
    best = min(others, key=others.get) if others else None
    ours = results.get("inferforge", {}).get("ms")
    return {"shape": shape.name, "group": shape.group, "results": results, "skipped": skipped,
            "fastest_other": best, "speedup": others[best] / ours if best and ours else None}


def dispatch_rows(shape: Shape, results: dict, env: dict, dtype, skipped=None) -> list[dict]:
    """The dispatch-table row for a dense shape (varlen and window shapes never dispatch to SDPA)."""
    from inferforge.kernels.attention_dispatch import ShapeKey, seqlen_bucket, table_row

    skipped = skipped or {}
    if shape.varlen or shape.window >= 0 or "inferforge" not in results:
        return []
    key = ShapeKey(str(dtype).removeprefix("torch."), shape.head_dim, shape.causal, shape.n_heads,
                   shape.n_kv_heads, seqlen_bucket(shape.seq))
    # only backends that ran as the dispatcher calls them (enable_gqa, not repeated K/V heads)
    sdpa = {n.removeprefix("sdpa-"): r["ms"] for n, r in results.items()
            if n in ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient") and f"{n} (enable_gqa)" not in skipped}
    return [table_row(gpu=env["gpu"], torch_version=env["torch"], triton_version=env["triton"], key=key,
                      kernel_ms=results["inferforge"]["ms"], sdpa_ms=sdpa)]


def run(shapes, device, dtype) -> dict:
    env = environment(device)
    ceiling = matmul_ceiling_tflops(device, dtype)
    rows, table = [], []
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        fns, skipped = providers(shape, inputs, device)
        results = {}
        for name, fn in fns.items():
            ms, p20, p80 = time_ms(fn, device)
            results[name] = {"ms": ms, "p20_ms": p20, "p80_ms": p80}
        rows.append(summarize(shape, results, skipped))
        table += dispatch_rows(shape, results, env, dtype, skipped) if device == "cuda" else []
        print(f"{shape.name:<40} " + "  ".join(f"{n} {r['ms']:.3f} ms" for n, r in results.items()), file=sys.stderr)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"environment": env, "dtype": str(dtype).removeprefix("torch."), "matmul_ceiling_tflops": ceiling,
            "geomean_speedup_gqa_sweep": geomean(r["speedup"] for r in rows if r["group"] == "gqa-sweep"),
            "geomean_speedup_all": geomean(r["speedup"] for r in rows), "rows": rows, "dispatch_rows": table}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    names = []
    for row in report["rows"]:
        names += [n for n in row["results"] if n not in names]
    gpu = env["device"] == "cuda"
    unit = "TFLOP/s" if gpu else "GFLOP/s (CPU smoke run in Triton's interpreter: not a performance number)"
    scale = 1 if gpu else 1000
    ceiling = report["matmul_ceiling_tflops"]
    lines = [f"# Flash attention forward, {report['dtype']}, {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             f"Dense {report['dtype']} matmul ceiling measured in this run: {ceiling:.0f} TFLOP/s." if ceiling else "",
             "", f"Values in {unit}: 4 * head_dim * heads * visible (query, key) pairs / time, causal = seq^2/2. "
             "Speed-up: the fastest other provider's time over the kernel's.", "",
             "| shape | " + " | ".join(names) + " | fastest other | speed-up |", "|---|" + "---|" * (len(names) + 2)]
    for row in report["rows"]:
        cells = [f"{row['results'][n]['tflops'] * scale:.3g}" if n in row["results"] else "-" for n in names]
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {row['fastest_other'] or '-'} | {speedup} |")
    for key, what in (("geomean_speedup_gqa_sweep", "causal GQA sweep"), ("geomean_speedup_all", "all shapes")):
        if report.get(key):
            lines += ["", f"Geometric mean of the speed-up, {what}: **{report[key]:.2f}x**."]
    skips = [f"- {row['shape']}: {n}: {why}" for row in report["rows"] for n, why in row["skipped"].items()]
    if skips:
        lines += ["", "Skipped or run differently:", *skips]
    return "\n".join(lines) + "\n"


def dry_run(shapes, device) -> str:
    lines = [f"{len(shapes)} shapes on {device}:"]
    for s in shapes:
        lines.append(f"  {s.name:<40} b{s.batch} s{s.seq} h{s.n_heads}/{s.n_kv_heads} d{s.head_dim} "
                     f"{s.flops() / 1e12:.2f} TFLOP: {', '.join(provider_names(s, device))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the Markdown table here (and the JSON next to it)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="only the shapes behind the published numbers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--dry-run", action="store_true", help="list shapes and providers; time nothing")
    parser.add_argument("--dispatch-table", help="write the per-shape kernel vs SDPA table (JSON) here")
    args = parser.parse_args(argv)
    shapes = smoke_shapes() if args.smoke else issue_grid() + ([] if args.quick else fa3_grid(False))
    device = "cpu" if args.smoke else "cuda"
    if args.dry_run:
        print(dry_run(shapes, device))
        return 0
    if args.smoke:
        dtype = torch.float16 if args.dtype == "float16" else torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to exercise the harness on the CPU")
        dtype = getattr(torch, args.dtype)
    report = run(shapes, device, dtype)
    write_report(args.out, to_markdown(report), report)
    if args.dispatch_table:
        from inferforge.fileio import atomic_write_json
        from inferforge.kernels.attention_dispatch import table_document

        env = report["environment"]
        atomic_write_json(args.dispatch_table, table_document(
            report["dispatch_rows"], f"measured by bench_attention on {env['gpu']}, git {env['git_revision']}, "
                                     f"{env['date']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
