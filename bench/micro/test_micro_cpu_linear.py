"""Dense float32 projections on the CPU at decode-sized row counts: `F.linear` on the dense weight
against the engine's packed copies (runtime/cpu_linear.py: oneDNN's layout, and MKL's packed SGEMM
packed for 8 rows). Each round streams 16 different 1024 x 2816 weights (184 MB, more than the
caches hold), as a decode step streams a model's layers; GB/s = weight bytes / mean time is in
`extra_info`. On a 2-core Xeon with AVX-512 and AMX MKL's copy led at 8 rows and `F.linear` at 1; on
a 2-core AMD EPYC oneDNN's layout led at both (the engine times these layouts at load and keeps the
fastest: runtime/cpu_linear.py). MKL's 1-row timing here is its copy packed for 8 rows, with the row
padded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

K, N, LAYERS = 2816, 1024, 16


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("path", ["dense", "onednn", "mkl"])
def test_cpu_dense_linear(benchmark, path, rows):
    from inferforge.runtime.cpu_linear import (
        PackedDenseLinear,
        mkl_packing_available,
        packing_unavailable_reason,
    )

    why_not = packing_unavailable_reason(torch.device("cpu"), torch.float32)
    if path != "dense" and why_not:
        pytest.skip(why_not)
    if path == "mkl" and not mkl_packing_available(torch.float32):
        pytest.skip("this torch build has no MKL packed SGEMM")
    torch.manual_seed(0)
    weights = [torch.randn(N, K) for _ in range(LAYERS)]
    x = torch.randn(rows, K)
    if path == "dense":
        ops = [lambda x, w=w: F.linear(x, w) for w in weights]
    else:
        packed = [PackedDenseLinear(w, batch_rows=8 if path == "mkl" else None) for w in weights]
        assert all(p.kind == path for p in packed)
        # Call the packed product itself (a dense+copy PackedDenseLinear sends up to 3 rows to F.linear).
        if path == "mkl":
            ops = [lambda x, p=p: torch.ops.mkl._mkl_linear(F.pad(x, (0, 0, 0, 8 - rows)), p.packed, p.weight, None, 8)[:rows]
                   for p in packed]
        else:
            ops = [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p.packed, None, "none", [], "") for p in packed]
    benchmark.group = f"{LAYERS} linears {K}x{N} streamed, {rows} row(s), float32"
    benchmark.extra_info.update(path=path, rows=rows, threads=torch.get_num_threads(), weight_bytes=4 * N * K * LAYERS)

    def run():
        return [op(x) for op in ops]

    outs = benchmark(run)
    want = [F.linear(x.double(), w.double()) for w in weights[:2]]
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got.double(), ref, atol=1e-3, rtol=1e-4)
