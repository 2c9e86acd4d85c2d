import numpy as np
import pytest

from inferforge.bench.latency import measure_interleaved, summarize
from inferforge.bench.report import render_markdown


def test_summarize_percentiles():
    s = summarize(np.arange(1, 101, dtype=float))
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["min_ms"] == 1 and s["max_ms"] == 100 and s["samples"] == 100


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no latency samples"):
        summarize([])


def test_measure_interleaved_rotates_and_counts():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    stats = measure_interleaved(fns, warmup=2, iterations=3)
    assert calls[:6] == list("aabbcc")                  # warm-up, each provider on its own
    assert calls[6:] == list("abcbcacab")               # timed rounds rotate the starting provider
    assert all(stats[n]["samples"] == 3 for n in "abc")


def test_markdown_report_lists_checks_and_rows():
    report = {
        "name": "r", "created": "now", "artifact": "/a", "passed": False,
        "source": {"model": "m", "weights_sha256": "0" * 64},
        "checks": [{"name": "min cosine", "measured": 0.98, "op": ">=", "limit": 0.99, "passed": False}],
        "steps": [{"name": "export", "duration_s": 1.0, "summary": "ok"}],
        "benchmark": {"seq_len": 128, "threads": 2, "iterations": 3, "warmup": 1, "results": [
            {"provider": "onnx-int8", "batch_size": 8, "p50_ms": 10.0, "p95_ms": 11.0, "p99_ms": 12.0,
             "throughput_seq_s": 800.0, "speedup_vs_onnx_fp32": 1.9}]},
        "environment": {"cpu": "x"},
    }
    md = render_markdown(report)
    assert "Result: **FAIL**" in md
    assert "| min cosine | 0.98 | >= 0.99 | FAIL |" in md
    assert "| onnx-int8 | 8 | 10.00 | 11.00 | 12.00 | 800.0 | 1.90x |" in md
    assert "Speedup = p50 latency of ONNX fp32" in md
