"""Benchmark quantized matmuls against torch's bf16 matmul, with the roofline prediction beside each.

    python -m inferforge.bench.kernels.bench_quant_matmul --out bench/results/quant-matmul.md   # GPU
    python -m inferforge.bench.kernels.bench_quant_matmul --smoke                               # CPU paths only

Shapes: Llama-3-8B's linear layers (N x K: 4096x4096, 1024x4096, 14336x4096, 4096x14336). Weight-only
formats (w8a16, w4a16 g128) at M = 1, 16, 64, 256; W8A8 (int8 x int8) and FP8 at M = 256 to 4096.
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


def providers(fmt: str, m: int, n: int, k: int, device, dtype):
    from inferforge.kernels import int8_matmul, w4a16_matmul, w8a16_matmul
    from inferforge.kernels.reference import pack_int4
    from inferforge.optimize.quantize import quantize_fp8, quantize_per_token_int8

    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    if fmt == "bf16":
        return lambda: x @ w.T
    if fmt == "int8-weight-only":
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        s = torch.rand(n, device=device) * 0.01
        return lambda: w8a16_matmul(x, wq, s)
    if fmt == "int4-g128":
        packed = pack_int4(torch.randint(0, 16, (n, k), device=device))
        sc = torch.rand(n, k // 128, device=device) * 0.01
        z = torch.full((n, k // 128), 8.0, device=device)
        return lambda: w4a16_matmul(x, packed, sc, z, group_size=128)
    if fmt == "w8a8":
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        ws = torch.rand(n, device=device) * 0.01

        def run():
            xq, xs = quantize_per_token_int8(x.float())
            return int8_matmul(xq, wq, xs, ws, out_dtype=dtype)
        return run
    if fmt == "fp8":
        from inferforge.optimize.quantize import FP8Linear

        wf, ws = quantize_fp8(w, "tensor")
        layer = FP8Linear(wf, ws, None, "tensor")
        return lambda: layer(x)
    raise ValueError(fmt)


def run(cases, device, dtype, gpu_key):
    rows = []
    spec = GPUS.get(gpu_key)
    for fmt, m, (label, n, k) in cases:
        base = time_ms(providers("bf16", m, n, k, device, dtype), device)[0]
        ms = time_ms(providers(fmt, m, n, k, device, dtype), device)[0]
        pred = predict(n, k, m, fmt, spec)["time_s"] if spec else None
        pred_base = predict(n, k, m, "bf16", spec)["time_s"] if spec else None
        moved = predict(n, k, m, fmt, GPUS["h100"])["bytes"]
        rows.append({"format": fmt, "m": m, "layer": label, "n": n, "k": k, "ms": ms, "bf16_ms": base,
                     "speedup": base / ms, "tflops": 2 * m * n * k / ms / 1e9, "gbs": moved / ms / 1e6,
                     "predicted_speedup": pred_base / pred if spec else None})
        print(f"{fmt} M={m} {label}: {base / ms:.2f}x bf16", file=sys.stderr)
    return rows


def to_markdown(report) -> str:
    env = report["environment"]
    lines = [f"# Quantized matmuls vs bf16, {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             "" if env["device"] == "cuda" else "CPU smoke run (Triton interpreter): not performance numbers.", "",
             "| format | M | layer (N x K) | ms | bf16 ms | speed-up | predicted | TFLOP/s | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        pred = f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] else "-"
        lines.append(f"| {r['format']} | {r['m']} | {r['layer']} ({r['n']}x{r['k']}) | {r['ms']:.4g} | {r['bf16_ms']:.4g} | "
                     f"{r['speedup']:.2f}x | {pred} | {r['tflops']:.3g} | {r['gbs']:.3g} |")
    return "\n".join(lines) + "\n"


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
        cases = [(f, m, s) for f in ("int8-weight-only", "int4-g128") for m in (1, 16, 64, 256) for s in shapes]
        cases += [(f, m, s) for f in ("w8a8", "fp8") for m in ((256, 4096) if args.quick else (256, 1024, 4096))
                  for s in shapes]
    report = {"environment": environment(device), "rows": run(cases, device, dtype, gpu_key)}
    write_report(args.out, to_markdown(report), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
