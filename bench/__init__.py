"""Benchmark harness: latency quantiles measured side by side, and reports people and CI can read."""

from inferforge.bench.latency import measure_interleaved, summarize
from inferforge.bench.report import render_markdown

__all__ = ["measure_interleaved", "summarize", "render_markdown"]
