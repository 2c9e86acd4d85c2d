import json

import pytest
import torch

from inferforge.bench.kernels import bench_attention

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the --smoke mode is the CPU path; on a GPU "
                              "scripts/gpu_check.sh runs the real benchmarks")


def test_flops_count_halves_for_causal_and_sums_varlen():
    full = bench_attention.Shape("x", 2, 100, 4, 4, 64, False)
    assert full.flops() == 2 * 4 * 100 * 100 * 4 * 64
    assert bench_attention.Shape("x", 2, 100, 4, 4, 64, True).flops() == full.flops() / 2
    varlen = bench_attention.Shape("x", 2, 100, 4, 4, 64, False, (100, 50))
    assert varlen.flops() == 4 * (100 * 100 + 50 * 50) * 4 * 64


def test_fa3_grid_keeps_16k_tokens_and_hidden_2048():
    for s in bench_attention.fa3_grid(quick=False):
        assert s.batch * s.seq == 16384 and s.n_heads * s.head_dim == 2048


@cpu_only
def test_smoke_run_writes_markdown_and_json(tmp_path):
    out = tmp_path / "attention.md"
    assert bench_attention.main(["--smoke", "--dtype", "float16", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["shape"] for r in report["rows"]] == [s.name for s in bench_attention.smoke_shapes()]
    for row in report["rows"]:
        assert row["results"]["inferforge"]["ms"] > 0
    assert "sdpa-math" in report["rows"][0]["results"]
    assert "SDPA has no packed variable-length input" in report["rows"][2]["skipped"].values()
    md = out.read_text()
    assert "| smoke gqa s48 causal |" in md and "not a performance number" in md


@cpu_only
def test_decode_smoke_run_writes_all_sections(tmp_path):
    from inferforge.bench.kernels import bench_decode

    out = tmp_path / "decode.md"
    assert bench_decode.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["decode"][0]["results"]["inferforge"]["gbs"] > 0
    assert report["decode"][0]["results"]["gather+sdpa"]["gbs"] > 0
    assert report["decode"][0]["results"]["flex_attention"]["gbs"] > 0
    assert report["append"][0]["gbs"] > 0
    assert [r["batch"] for r in report["end_to_end"]] == [1, 2]
    assert all(r["engine_tokens_s"] > 0 and r["hf_tokens_s"] > 0 for r in report["end_to_end"])
    assert "## End-to-end decode" in out.read_text()


@cpu_only
def test_flex_paged_provider_computes_paged_decode():
    from inferforge.bench.kernels.bench_decode import flex_paged, paged_inputs
    from inferforge.kernels.reference import paged_decode_attention_reference

    q, k, v, tables, lens, scales = paged_inputs(3, 40, 4, 2, 32, torch.float32, torch.float32, "cpu")
    lens[1] = 7
    got = flex_paged(q, k, v, tables, lens, scales, torch.float32, "cpu")()[:, :, 0]
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k, v, tables, lens), atol=1e-5, rtol=1e-5)


@cpu_only
def test_quant_matmul_smoke_run(tmp_path):
    from inferforge.bench.kernels import bench_quant_matmul

    out = tmp_path / "q.md"
    assert bench_quant_matmul.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["format"] for r in rows] == ["int8-weight-only", "int4-g128", "w8a8", "fp8"]
    assert all(r["ms"] > 0 and r["bf16_ms"] > 0 for r in rows)
