"""One 1024 -> 2816 linear layer at M = 1 (a decode step's MLP up projection): float32 against the
int8 and int4 (group 128) weight-only modules, in one group. On a CPU the quantized modules run
PyTorch's packed kernels (kernels/cpu_packed.py, bfloat16 activations); the path is in extra_info."""

from __future__ import annotations

import pytest
import torch
from torch import nn

K, N = 1024, 2816


def _path(fmt: str, x: torch.Tensor) -> str:
    from inferforge.kernels.cpu_packed import use_cpu_packed

    if fmt == "fp32":
        return "torch-linear"
    return "cpu-packed" if use_cpu_packed(x) else ("triton" if x.is_cuda else "torch-reference")


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_quantized_linear_decode(benchmark, fmt):
    from inferforge.optimize.quantize import Int4WeightOnly, Int8WeightOnly, quantize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=False)).eval()
    if fmt != "fp32":
        quantize(model, Int8WeightOnly() if fmt == "int8" else Int4WeightOnly(group_size=128))
    model = model.to(device)
    x = torch.randn(1, K, device=device)
    weight_bytes = {"fp32": 4 * N * K, "int8": N * K + 4 * N, "int4": N * K // 2 + 8 * N * K // 128}[fmt]
    benchmark.group = f"linear {K}x{N}, M=1, float32 activations"
    # Memory-bound at M = 1: GB/s = weight bytes / mean time.
    benchmark.extra_info.update(path=_path(fmt, x), threads=torch.get_num_threads(), weight_bytes=weight_bytes)

    def run():
        with torch.no_grad():
            out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    assert out.shape == (1, N) and torch.isfinite(out).all()
