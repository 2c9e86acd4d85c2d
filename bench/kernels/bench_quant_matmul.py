"""Benchmark quantized matmuls against torch's bf16 matmul, with the roofline prediction beside each.

    python -m inferforge.bench.kernels.bench_quant_matmul --out bench/results/quant-matmul.md   # GPU
    python -m inferforge.bench.kernels.bench_quant_matmul --smoke                               # CPU paths only

Shapes: Llama-3-8B's linear layers (N x K: 4096x4096, 1024x4096, 14336x4096, 4096x14336). Weight-only
formats (w8a16, w4a16 g128 in the GPU layout `int4-interleaved-v1`) at decode sizes M = 1, 2, 4, 8, 16
(M = 1: the GEMV; 2-16: split-K tiles) and at M = 64, 256 (the tuner's choice, dequantize + cuBLAS
included); W8A8 (int8 x int8) and FP8 at M = 256 to 4096. The `tuned tile` column names the path.
Reported: time, speed-up over bf16 measured in the same run, TFLOP/s, GB/s of the bytes the format
must move, and the `explain` roofline prediction (inferforge/optimize/explain.py).
"""

from __future__ import annotations

import argparse
import sys

import torch

from inferforge.bench.kernels.common import environment, time_ms, write_report
from inferforge.optimize.explain import GPUS, predict

LLAMA3_8B = [("q/o_proj", 4096, 4096), ("k/v_proj", 1024, 4096), ("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]


L2_FLUSH_BYTES = 256 * 2**20     # rotate weight copies so each replay reads at least this much: no L2 hits


def _rotating(make, nbytes: int, device):
    """`make()` several times, enough copies to outgrow the GPU's L2 cache, returned as a cycle picker."""
    copies = max(1, min(64, -(-L2_FLUSH_BYTES // max(nbytes, 1)))) if device == "cuda" else 1
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % copies
        return items[state["i"]]
    return pick


def providers(fmt: str, m: int, n: int, k: int, device, dtype):
    """A zero-argument callable computing [m, k] x [n, k]^T in `fmt`, on random (never all-zero) data."""
    from inferforge.kernels import int4_layout, int8_matmul, quantize_rows, w4a16_matmul, w8a16_matmul
    from inferforge.kernels.reference import pack_int4
    from inferforge.optimize.quantize import FP8Linear, quantize_fp8

    x = torch.randn(m, k, dtype=dtype, device=device)
    if fmt == "bf16":
        w = _rotating(lambda: torch.randn(n, k, dtype=dtype, device=device), 2 * n * k, device)
        return lambda: x @ w().T
    if fmt == "int8-weight-only":
        w = _rotating(lambda: (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
                               torch.rand(n, device=device) * 0.01), n * k, device)
        return lambda: w8a16_matmul(x, *w())
    if fmt == "int4-g128":
        layout = int4_layout.kernel_layout(device, 128, k)       # what quantizing on this device stores
        w = _rotating(lambda: (pack_int4(torch.randint(0, 16, (n, k), device=device), layout),
                               torch.rand(n, k // 128, device=device) * 0.01,
                               torch.full((n, k // 128), 8.0, device=device)), n * k // 2, device)
        return lambda: w4a16_matmul(x, *w(), group_size=128, layout=layout)
    if fmt == "w8a8":
        # What W8A8Linear runs: fused per-token quantization of the activations, then int8 x int8.
        w = _rotating(lambda: (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
                               torch.rand(n, device=device) * 0.01), n * k, device)

        def run():
            wq, ws = w()
            xq, xs = quantize_rows(x, torch.int8)
            return int8_matmul(xq, wq, xs, ws, out_dtype=dtype)
        return run
    if fmt == "fp8":
        layers = _rotating(lambda: FP8Linear(*quantize_fp8(torch.randn(n, k, device=device), "tensor"), None, "tensor"),
                           n * k, device)
        return lambda: layers()(x)
    raise ValueError(fmt)


def ceilings(device) -> dict:
    """The card's achievable rates, measured in this run: device-to-device copy bandwidth (bytes read +
    written) and large-matmul rates for bf16 (cuBLAS), int8 (torch._int_mm) and fp8 (torch._scaled_mm)."""
    if device != "cuda":
        return {}
    src = torch.randn(2**28, device=device)                       # 1 GiB
    dst = torch.empty_like(src)
    out = {"copy_gbs": 2 * src.numel() * 4 / time_ms(lambda: dst.copy_(src), device)[0] / 1e6}
    s = 8192
    a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    out["bf16_tflops"] = 2 * s**3 / time_ms(lambda: a @ b, device)[0] / 1e9
    ai = torch.randint(-127, 128, (s, s), dtype=torch.int8, device=device)
    bi = torch.randint(-127, 128, (s, s), dtype=torch.int8, device=device)
    out["int8_tops"] = 2 * s**3 / time_ms(lambda: torch._int_mm(ai, bi.T.contiguous().T), device)[0] / 1e9
    try:
        af, bf = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T.contiguous().T
        one = torch.ones((), device=device)
        out["fp8_tflops"] = 2 * s**3 / time_ms(lambda: torch._scaled_mm(af, bf, scale_a=one, scale_b=one,
                                                                      out_dtype=torch.bfloat16), device)[0] / 1e9
    except (RuntimeError, AttributeError) as exc:    # older GPUs: no fp8 matmul
        out["fp8_error"] = str(exc).splitlines()[0]
    return out


def _tuned_tile(fmt: str, m: int, n: int, k: int) -> str | None:
    """The weight-only tile the GPU tuner chose for this case, for the report."""
    from inferforge.kernels.weight_only_matmul import _TUNED, _m_bucket

    bits = {"int8-weight-only": 8, "int4-g128": 4}.get(fmt)
    hits = [cfg for key, cfg in _TUNED.items() if key[:5] == (_m_bucket(m), n, k, bits, k if bits == 8 else 128)]
    if not hits:
        return None
    return describe_config(hits[0])


def describe_config(c) -> str:
    """A tuner choice as a table cell: `gemv 64x128 w8 waves4`, `16x64x128 w4 waves2`, `dequantize + cuBLAS`."""
    if c.dequantize_first:
        return "dequantize + cuBLAS"
    if type(c).__name__ == "GemvConfig":
        return f"gemv {c.block_n}x{c.block_k} w{c.num_warps} waves{c.waves}"
    return f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} waves{c.waves}"


def run(cases, device, dtype, gpu_key):
    rows = []
    spec = GPUS.get(gpu_key)
    for fmt, m, (label, n, k) in cases:
        # CUDA-graph replays: the kernels' time, not Python's launch overhead (decode runs under graphs).
        base = time_ms(providers("bf16", m, n, k, device, dtype), device, graph=True)[0]
        ms = time_ms(providers(fmt, m, n, k, device, dtype), device, graph=True)[0]
        pred = predict(n, k, m, fmt, spec)["time_s"] if spec else None
        pred_base = predict(n, k, m, "bf16", spec)["time_s"] if spec else None
        moved = predict(n, k, m, fmt, GPUS["h100"])["bytes"]
        tuned = _tuned_tile(fmt, m, n, k)
        rows.append({"format": fmt, "m": m, "layer": label, "n": n, "k": k, "ms": ms, "bf16_ms": base, "tile": tuned,
                     "speedup": base / ms, "tflops": 2 * m * n * k / ms / 1e9, "gbs": moved / ms / 1e6,
                     "predicted_speedup": pred_base / pred if spec else None})
        print(f"{fmt} M={m} {label}: {base / ms:.2f}x bf16 (tile {tuned})", file=sys.stderr, flush=True)
    return rows


TARGETS = {("int4-g128", 1): 3.0, ("int8-weight-only", 1): 1.8}   # the H100 targets at M = 1


def verdicts(rows) -> list[str]:
    """One line per target, and every case where the prediction says the format pays but it ran slower."""
    lines = []
    for (fmt, m), target in TARGETS.items():
        got = [r["speedup"] for r in rows if r["format"] == fmt and r["m"] == m]
        if got:
            lines.append(f"- {fmt} at M={m}: {min(got):.2f}x to {max(got):.2f}x over bf16 (target {target}x): "
                         f"{'met' if min(got) >= target else 'MISSED'}")
    slower = [r for r in rows if (r["predicted_speedup"] or 0) > 1.05 and r["speedup"] < 1.0]
    lines.append(f"- slower than bf16 where the roofline says the format pays: {len(slower)} case(s)"
                 + "".join(f"\n  - {r['format']} M={r['m']} {r['layer']}: {r['speedup']:.2f}x "
                           f"(predicted {r['predicted_speedup']:.2f}x)" for r in slower))
    return lines


def to_markdown(report) -> str:
    env = report["environment"]
    ceil = report.get("ceilings") or {}
    lines = [f"# Quantized matmuls vs bf16, {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             "" if env["device"] == "cuda" else "CPU smoke run (Triton interpreter): not performance numbers.", ""]
    if ceil:
        lines += ["Ceilings measured in this run: copy " f"{ceil['copy_gbs']:.0f} GB/s, bf16 {ceil['bf16_tflops']:.0f} "
                  f"TFLOP/s, int8 {ceil['int8_tops']:.0f} TOP/s"
                  + (f", fp8 {ceil['fp8_tflops']:.0f} TFLOP/s." if "fp8_tflops" in ceil else "."),
                  "Timed as CUDA-graph replays over rotating weight copies (no L2 hits); `predicted` is "
                  "`inferforge quantize --explain`'s roofline; `% BW` is GB/s over the measured copy bandwidth.", ""]
    lines += ["| format | M | layer (N x K) | ms | bf16 ms | speed-up | predicted | TFLOP/s | GB/s | % BW | tuned tile |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        pred = f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] else "-"
        bw = f"{100 * r['gbs'] / ceil['copy_gbs']:.0f}%" if ceil else "-"
        lines.append(f"| {r['format']} | {r['m']} | {r['layer']} ({r['n']}x{r['k']}) | {r['ms']:.4g} | {r['bf16_ms']:.4g} | "
                     f"{r['speedup']:.2f}x | {pred} | {r['tflops']:.3g} | {r['gbs']:.3g} | {bw} | {r.get('tile') or '-'} |")
    if env["device"] == "cuda":
        lines += ["", *verdicts(report["rows"])]
    return "\n".join(lines) + "\n"


def weight_only_ms(quick: bool) -> tuple[int, ...]:
    """M values for the weight-only formats: decode sizes (GEMV, split-K) and two prefill sizes. The quick
    grid keeps one M per path so that tuning fits gpu_check.sh's time limit."""
    return (1, 4, 16, 64, 256) if quick else (1, 2, 4, 8, 16, 64, 256)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, gpu_key = "cpu", torch.float32, None
        small = ("tiny", 64, 128)
        cases = [(f, m, small) for f, m in (("int8-weight-only", 1), ("int4-g128", 4), ("w8a8", 8), ("fp8", 8))]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to exercise the harness on the CPU")
        device, dtype = "cuda", torch.bfloat16
        name = torch.cuda.get_device_name(0).lower()
        gpu_key = next((key for key in GPUS if key in name), "h100")
        shapes = LLAMA3_8B[::2] if args.quick else LLAMA3_8B
        cases = [(f, m, s) for f in ("int8-weight-only", "int4-g128") for m in weight_only_ms(args.quick)
                 for s in shapes]
        cases += [(f, m, s) for f in ("w8a8", "fp8") for m in ((256, 4096) if args.quick else (256, 1024, 4096))
                  for s in shapes]
    report = {"environment": environment(device), "ceilings": ceilings(device),
              "rows": run(cases, device, dtype, gpu_key)}
    write_report(args.out, to_markdown(report), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
