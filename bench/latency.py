"""Latency measurement on a shared, noisy machine.

Providers are timed interleaved (round-robin, the starting provider rotating each round), so a burst
of load from a neighbour slows all of them alike and the ratios between them stay honest. Each
provider is warmed up first. Times are wall clock (`time.perf_counter`) around one synchronous call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

QUANTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}


def summarize(samples_ms) -> dict:
    """p50/p90/p95/p99, mean, min and max of latency samples in milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    out = {f"{k}_ms": float(np.percentile(a, q)) for k, q in QUANTILES.items()}
    out.update(mean_ms=float(a.mean()), min_ms=float(a.min()), max_ms=float(a.max()), samples=int(a.size))
    return out


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 5, iterations: int = 30,
                        on_round: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Time each zero-argument callable `iterations` times, interleaved; returns `summarize` per name."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples = {name: [] for name in names}
    for i in range(iterations):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
        if on_round:
            on_round(i + 1)
    return {name: summarize(s) for name, s in samples.items()}


def fixed_length_batch(vocab_size: int, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
    """Encoder inputs where every sequence has exactly `seq_len` real tokens (random ids, no padding)."""
    return {"input_ids": rng.integers(1000, vocab_size, (batch_size, seq_len), dtype=np.int64),
            "attention_mask": np.ones((batch_size, seq_len), np.int64),
            "token_type_ids": np.zeros((batch_size, seq_len), np.int64)}
