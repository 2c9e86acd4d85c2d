"""Prometheus metrics of `inferforge serve`, in their own `CollectorRegistry` (`GET /metrics`).

Definitions (seconds, measured in the server, where tokens reach the HTTP layer):
    TTFT   time to first token: from the request's arrival (its headers read, before the body is parsed
           and the prompt tokenized or templated) to its first generated token.
    ITL    inter-token latency: the gap between two consecutive tokens of one request.
Requests end in `inferforge_requests_finished_total{finish_reason}`: stop, length, abort (the client
went away) or error (the engine failed: a 500). A request refused with a 400 before generating (bad
JSON or types, an unsupported option, a token id outside the vocabulary, a prompt over the window)
is counted only in `inferforge_requests_rejected_total`: a client's mistake, not an engine failure.
Gauges are read from `AsyncEngine.stats()` at scrape time: requests running and waiting, the
fraction of KV-cache blocks in use, and `inferforge_max_running_seqs`, the most sequences the engine
ran in one step since start (above 1 means requests really were batched together).
"""

from __future__ import annotations

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Gauges and counters computed from the engine's stats on each scrape."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.async_engine.stats()
        total = stats["kv_blocks_total"] or 1
        for name, doc, value in (
                ("inferforge_requests_running", "Requests running in the engine.", stats["running"]),
                ("inferforge_requests_waiting", "Requests waiting for a sequence slot or cache blocks.",
                 stats["waiting"]),
                ("inferforge_kv_cache_usage", "Fraction of KV-cache blocks in use (0 to 1).",
                 stats["kv_blocks_used"] / total),
                ("inferforge_max_running_seqs", "Most sequences run in one engine step since start.",
                 stats["max_running"])):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
                ("inferforge_engine_steps", "Engine steps run.", stats["steps"]),
                ("inferforge_batched_steps", "Engine steps that ran more than one sequence.", stats["batched_steps"]),
                ("inferforge_engine_errors", "Engine steps that raised (their requests failed).",
                 stats["engine_errors"])):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The server's registry: engine gauges, latency histograms, token and request counters."""

    def __init__(self, async_engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_engine))
        self.ttft = Histogram("inferforge_time_to_first_token_seconds", "Request arrival (headers read, before parsing and tokenization) to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("inferforge_inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("inferforge_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("inferforge_generation_tokens", "Tokens generated.", registry=self.registry)
        self.finished = Counter("inferforge_requests_finished", "Requests by finish reason: stop, length, abort "
                                "(client gone), error (engine failure).", ["finish_reason"], registry=self.registry)
        self.rejected = Counter("inferforge_requests_rejected", "Requests refused with a 400 before generating "
                                "(invalid input, prompt over the context window).", registry=self.registry)

    def observe_token(self, seconds: float, *, first: bool) -> None:
        """A token reached the server `seconds` after the request arrived (`first`) or after its previous token."""
        (self.ttft if first else self.itl).observe(seconds)
        self.generation_tokens.inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
