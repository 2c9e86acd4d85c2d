"""The serving benchmark's math against numpy/scipy on synthetic data: arrivals, percentiles, bootstrap
CIs, per-request metric formulas on hand-made timestamps, and the saturation rule."""

import numpy as np
import pytest
from scipy import stats

from inferforge.bench.serving.metrics import (
    RequestRecord,
    bootstrap_ci,
    latency_summary,
    min_samples,
    saturation,
    totals,
)
from inferforge.bench.serving.schedule import LoadConfig, arrival_times
from inferforge.bench.serving.workload import LengthDist, WorkloadConfig, build_workload
from inferforge.errors import UserInputError


def test_poisson_arrivals_have_mean_gap_one_over_rate_and_pass_a_ks_test():
    rate, n = 5.0, 20000
    gaps = np.diff(arrival_times(n, rate, seed=0))
    assert arrival_times(n, rate, seed=0)[0] == 0.0 and np.all(gaps >= 0)
    # The sample mean of n exponential gaps has std (1/rate)/sqrt(n): allow 4 of them.
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / np.sqrt(n)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_keep_the_mean_and_scale_the_variance(burstiness):
    rate, n = 2.0, 40000
    gaps = np.diff(arrival_times(n, rate, burstiness=burstiness, seed=1))
    mean, var = 1 / rate, 1 / (rate**2 * burstiness)
    assert gaps.mean() == pytest.approx(mean, rel=0.03)
    assert gaps.var() == pytest.approx(var, rel=0.08)
    assert stats.kstest(gaps, "gamma", args=(burstiness, 0, 1 / (rate * burstiness))).pvalue > 0.01


def test_offline_sends_everything_at_zero_and_load_configs_validate():
    assert np.all(arrival_times(5, float("inf")) == 0)
    assert LoadConfig().summary() == {"mode": "offline", "rate": "inf", "burstiness": 1.0, "concurrency": None}
    with pytest.raises(UserInputError, match="--rate must be > 0"):
        LoadConfig(mode="rate", rate=0)
    with pytest.raises(UserInputError, match="--concurrency must be >= 1"):
        LoadConfig(mode="concurrency", concurrency=0)


def test_length_distributions_and_synthetic_workload():
    rng = np.random.default_rng(0)
    uniform = LengthDist("uniform", mean=100, range_ratio=0.25).sample(rng, 5000)
    assert uniform.min() == 75 and uniform.max() == 125
    normal = LengthDist("normal", mean=3, std=5).sample(rng, 5000)
    assert normal.min() >= 1
    with pytest.raises(UserInputError, match="--input-len-range R"):
        LengthDist("uniform", mean=10, name="input-len")
    config = WorkloadConfig(num_requests=4, warmup=1, input_len=LengthDist(mean=6), output_len=LengthDist(mean=3))
    requests = build_workload(config, vocab_size=50)
    assert len(requests) == 5 and all(len(r.prompt) == r.prompt_tokens == 6 and r.output_len == 3 for r in requests)
    assert all(3 <= t < 50 for r in requests for t in r.prompt)
    assert build_workload(config, vocab_size=50) == requests              # seeded
    with pytest.raises(UserInputError, match="--vocab-size N or --tokenizer DIR"):
        build_workload(config, vocab_size=None)


def record(i, sent, chunks, tokens=None, ok=True):
    r = RequestRecord(i, prompt_tokens=10, output_len=len(chunks), sent_s=sent, chunk_times_s=list(chunks),
                      output_tokens=len(chunks) if tokens is None else tokens, end_s=chunks[-1] if chunks else sent,
                      success=ok)
    return r


def test_metric_formulas_on_hand_made_timestamps():
    # Sent at 1 s; chunks at 1.5, 1.7, 2.5 s: TTFT 500 ms, TPOT (2.5 - 1.5) / 2 = 500 ms, ITL 200 and 800 ms.
    r = record(0, 1.0, [1.5, 1.7, 2.5])
    assert r.ttft_ms == pytest.approx(500) and r.e2el_ms == pytest.approx(1500)
    assert r.tpot_ms == pytest.approx(500) and r.itl_ms == pytest.approx([200, 800])
    assert r.output_tokens_per_s == pytest.approx(3 / 1.5)
    # Over HTTP one chunk may carry several tokens: TPOT divides by the tokens, ITL stays per chunk.
    http = record(1, 0.0, [0.1, 0.5], tokens=5)
    assert http.tpot_ms == pytest.approx(100) and http.itl_ms == pytest.approx([400])
    single = record(2, 0.0, [0.3])
    assert single.tpot_ms is None and single.itl_ms == []
    failed = record(3, 0.0, [0.2], ok=False)
    assert failed.ttft_ms is None and failed.itl_ms == []
    t = totals([r, http, single, failed])
    assert (t["completed"], t["failed"], t["duration"]) == (3, 1, 2.5)
    assert t["total_output_tokens"] == 9 and t["request_throughput"] == pytest.approx(3 / 2.5)
    assert t["total_token_throughput"] == pytest.approx((30 + 9) / 2.5)


def test_percentiles_match_numpy_and_cis_cover_them():
    rng = np.random.default_rng(0)
    ttfts = rng.lognormal(3, 0.5, 300)
    records = [record(i, 0.0, [t / 1e3, t / 1e3 + 0.01, t / 1e3 + 0.03]) for i, t in enumerate(ttfts)]
    fields, ci, warnings = latency_summary(records)
    got = np.array([r.ttft_ms for r in records])
    assert fields["p99_ttft_ms"] == pytest.approx(np.percentile(got, 99))
    assert fields["median_ttft_ms"] == pytest.approx(np.median(got))
    assert fields["std_ttft_ms"] == pytest.approx(np.std(got))
    assert fields["mean_itl_ms"] == pytest.approx(15, rel=1e-6) and warnings == []
    for key in ("p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms"):
        lo, hi = ci[key]
        assert lo <= fields[key] <= hi
    expected = stats.bootstrap((got,), lambda x, axis: np.percentile(x, 95, axis=axis), n_resamples=1000,
                               method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert ci["p95_ttft_ms"] == pytest.approx([expected.low, expected.high])
    assert bootstrap_ci(np.array([1.0]), "p99") is None and bootstrap_ci(np.ones(5), "p99") == [1.0, 1.0]


def test_sample_rule_warns_below_the_needed_count():
    assert [min_samples(s) for s in ("mean", "median", "p90", "p95", "p99")] == [1, 2, 10, 20, 100]
    records = [record(i, 0.0, [0.1, 0.2]) for i in range(30)]
    _, _, warnings = latency_summary(records)
    assert "p99_ttft_ms rests on 30 samples; p99 needs >= 100" in warnings
    assert not any(w.startswith("p95_ttft_ms") for w in warnings)


def test_saturation_rule_on_synthetic_queues():
    n, rate = 100, 10.0
    # A queue that keeps up: in flight settles around 3.
    steady = np.minimum(np.arange(n), 3)
    assert not saturation(steady, offered_rate=rate, request_throughput=9.5)["saturated"]
    # Served at half the offered rate: in flight grows by about half a request per arrival.
    growing = np.arange(n) // 2
    verdict = saturation(growing, offered_rate=rate, request_throughput=5.0)
    assert verdict["saturated"] and "growing" in verdict["details"]
    # Growth alone (a short run still ramping up) is not saturation while throughput keeps up.
    assert not saturation(growing, offered_rate=rate, request_throughput=9.5)["saturated"]
    # Closed-loop or offline runs and very short runs are not checked.
    assert not saturation(growing, offered_rate=None, request_throughput=1.0)["saturated"]
    assert "not checked" in saturation(growing[:5], offered_rate=rate, request_throughput=1.0)["details"]
