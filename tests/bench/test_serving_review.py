"""Review fixes of the LLM serving benchmark: targets on too few samples, --rate inf, compare on invalid or
different runs, flags an encoder run would ignore, goodput without targets, the ITL cluster bootstrap, and
early stops (every request failing, token ids outside the vocabulary). No wall-clock assertions."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from inferforge.bench.html_report import render_html
from inferforge.bench.serving import results, runner
from inferforge.bench.serving.metrics import (
    RequestRecord,
    bootstrap_ci,
    cluster_bootstrap_ci,
    latency_summary,
)
from inferforge.bench.serving.output import report_markdown, summary_csv
from inferforge.bench.serving.schedule import LoadConfig
from inferforge.bench.serving.targets import Target, possible_samples
from inferforge.bench.serving.workload import BenchRequest
from inferforge.cli import main
from tests.bench.serving_fixtures import make_report, make_requests, write_run
from tests.bench.test_serving_targets import records
from tests.bench.test_serving_targets import report_for as _report_for
from tests.factories_llama import save_tiny_llama


def report_for(recs, targets):
    report = _report_for(recs, targets)
    report["workload"] = {"settings": {}, "input_tokens": None, "output_tokens": None}
    return report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("review") / "tiny")


# ---------------------------------------------------------------- 1. too few samples for a target
def test_too_few_samples_is_its_own_status_not_a_miss():
    report = report_for(records(50), [Target("ttft_ms", "p99", 1e9), Target("ttft_ms", "p99", 1.0)])
    far_below, above = report["targets"]
    for t in (far_below, above):
        assert t["status"] == "insufficient samples" and not t["passed"] and t["miss_by_ms"] is None
        assert (t["samples"], t["needed"]) == (50, 100)
    assert results.exit_code(report) == 2 and not report["valid"]
    assert not any("target missed" in line for line in results.verdict_lines(report))
    md = report_markdown(report)
    assert "INSUFFICIENT SAMPLES (50 of 100 needed)" in md and "MISS" not in md and "NOT MET" not in md
    html = render_html(report, [])
    assert "TARGETS MISSED" not in html and 'id="undecided"' in html and "insufficient samples" in html
    missed = report_for(records(30), [Target("ttft_ms", "median", 0.001)])["targets"][0]
    assert missed["status"] == "missed" and results.verdict_lines(report_for(records(30), [
        Target("ttft_ms", "median", 0.001)]))[0].startswith("target missed")


def test_possible_samples_per_metric():
    assert possible_samples("ttft_ms", [5] * 10) == possible_samples("e2el_ms", [5] * 10) == 10
    assert possible_samples("itl_ms", [5] * 10) == 40 and possible_samples("itl_ms", [1, 3]) == 2
    assert possible_samples("tpot_ms", [1, 1, 2]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--num-requests", "50", "--target", "ttft_ms:p99:1e9"], "p99 needs >= 100 samples but 50 measured requests"),
    (["--num-requests", "10", "--output-len", "5", "--target", "itl_ms:p99:1e9"], "at most 40 gaps"),
    (["--num-requests", "10", "--output-len", "1", "--target", "tpot_ms:median:1e9"], "at most 0 requests of >= 2"),
])
def test_a_run_that_cannot_resolve_a_target_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch, extra,
                                                                      message):
    from inferforge.bench.serving import backends

    monkeypatch.setattr(backends, "load_engine", lambda *a, **k: pytest.fail("the engine was loaded"))
    assert main(["bench", str(tiny), "-o", str(tmp_path / "run"), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


class _Backend:
    """Succeeds with one chunk per request (no ITL gaps), or fails every request; counts the sends."""

    def __init__(self, fail: bool = False):
        self.fail, self.sent = fail, 0

    async def send(self, request, record, clock):
        self.sent += 1
        record.sent_s = clock()
        await asyncio.sleep(0)
        if self.fail:
            record.error = "ConnectError: connection refused"
        else:
            record.chunk_times_s, record.output_tokens, record.success = [clock()], 1, True
        record.end_s = clock()

    async def close(self):
        return None


def _requests(n):
    return [BenchRequest(i, [5, 6, 7], 3, 4) for i in range(n)]


def test_a_sweep_stops_at_a_point_with_too_few_samples():
    from inferforge.bench.serving.cli import _measure
    from inferforge.progress import Progress

    load = LoadConfig(mode="sweep", rate=1000.0, sweep_max_doublings=6, sweep_bisections=3)
    points, _ = asyncio.run(_measure(_Backend(), _requests(4), load, [Target("itl_ms", "mean", 1e9)], warmup=0,
                                     seed=0, max_failed_pct=1.0, progress=Progress(quiet=True)))
    assert len(points) == 1 and points[0]["targets"][0]["status"] == "insufficient samples"


# ---------------------------------------------------------------- 2. --rate inf / nan / <= 0
@pytest.mark.parametrize("rate, message", [("inf", "use --scenario generate"), ("nan", "finite number > 0"),
                                           ("-1", "finite number > 0"), ("0", "finite number > 0")])
def test_bad_rates_are_refused(tiny, tmp_path, capsys, rate, message):
    assert main(["bench", str(tiny), "--scenario", "server", "--rate", rate, "-o", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 3. compare: invalid or different runs
def test_compare_warns_on_invalid_and_different_runs_and_refuses_to_gate(tmp_path, capsys):
    requests = make_requests()
    a = make_report(requests)
    b = make_report(requests, saturated=True, invalid=True)
    b["request_throughput"] = a["request_throughput"] * 2
    b["load"]["rate"] = 40.0
    ra, rb = write_run(tmp_path / "a", a, requests), write_run(tmp_path / "b", b, requests)
    assert main(["report", "compare", str(ra), str(rb), "--output", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert f"B ({rb}) is an invalid run" in err and "load.rate: 10.0 vs 40.0" in err
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert any("invalid run" in w for w in saved["warnings"]) and any("load.rate" in w for w in saved["warnings"])
    assert "## Warnings" in (tmp_path / "cmp" / "compare.md").read_text()
    assert main(["report", "compare", str(ra), str(rb), "--fail-on", "request_throughput:5%"]) == 2
    assert f"--fail-on cannot be decided: B ({rb}) is an invalid run" in capsys.readouterr().err
    assert main(["report", "compare", str(ra), str(ra), "--fail-on", "request_throughput:5%"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- 4. flags an encoder run would drop
def test_llm_flags_on_an_encoder_target_and_target_with_url_are_refused(tmp_path, capsys, monkeypatch):
    import inferforge.bench.artifact_bench as artifact_bench
    import inferforge.cli as cli

    monkeypatch.setattr(cli, "_is_llm_target", lambda args: False)
    monkeypatch.setattr(artifact_bench, "bench_artifact", lambda *a, **k: pytest.fail("the encoder bench ran"))
    assert main(["bench", str(tmp_path), "--scenario", "server", "--rate", "5", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--scenario, --rate are for language models only" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", str(tmp_path), "--url", "http://127.0.0.1:9/v1", "--model", "m", "-q"]) == 2
    assert "give TARGET or --url, not both" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. report text
def test_goodput_is_null_without_targets_and_shown_as_such():
    report = report_for(records(30), [])
    assert report["request_goodput"] is None and report["request_throughput"] > 0
    assert "| request_goodput | - (no targets) |" in report_markdown(report)
    assert "- (no targets)" in render_html(report, [])
    row = summary_csv(report).splitlines()[1].split(",")
    header = summary_csv(report).splitlines()[0].split(",")
    assert row[header.index("request_goodput")] == ""


def test_sweep_plot_says_missed_or_invalid_and_marks_invalid_points():
    requests = make_requests()
    report = make_report(requests, sweep=True)
    report["sweep"][-1]["valid"] = False
    html = render_html(report, requests)
    assert "red: missed or invalid" in html and "red missed" not in html
    assert 'class="marker-cross"' in html


# ---------------------------------------------------------------- 6. ITL CI: cluster bootstrap over requests
def _request_with_gap(i, gap_ms, gaps):
    chunks = [0.1 + k * gap_ms / 1e3 for k in range(gaps + 1)]
    return RequestRecord(i, 4, gaps + 1, sent_s=0.0, chunk_times_s=chunks, output_tokens=gaps + 1, end_s=chunks[-1],
                         success=True)


def test_itl_ci_is_a_cluster_bootstrap_over_requests():
    rng = np.random.default_rng(1)
    true_gap = 20.0
    per_request = rng.normal(true_gap, 5.0, 40)        # each request has its own constant gap
    groups = [[g] * 25 for g in per_request]
    pooled = np.concatenate(groups)
    for stat in ("mean", "median"):
        naive, cluster = bootstrap_ci(pooled, stat), cluster_bootstrap_ci(groups, stat)
        assert cluster[1] - cluster[0] > 2 * (naive[1] - naive[0])
        assert cluster[0] <= true_gap <= cluster[1]
    recs = [_request_with_gap(i, g, 25) for i, g in enumerate(per_request)]
    _, ci, _ = latency_summary(recs)
    assert ci["mean_itl_ms"] == pytest.approx(cluster_bootstrap_ci([r.itl_ms for r in recs], "mean"))
    assert cluster_bootstrap_ci([[1.0, 2.0]], "mean") is None          # one request: no interval


# ---------------------------------------------------------------- 7. stop early when every request fails
def test_every_warm_up_request_failing_stops_the_run(tmp_path, capsys):
    assert main(["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--vocab-size", "100", "--warmup", "2",
                 "--num-requests", "50", "--request-timeout", "5", "-o", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "every warm-up request (2) failed" in err and "first error:" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("load", [LoadConfig(mode="concurrency", concurrency=1), LoadConfig(mode="rate", rate=1e6)])
def test_without_warm_up_the_first_failures_stop_the_run(load):
    backend = _Backend(fail=True)
    with pytest.raises(runner.AllFailed, match="the first 5 requests all failed.*connection refused"):
        asyncio.run(runner.run_point(backend, _requests(50), load, stop_after_failures=runner.FIRST_FAILURES))
    if load.mode == "concurrency":
        assert backend.sent == runner.FIRST_FAILURES
    ok = asyncio.run(runner.run_point(_Backend(), _requests(8), load, stop_after_failures=5))
    assert all(r.success for r in ok)


def test_dataset_token_ids_outside_the_vocabulary_are_refused(tiny, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": [5, 6, 7]}) + "\n" + json.dumps({"prompt": [5, 100000]}) + "\n")
    assert main(["bench", str(tiny), "--dataset", str(data), "--num-requests", "2", "--warmup", "0",
                 "-o", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "token id 100000, outside the model's vocabulary" in err and len(err.strip().splitlines()) == 1
