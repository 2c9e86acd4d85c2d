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
    assert all("sdpa-math" in row["results"] for row in report["rows"])   # padded for varlen, masked for window
    md = out.read_text()
    assert "| smoke gqa s48 causal |" in md and "not a performance number" in md


def test_window_flops_count_the_exact_band():
    # seq 6, window 2: rows see 1, 2, 3, 3, 3, 3 keys
    s = bench_attention.Shape("w", 1, 6, 2, 2, 16, True, window=2)
    assert s.flops() == 4 * 16 * 2 * (1 + 2 + 3 + 3 + 3 + 3)


def test_speedup_geomean_and_dispatch_rows_from_recorded_times():
    shape = bench_attention.Shape("gqa", 2, 3000, 32, 8, 128, True, group="gqa-sweep")
    results = {"inferforge": {"ms": 2.0}, "sdpa-cudnn": {"ms": 2.5}, "sdpa-flash": {"ms": 3.0}, "flex": {"ms": 4.0}}
    row = bench_attention.summarize(shape, results, {})
    assert row["fastest_other"] == "sdpa-cudnn" and row["speedup"] == 1.25
    assert results["inferforge"]["tflops"] == shape.flops() / 2.0 / 1e9
    assert bench_attention.geomean([1.25, 0.8, None]) == pytest.approx(1.0)
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu128", "triton": "3.6.0"}
    (table_row,) = bench_attention.dispatch_rows(shape, results, env, torch.bfloat16)
    assert table_row["seqlen_bucket"] == 4096 and table_row["best_sdpa"] == "cudnn"
    assert table_row["sdpa_ms"] == {"cudnn": 2.5, "flash": 3.0}
    repeated = {"sdpa-cudnn (enable_gqa)": "no GQA; timed with K/V heads repeated"}
    assert bench_attention.dispatch_rows(shape, results, env, torch.bfloat16, repeated)[0]["sdpa_ms"] == {"flash": 3.0}
    varlen = bench_attention.Shape("v", 2, 100, 4, 4, 64, True, (100, 50))
    assert bench_attention.dispatch_rows(varlen, results, env, torch.bfloat16) == []


def test_dry_run_lists_every_issue_shape_and_provider(capsys):
    assert bench_attention.main(["--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "d128 s16384 non-causal" in out and "gqa 32/8 d128 s1024 causal" in out and "s16384 causal" in out
    assert "sdpa-cudnn, sdpa-flash, sdpa-efficient, flex" in out
    assert "window 4096 s8192 causal gqa" in out and "varlen" in out


@cpu_only
@pytest.mark.parametrize("index", range(len(bench_attention.smoke_shapes())))
def test_pytorch_providers_compute_what_the_kernel_computes(index):
    """The comparison is fair only if every provider computes the same attention (padding, masks)."""
    shape = bench_attention.smoke_shapes()[index]
    inputs = bench_attention.make_inputs(shape, torch.float32, "cpu")
    fns, skipped = bench_attention.providers(shape, inputs, "cpu")
    assert not skipped
    ours, theirs = fns["inferforge"](), fns["sdpa-math"]().transpose(1, 2)
    if shape.varlen:
        theirs = torch.cat([theirs[i, :n] for i, n in enumerate(shape.varlen)])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


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
