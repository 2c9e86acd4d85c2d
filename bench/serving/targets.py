"""Latency targets (service-level objectives): `METRIC:STAT:LIMIT_MS`, YAML files and presets.

Presets:
  mlperf-server       TTFT p99 <= 2000 ms, TPOT p99 <= 100 ms  (MLPerf Inference, Llama-2-70B server)
  mlperf-interactive  TTFT p99 <= 500 ms,  TPOT p99 <= 30 ms   (MLPerf Inference, Llama-2-70B interactive)
  chat                TTFT p95 <= 1000 ms, ITL p95 <= 100 ms   (inferforge's own: a reply starts within a
                      second and streams faster than reading speed for 95% of requests / gaps)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferforge.bench.serving.metrics import (
    LATENCY_METRICS,
    PERCENTILES,
    RequestRecord,
    min_samples,
    statistic,
)
from inferforge.errors import UserInputError

TARGET_STATS = ("mean", *PERCENTILES)


@dataclass(frozen=True)
class Target:
    metric: str          # ttft_ms, tpot_ms, itl_ms, e2el_ms
    percentile: str      # mean, median, p90, p95, p99
    limit_ms: float

    def __post_init__(self):
        if self.percentile == "p50":            # the name most people write for the median
            object.__setattr__(self, "percentile", "median")
        if self.metric not in LATENCY_METRICS:
            raise UserInputError(f"target metric {self.metric!r}: choose one of {', '.join(LATENCY_METRICS)}")
        if self.percentile not in TARGET_STATS:
            raise UserInputError(f"target statistic {self.percentile!r}: choose one of {', '.join(TARGET_STATS)} (p50 = median)")
        if not self.limit_ms > 0:
            raise UserInputError(f"target limit must be > 0 ms, got {self.limit_ms}")

    @property
    def key(self) -> str:
        """The report field it limits, e.g. p99_ttft_ms."""
        return f"{self.percentile}_{self.metric}"

    def __str__(self) -> str:
        return f"{self.metric}:{self.percentile}:{self.limit_ms:g}"

    def met_by(self, record: RequestRecord) -> bool:
        """Goodput: does this one request's own value hold the limit? (ITL: its gaps at the statistic.)"""
        if self.metric == "itl_ms":
            gaps = np.asarray(record.itl_ms)
            return gaps.size == 0 or float(statistic(gaps, self.percentile)) <= self.limit_ms
        value = getattr(record, self.metric)
        return value is None or value <= self.limit_ms


PRESETS = {
    "mlperf-server": (Target("ttft_ms", "p99", 2000.0), Target("tpot_ms", "p99", 100.0)),
    "mlperf-interactive": (Target("ttft_ms", "p99", 500.0), Target("tpot_ms", "p99", 30.0)),
    "chat": (Target("ttft_ms", "p95", 1000.0), Target("itl_ms", "p95", 100.0)),
}


def looks_like_slo(text: str) -> bool:
    """`ttft_ms:p99:500` (three fields, a metric name first) rather than an encoder's `8:40`."""
    parts = text.split(":")
    return len(parts) == 3 and not parts[0].strip().isdigit()


def parse_target(text: str) -> Target:
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 3:
        raise UserInputError(f"--target {text!r}: a language-model target is METRIC:STAT:LIMIT_MS such as "
                             "ttft_ms:p99:500 (BATCH:MS such as 8:40 is for encoder artifacts)")
    metric, stat, limit = parts
    try:
        limit_ms = float(limit)
    except ValueError:
        raise UserInputError(f"--target {text!r}: the limit must be a number of milliseconds") from None
    return Target(metric, stat, limit_ms)


def load_targets_file(path: str | Path) -> list[Target]:
    """YAML: a list of `{metric: ttft_ms, percentile: p99, limit_ms: 500}` or of `"ttft_ms:p99:500"` strings."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserInputError(f"--targets {path.name}: not YAML ({e})") from None
    if isinstance(data, dict) and "targets" in data:
        data = data["targets"]
    if not isinstance(data, list):
        raise UserInputError(f"--targets {path.name}: expected a list of {{metric, percentile, limit_ms}}")
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(parse_target(item))
        elif isinstance(item, dict) and set(item) == {"metric", "percentile", "limit_ms"}:
            out.append(Target(str(item["metric"]), str(item["percentile"]), float(item["limit_ms"])))
        else:
            raise UserInputError(f"--targets {path.name}: entry {item!r} needs exactly metric, percentile, limit_ms")
    return out


def preset(name: str) -> list[Target]:
    if name not in PRESETS:
        raise UserInputError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return list(PRESETS[name])


def sample_count(records: list[RequestRecord], metric: str) -> int:
    from inferforge.bench.serving.metrics import samples

    return int(samples(records, metric).size)


MET, MISSED, INSUFFICIENT = "met", "missed", "insufficient samples"


def evaluate(targets, fields: dict, ci: dict, records: list[RequestRecord]) -> tuple[list[dict], list[str]]:
    """One result per target ({metric, percentile, limit_ms, measured, ci, samples, needed, status, passed,
    miss_by_ms, miss_by_pct}) and the reasons the run is invalid for them. `status` is "met", "missed", or
    "insufficient samples" when the statistic rests on fewer samples than the sample rule needs: then the target
    is neither met nor missed (passed false, miss_by null) and the run is invalid (exit 2)."""
    results, invalid = [], []
    for t in targets:
        n, need = sample_count(records, t.metric), min_samples(t.percentile)
        measured = fields.get(t.key)
        if n < need or measured is None:
            status = INSUFFICIENT
            invalid.append(f"target {t}: {t.key} needs >= {need} samples, the run has {n}; raise --num-requests")
        else:
            status = MET if measured <= t.limit_ms else MISSED
        miss = measured - t.limit_ms if status == MISSED else None
        results.append({"metric": t.metric, "percentile": t.percentile, "limit_ms": t.limit_ms, "measured": measured,
                        "ci": ci.get(t.key), "samples": n, "needed": need, "status": status,
                        "passed": status == MET, "miss_by_ms": miss,
                        "miss_by_pct": None if miss is None else 100.0 * miss / t.limit_ms})
    return results, invalid


def possible_samples(metric: str, output_lens: list[int]) -> int:
    """The most samples of `metric` a run of requests with these requested output lengths can give: one per
    request for TTFT and E2EL, one per request of >= 2 tokens for TPOT, and for ITL one per gap, at most
    output_len - 1 per request (exactly that in-process; over HTTP a chunk may carry several tokens, fewer gaps)."""
    if metric == "itl_ms":
        return sum(max(n - 1, 0) for n in output_lens)
    if metric == "tpot_ms":
        return sum(1 for n in output_lens if n >= 2)
    return len(output_lens)


def check_sample_counts(targets, output_lens: list[int]) -> None:
    """Refuse, before any request is sent, a target whose statistic the run cannot resolve (the sample rule)."""
    for t in targets:
        need, most = min_samples(t.percentile), possible_samples(t.metric, output_lens)
        if most < need:
            unit = ("gaps (requests x (output length - 1))" if t.metric == "itl_ms"
                    else "requests of >= 2 output tokens" if t.metric == "tpot_ms" else "requests")
            raise UserInputError(f"target {t}: {t.percentile} needs >= {need} samples but {len(output_lens)} "
                                 f"measured requests give at most {most} {unit}; raise --num-requests"
                                 + (" or --output-len" if t.metric in ("itl_ms", "tpot_ms") else ""))
