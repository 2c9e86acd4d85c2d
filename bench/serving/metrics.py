"""Per-request latency metrics, their aggregates, confidence intervals and the saturation rule.

One definition per metric, shared by every backend: a backend records, on one monotonic clock
(`time.perf_counter`, seconds from the run's start), when a request was sent, when each streamed
chunk arrived and how many output tokens the request produced; everything else is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STATISTICS = ("mean", "median", "std", "p90", "p95", "p99")
PERCENTILES = {"median": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
SATURATION_MIN_ARRIVALS = 8

DEFINITIONS = {
    "clock": "time.perf_counter (monotonic), seconds from the run's start; a request's send time is when the "
             "backend hands it to the engine or writes the HTTP request",
    "ttft_ms": "TTFT = time of the first output chunk - send time",
    "tpot_ms": "TPOT = (time of the last output chunk - time of the first) / (output tokens - 1); only requests "
               "with >= 2 output tokens; the first token is excluded (TTFT covers it)",
    "itl_ms": "ITL = every gap between consecutive streamed chunks of a request, one sample per gap, pooled over "
              "requests. In-process every chunk is one token; over HTTP a chunk (an SSE event with a choice) may "
              "carry several tokens and still counts as one gap, so ITL can exceed TPOT there",
    "e2el_ms": "E2EL = time of the last output chunk - send time",
    "output_tokens": "from the server's usage chunk (stream_options.include_usage) when it sends one, else the "
                     "number of streamed chunks; in-process, the tokens the engine yielded",
    "output_tokens_per_s": "per request: output tokens / (E2EL in s)",
    "duration": "from the first request's scheduled send time (t = 0, after warm-up) to the end of the last request",
    "request_throughput": "completed requests / duration",
    "output_throughput": "output tokens of completed requests / duration",
    "total_token_throughput": "(input + output tokens of completed requests) / duration",
    "request_goodput": "completed requests that met every target on their own values / duration: TTFT, TPOT and "
                       "E2EL of the request <= the limit; for ITL the request's gaps at the target's statistic. "
                       "null when the run has no targets (as vLLM omits it)",
    "statistics": "mean, std (numpy, ddof=0), median and pN by numpy.percentile (default linear interpolation)",
    "ci": f"95% bootstrap confidence interval of each statistic (scipy.stats.bootstrap, percentile method, "
          f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); null below 2 samples. ITL's gaps within one "
          f"request are correlated, so its CIs are a cluster bootstrap over requests: resample the requests with "
          f"replacement, pool their gaps, compute the statistic ({BOOTSTRAP_RESAMPLES} resamples, numpy, seed "
          f"{BOOTSTRAP_SEED}, percentile method); null below 2 requests with gaps",
    "sample_rule": "a percentile pN rests on at least ceil(1 / (1 - N/100)) samples (median 2, p90 10, p95 20, "
                   "p99 100), so at least one sample lies at or above it; fewer: a sample warning, and a target on "
                   "it makes the run invalid (exit 2)",
    "saturation": "open-loop rate runs with >= 8 arrivals: at each arrival the count of requests sent and not yet "
                  "finished (in flight) is sampled. Saturated when request_throughput < 90% of the offered rate AND "
                  "the mean in-flight count over the last quarter of arrivals is above both twice and 2 more than "
                  "the mean over the first quarter: the queue grows instead of settling. A saturated run is "
                  "invalid (exit 2)",
}


@dataclass
class RequestRecord:
    """What a backend observed for one request; times in seconds from the run's start."""

    id: int
    prompt_tokens: int | None
    output_len: int                                  # requested max_tokens
    scheduled_s: float = 0.0
    sent_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end_s: float | None = None
    success: bool = False
    error: str | None = None
    in_flight_at_send: int = 0                       # requests in flight when this one was sent

    @property
    def ttft_ms(self) -> float | None:
        if not self.success or not self.chunk_times_s:
            return None
        return (self.chunk_times_s[0] - self.sent_s) * 1e3

    @property
    def e2el_ms(self) -> float | None:
        if not self.success or not self.chunk_times_s:
            return None
        return (self.chunk_times_s[-1] - self.sent_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if not self.success or self.output_tokens < 2 or not self.chunk_times_s:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) * 1e3 / (self.output_tokens - 1)

    @property
    def itl_ms(self) -> list[float]:
        if not self.success:
            return []
        return (np.diff(np.asarray(self.chunk_times_s, dtype=np.float64)) * 1e3).tolist()

    @property
    def output_tokens_per_s(self) -> float | None:
        e2el = self.e2el_ms
        return self.output_tokens / (e2el / 1e3) if e2el else None

    def as_row(self) -> dict:
        """One line of requests.jsonl."""
        return {"id": self.id, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "scheduled_s": self.scheduled_s, "sent_s": self.sent_s,
                "first_token_s": self.chunk_times_s[0] if self.chunk_times_s else None, "end_s": self.end_s,
                "chunk_times_s": self.chunk_times_s, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms,
                "e2el_ms": self.e2el_ms, "itl_ms": self.itl_ms, "output_tokens_per_s": self.output_tokens_per_s,
                "in_flight_at_send": self.in_flight_at_send, "success": self.success, "error": self.error}


def samples(records: list[RequestRecord], metric: str) -> np.ndarray:
    """Every sample of a latency metric in ms, [n] float64 (ITL: pooled gaps)."""
    if metric == "itl_ms":
        values = [gap for r in records for gap in r.itl_ms]
    else:
        values = [v for r in records if (v := getattr(r, metric)) is not None]
    return np.asarray(values, dtype=np.float64)


def statistic(values: np.ndarray, name: str, axis=None):
    """mean / median / pN of `values` along `axis` (numpy's default linear percentile)."""
    if name == "mean":
        return np.mean(values, axis=axis)
    if name == "std":
        return np.std(values, axis=axis)
    return np.percentile(values, PERCENTILES[name], axis=axis)


def min_samples(name: str) -> int:
    """The sample rule: a percentile pN needs ceil(1 / (1 - N/100)) samples; the mean needs one."""
    if name in ("mean", "std"):
        return 1
    return int(np.ceil(1.0 / (1.0 - PERCENTILES[name] / 100.0) - 1e-9))


def bootstrap_ci(values: np.ndarray, name: str) -> list[float] | None:
    """95% bootstrap CI [lo, hi] of a statistic; None below 2 samples."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    if np.all(values == values[0]):          # every resample is the same: the interval is that value
        return [float(values[0]), float(values[0])]
    from scipy import stats as scipy_stats  # lazily: scipy costs ~0.5 s at every CLI start

    result = scipy_stats.bootstrap((values,), lambda x, axis: statistic(x, name, axis=axis), vectorized=True,
                                   n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95, method="percentile",
                                   batch=100, rng=np.random.default_rng(BOOTSTRAP_SEED))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def cluster_bootstrap_ci(groups: list, name: str) -> list[float] | None:
    """95% CI [lo, hi] of a statistic of pooled samples that come in correlated groups (ITL: the gaps of one
    request): resample the groups with replacement, pool their samples, compute the statistic; percentile method,
    BOOTSTRAP_RESAMPLES resamples, seed BOOTSTRAP_SEED. None below 2 non-empty groups."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if len(groups) < 2:
        return None
    pooled = np.concatenate(groups)
    if np.all(pooled == pooled[0]):
        return [float(pooled[0]), float(pooled[0])]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(groups), size=(BOOTSTRAP_RESAMPLES, len(groups)))
    if name == "mean":                      # sums and counts per group: no pooling needed
        sums = np.array([g.sum() for g in groups])
        counts = np.array([g.size for g in groups])
        stats = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    else:
        stats = np.array([statistic(np.concatenate([groups[i] for i in row]), name) for row in picks])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def latency_summary(records: list[RequestRecord]) -> tuple[dict, dict, list[str]]:
    """vLLM-style fields (`mean_ttft_ms`, `p99_itl_ms` ...), their CIs and the sample warnings."""
    fields, ci, warnings = {}, {}, []
    for metric in LATENCY_METRICS:
        values = samples(records, metric)
        for name in STATISTICS:
            key = f"{name}_{metric}"
            fields[key] = float(statistic(values, name)) if values.size else None
            if name != "std":
                ci[key] = (cluster_bootstrap_ci([r.itl_ms for r in records], name) if metric == "itl_ms"
                           else bootstrap_ci(values, name))
            need = min_samples(name)
            if name in PERCENTILES and values.size < need:
                warnings.append(f"{key} rests on {values.size} samples; {name} needs >= {need}")
    return fields, ci, warnings


def totals(records: list[RequestRecord], *, meets_targets=None) -> dict:
    """Counts and throughputs; `meets_targets(record) -> bool` for goodput (None without targets: goodput null)."""
    done = [r for r in records if r.success]
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = max(ends) if ends else 0.0
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    good = None if meets_targets is None else sum(1 for r in done if meets_targets(r))

    def per_s(x):
        return x / duration if duration > 0 else None

    return {"completed": len(done), "failed": len(records) - len(done), "duration": duration,
            "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
            "request_throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
            "total_token_throughput": per_s(input_tokens + output_tokens), "request_goodput": None if good is None else per_s(good)}


def saturation(in_flight_at_arrival, *, offered_rate: float | None, request_throughput: float | None) -> dict:
    """The saturation rule of DEFINITIONS["saturation"] on the in-flight counts sampled at each arrival."""
    counts = np.asarray(in_flight_at_arrival, dtype=np.float64)
    if offered_rate is None or counts.size < SATURATION_MIN_ARRIVALS:
        return {"saturated": False, "details": "not checked: applies to open-loop rate runs with >= "
                                               f"{SATURATION_MIN_ARRIVALS} arrivals"}
    quarter = counts.size // 4
    first, last = float(counts[:quarter].mean()), float(counts[-quarter:].mean())
    achieved = request_throughput or 0.0
    slow = achieved < 0.9 * offered_rate
    growing = last > max(2 * first, first + 2)
    details = (f"request throughput {achieved:.3g}/s vs offered {offered_rate:.3g}/s "
               f"({'below' if slow else 'at or above'} 90%); mean in flight {first:.3g} over the first quarter of "
               f"arrivals, {last:.3g} over the last ({'growing' if growing else 'settled'})")
    return {"saturated": bool(slow and growing), "details": details, "in_flight_first_quarter": first,
            "in_flight_last_quarter": last, "offered_rate": offered_rate}
