"""Targets: parsing, presets, YAML files, and the exit code of a run (0 held, 1 missed, 2 invalid) on
synthetic request records; no clock involved."""

import numpy as np
import pytest

from inferforge.bench.serving import results
from inferforge.bench.serving.metrics import RequestRecord
from inferforge.bench.serving.schedule import LoadConfig
from inferforge.bench.serving.targets import PRESETS, Target, load_targets_file, looks_like_slo, parse_target
from inferforge.errors import UserInputError


def test_parse_targets_presets_and_files(tmp_path):
    assert parse_target("ttft_ms:p99:500") == Target("ttft_ms", "p99", 500.0)
    assert parse_target("itl_ms:mean:12.5").key == "mean_itl_ms"
    with pytest.raises(UserInputError, match=r"METRIC:STAT:LIMIT_MS .* \(BATCH:MS such as 8:40 is for encoder"):
        parse_target("8:40")
    with pytest.raises(UserInputError, match="target metric 'ttft'"):
        parse_target("ttft:p99:500")
    assert parse_target("ttft_ms:p50:500") == Target("ttft_ms", "median", 500.0)   # p50 is the median
    with pytest.raises(UserInputError, match=r"target statistic 'p75'.*\(p50 = median\)"):
        parse_target("ttft_ms:p75:500")
    assert looks_like_slo("ttft_ms:p99:500") and not looks_like_slo("8:40")
    assert PRESETS["mlperf-server"] == (Target("ttft_ms", "p99", 2000.0), Target("tpot_ms", "p99", 100.0))
    assert PRESETS["mlperf-interactive"] == (Target("ttft_ms", "p99", 500.0), Target("tpot_ms", "p99", 30.0))
    assert [t.metric for t in PRESETS["chat"]] == ["ttft_ms", "itl_ms"]
    f = tmp_path / "slo.yaml"
    f.write_text("- {metric: ttft_ms, percentile: p95, limit_ms: 800}\n- tpot_ms:median:40\n")
    assert load_targets_file(f) == [Target("ttft_ms", "p95", 800.0), Target("tpot_ms", "median", 40.0)]
    f.write_text("- {metric: ttft_ms, limit_ms: 800}\n")
    with pytest.raises(UserInputError, match="needs exactly metric, percentile, limit_ms"):
        load_targets_file(f)


def records(n, *, ttft=0.1, gap=0.02, tokens=4, failed=0, in_flight=None):
    out = []
    for i in range(n):
        sent = i * 0.1
        chunks = [sent + ttft + k * gap for k in range(tokens)]
        ok = i >= failed
        out.append(RequestRecord(i, 8, tokens, scheduled_s=sent, sent_s=sent, chunk_times_s=chunks, output_tokens=tokens,
                                 end_s=chunks[-1], success=ok, error=None if ok else "HTTP 500: boom",
                                 in_flight_at_send=0 if in_flight is None else int(in_flight[i])))
    return out


def report_for(recs, targets, load=None):
    load = load or LoadConfig()
    point = results.summarize_point(recs, load=load, targets=targets, max_failed_pct=1.0)
    return results.build_report([point], sweep=False, target={"backend": "inferforge-engine", "model": "m"},
                                scenario="generate", workload={}, load=load, environment={}, created="now")


def test_targets_hold_exit_0_and_goodput_counts_requests():
    report = report_for(records(30), [Target("ttft_ms", "p95", 1e9), Target("tpot_ms", "median", 1e9)])
    assert results.exit_code(report) == 0 and report["passed"] and report["valid"]
    assert report["request_goodput"] == pytest.approx(report["request_throughput"])
    assert results.verdict_lines(report) == []


def test_a_missed_target_exits_1_and_is_named_with_the_miss():
    report = report_for(records(30), [Target("ttft_ms", "median", 0.001), Target("e2el_ms", "mean", 1e9)])
    assert results.exit_code(report) == 1 and report["valid"] and not report["passed"]
    missed, held = report["targets"]
    assert not missed["passed"] and held["passed"]
    assert missed["measured"] == pytest.approx(100.0)
    assert missed["miss_by_ms"] == pytest.approx(100.0 - 0.001)
    assert missed["miss_by_pct"] == pytest.approx(100 * (100.0 - 0.001) / 0.001)
    assert report["request_goodput"] == 0.0
    (line,) = results.verdict_lines(report)
    assert line.startswith("target missed: median_ttft_ms = 100.000 ms > 0.001 ms (by 99.999 ms")


def test_too_few_samples_for_p99_exits_2():
    report = report_for(records(50), [Target("ttft_ms", "p99", 1e9)])
    assert results.exit_code(report) == 2 and not report["valid"]
    assert "p99_ttft_ms needs >= 100 samples, the run has 50" in report["invalid_reasons"][0]


def test_failed_requests_beyond_the_threshold_exit_2():
    report = report_for(records(20, failed=1), [])
    assert results.exit_code(report) == 2
    assert "1 of 20 requests failed (5.0% > --max-failed-pct 1)" in report["invalid_reasons"][0]
    assert "HTTP 500: boom" in report["invalid_reasons"][0]


def test_saturation_exits_2():
    # Offered 10 requests/s, completed ~1/s, and the in-flight count grows by half a request per arrival.
    n = 40
    recs = records(n, ttft=0.1, gap=1.0, in_flight=np.arange(n) // 2)
    report = report_for(recs, [Target("ttft_ms", "mean", 1e9)], LoadConfig(mode="rate", rate=10.0))
    assert report["saturation"]["saturated"] and results.exit_code(report) == 2
    assert report["invalid_reasons"][0].startswith("saturated: request throughput")


def test_sweep_brackets_then_bisects():
    import asyncio

    from inferforge.bench.serving.runner import sweep_rates

    capacity = 11.0

    async def meets(rate):
        return rate <= capacity

    visited = asyncio.run(sweep_rates(1.0, meets, max_doublings=6, bisections=3))
    assert visited[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and visited[5:] == [12.0, 10.0, 11.0]
    down = asyncio.run(sweep_rates(40.0, meets, max_doublings=6, bisections=1))
    assert down == [40.0, 20.0, 10.0, 15.0]
