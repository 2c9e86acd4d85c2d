"""Summaries of a run point, validity, the exit code and report.json's structure.

Field names follow `vllm bench serve` (completed, request_throughput, p99_ttft_ms ...) so its users
recognise them; the HTML report reads exactly these names.
"""

from __future__ import annotations

import os

from inferforge.bench.serving.metrics import (
    DEFINITIONS,
    RequestRecord,
    latency_summary,
    saturation,
    totals,
)
from inferforge.bench.serving.schedule import LoadConfig

EXIT_OK, EXIT_MISSED, EXIT_INVALID = 0, 1, 2
BUSY_LOAD_PER_CORE = 0.5


def summarize_point(records: list[RequestRecord], *, load: LoadConfig, targets, max_failed_pct: float) -> dict:
    """Totals, latency statistics with CIs, targets and validity for one run point."""
    from inferforge.bench.serving.targets import evaluate

    tot = totals(records, meets_targets=(lambda r: all(t.met_by(r) for t in targets)) if targets else None)
    fields, ci, warnings = latency_summary(records)
    target_results, invalid = evaluate(targets, fields, ci, records)
    failed_pct = 100.0 * tot["failed"] / max(len(records), 1)
    if tot["completed"] == 0:
        invalid.insert(0, "no request completed")
    if tot["failed"] and failed_pct > max_failed_pct:
        first = next(r.error for r in records if not r.success)
        invalid.append(f"{tot['failed']} of {len(records)} requests failed ({failed_pct:.1f}% > --max-failed-pct "
                       f"{max_failed_pct:g}); first error: {first}")
    arrivals = [r.in_flight_at_send for r in sorted(records, key=lambda r: (r.scheduled_s, r.id))]
    sat = saturation(arrivals, offered_rate=load.rate if load.mode == "rate" else None,
                     request_throughput=tot["request_throughput"])
    if sat["saturated"]:
        invalid.append(f"saturated: {sat['details']}")
    return {**tot, **fields, "load": load.summary(), "ci": ci, "sample_warnings": warnings,
            "targets": target_results, "passed": all(t["passed"] for t in target_results),
            "valid": not invalid, "invalid_reasons": invalid, "saturation": sat}


def meets(point: dict) -> bool:
    return point["valid"] and point["passed"]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_warning(start: list[float] | None, end: list[float] | None) -> str | None:
    """A warning when the 1-minute load average per core was above BUSY_LOAD_PER_CORE at start or end."""
    cores = os.cpu_count() or 1
    for when, avg in (("start", start), ("end", end)):
        if avg and avg[0] / cores > BUSY_LOAD_PER_CORE:
            return (f"the machine was busy at the {when} (1-minute load average {avg[0]:.2f} on {cores} cores, above "
                    f"{BUSY_LOAD_PER_CORE} per core): other work may have inflated the latencies")
    return None


def build_report(points: list[dict], *, sweep: bool, target: dict, scenario: str, workload: dict, load: LoadConfig,
                 environment: dict, created: str) -> dict:
    """report.json. A sweep reports every point under `sweep`; its top-level fields are those of the highest
    rate that met every target (the lowest rate when none did)."""
    passing = [p for p in points if meets(p)]
    max_rate = max((p["load"]["rate"] for p in passing), default=None) if sweep else None
    if sweep:
        chosen = (max(passing, key=lambda p: p["load"]["rate"]) if passing
                  else min(points, key=lambda p: p["load"]["rate"]))
    else:
        chosen = points[0]
    report = {"kind": "llm-serving-benchmark", "created": created, "target": target, "scenario": scenario,
              "workload": workload, "load": load.summary()}
    report.update({k: v for k, v in chosen.items() if k != "load"})
    if sweep:
        report["load"]["rate"] = chosen["load"]["rate"]
    report["sweep"] = points if sweep else None
    report["max_rate_meeting_targets"] = max_rate
    report["definitions"] = DEFINITIONS
    report["environment"] = environment
    return report


def exit_code(report: dict) -> int:
    if report["sweep"] is not None:
        if report["max_rate_meeting_targets"] is not None:
            return EXIT_OK
        return EXIT_INVALID if not report["valid"] else EXIT_MISSED
    if not report["valid"]:
        return EXIT_INVALID
    return EXIT_OK if report["passed"] else EXIT_MISSED


def verdict_lines(report: dict) -> list[str]:
    """What stderr says about a run that did not pass: each reason and each missed target, by how much."""
    lines = [f"invalid run: {reason}" for reason in report["invalid_reasons"]]
    for t in report["targets"]:
        if t.get("status", "missed" if not t["passed"] else "met") != "missed" or t["measured"] is None:
            continue
        key = f"{t['percentile']}_{t['metric']}"
        if t["miss_by_ms"] is not None:
            lines.append(f"target missed: {key} = {t['measured']:.3f} ms > {t['limit_ms']:g} ms (by "
                         f"{t['miss_by_ms']:.3f} ms, {t['miss_by_pct']:.1f}%)")
    if report["sweep"] is not None and report["max_rate_meeting_targets"] is None:
        rates = ", ".join(f"{p['load']['rate']:g}" for p in report["sweep"])
        lines.append(f"no swept rate met every target (rates tried: {rates} requests/s)")
    return lines
