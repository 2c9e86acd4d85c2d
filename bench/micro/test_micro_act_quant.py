"""Per-token (per-row) int8 activation quantization, `quantize_rows`: a decode row and a prefill block."""

from __future__ import annotations

import pytest
import torch

K = 4096


@pytest.mark.parametrize("rows", [1, 256])
def test_quantize_rows_int8(benchmark, kernel_path, rows):
    from inferforge.kernels.act_quant import quantize_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0)).to(device)
    benchmark.group = f"act_quant int8 per-token, K={K}"
    # Memory-bound: read fp32 x, write int8 q and one fp32 scale per row (GB/s = bytes / mean time).
    benchmark.extra_info.update(path=kernel_path(x.is_cuda), rows=rows, k=K, bytes=rows * K * 5 + rows * 4)

    def run():
        out = quantize_rows(x, torch.int8)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out

    q, scale = benchmark(run)
    assert q.dtype == torch.int8 and q.shape == (rows, K) and scale.shape == (rows,)
