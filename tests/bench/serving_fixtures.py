"""Synthetic LLM serving benchmark outputs (report.json + requests.jsonl), in the load benchmark's schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
HOSTILE = '<script>alert("x")</script>&"model"'


def make_requests(n: int = 60, *, seed: int = 0, failures: int = 2, slow: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    t = 0.0
    for i in range(n):
        t += rng.exponential(0.05)
        ok = i >= failures
        prompt, output = int(rng.integers(16, 64)), int(rng.integers(4, 12))
        ttft = float(rng.gamma(4.0, 10.0) * slow)
        gaps = [float(x) for x in rng.gamma(5.0, 2.0, size=output - 1) * slow]
        chunks = [t + 0.001 + ttft / 1e3 + sum(gaps[:k]) / 1e3 for k in range(output)]
        e2el = ttft + sum(gaps)
        out.append({"id": f"req-{i}", "prompt_tokens": prompt, "output_tokens": output if ok else 0,
                    "scheduled_s": t, "sent_s": t + 0.001, "first_token_s": chunks[0] if ok else None,
                    "end_s": chunks[-1] if ok else t + 0.01, "chunk_times_s": chunks if ok else [],
                    "ttft_ms": ttft if ok else None, "tpot_ms": (sum(gaps) / len(gaps)) if ok and gaps else None,
                    "e2el_ms": e2el if ok else None, "itl_ms": gaps if ok else [], "success": ok,
                    "error": None if ok else f'HTTP 500: <b>boom</b> & "{i}"'})
    return out


def _stats(values, prefix_metric: str) -> dict:
    a = np.asarray(values, dtype=float)
    return {f"mean_{prefix_metric}": float(a.mean()), f"median_{prefix_metric}": float(np.median(a)),
            f"std_{prefix_metric}": float(a.std()), **{f"p{q}_{prefix_metric}": float(np.percentile(a, q))
                                                        for q in (90, 95, 99)}}


def _samples(requests, metric):
    vals = []
    for r in requests:
        if r["success"]:
            v = r[metric]
            if isinstance(v, list):
                vals.extend(v)
            elif v is not None:
                vals.append(v)
    return vals


def make_report(requests: list[dict], *, model: str = "tiny-llama", sweep: bool = False, saturated: bool = False,
                invalid: bool = False, ttft_limit: float = 80.0, tpot_limit: float = 15.0) -> dict:
    done = [r for r in requests if r["success"]]
    report = {"kind": "llm-serving-benchmark", "created": "2026-12-02T10:00:00+00:00",
              "target": {"backend": "inferforge", "model": model, "url": "http://127.0.0.1:8000/v1"},
              "scenario": "server", "workload": {"dataset": "random", "input_len": 32, "output_len": 8, "seed": 0},
              "load": {"mode": "sweep" if sweep else "rate", "rate": 10.0, "burstiness": 1.0, "concurrency": None},
              "completed": len(done), "failed": len(requests) - len(done), "duration": 3.2,
              "total_input_tokens": sum(r["prompt_tokens"] for r in done),
              "total_output_tokens": sum(r["output_tokens"] for r in done),
              "request_throughput": len(done) / 3.2, "output_throughput": sum(r["output_tokens"] for r in done) / 3.2,
              "total_token_throughput": 200.0, "request_goodput": 12.5}
    for m in METRICS:
        report.update(_stats(_samples(requests, m), m))
    report["ci"] = {f"p99_{m}": [report[f"p99_{m}"] * 0.9, report[f"p99_{m}"] * 1.1] for m in METRICS}
    report["ci"].update({f"p95_{m}": [report[f"p95_{m}"] * 0.92, report[f"p95_{m}"] * 1.08] for m in METRICS})
    targets = []
    for metric, pct, limit in (("ttft_ms", 99, ttft_limit), ("tpot_ms", 95, tpot_limit)):
        measured = report[f"p{pct}_{metric}"]
        targets.append({"metric": metric, "percentile": pct, "limit_ms": limit, "measured": measured,
                        "ci": report["ci"][f"p{pct}_{metric}"], "passed": measured <= limit,
                        "miss_by_ms": max(0.0, measured - limit), "miss_by_pct": max(0.0, measured / limit - 1) * 100})
    report.update(targets=targets, passed=all(t["passed"] for t in targets), valid=not invalid,
                  invalid_reasons=["fewer than 100 completed requests: p99 is not resolved"] if invalid else [],
                  sample_warnings=["p99 from 58 samples: the CI is wide"],
                  saturation={"saturated": saturated,
                              "details": "achieved 6.1 req/s of 10 offered; queue grew" if saturated else ""})
    if sweep:
        report["sweep"] = []
        for k, rate in enumerate((2.0, 4.0, 8.0, 16.0)):
            slow = 0.5 * (1.0 + k ** 2 * 0.5)
            entry = {"load": {"mode": "rate", "rate": rate, "burstiness": 1.0, "concurrency": None}, "valid": True,
                     "request_throughput": min(rate, 9.0) * 0.98, "output_throughput": rate * 7.5}
            for m in METRICS:
                entry.update({key: v * slow for key, v in _stats(_samples(requests, m), m).items()})
            entry["passed"] = entry["p99_ttft_ms"] <= ttft_limit and entry["p95_tpot_ms"] <= tpot_limit
            report["sweep"].append(entry)
        passing = [s["load"]["rate"] for s in report["sweep"] if s["passed"]]
        report["max_rate_meeting_targets"] = max(passing) if passing else None
    report["definitions"] = {"TTFT": "first_token_s - sent_s", "TPOT": "(e2el - ttft) / (output_tokens - 1)",
                             "ITL": "gaps between streamed chunks", "E2EL": "end_s - sent_s"}
    report["environment"] = {"python": "3.11.9", "torch": "2.13.0", "platform": "Linux", "cpu": "EPYC",
                             "gpu": None, "git_revision": "abc123", "load_average": [1.2, 1.0, 0.9],
                             "busy_warning": "load average 1.2 on 2 cores" if saturated else None}
    return report


def write_run(out_dir: Path, report: dict, requests: list[dict]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return out_dir
