"""The run's files: report.json, requests.jsonl, summary.csv, report.md and report.html.

Everything is written into a staging directory beside `--output` and renamed into place at the end,
so a reader never sees a half-written run.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from inferforge.bench.serving.metrics import LATENCY_METRICS, STATISTICS
from inferforge.errors import UserInputError
from inferforge.fileio import make_public_dir, replace_directory

RUN_FILES = ("report.json", "requests.jsonl", "summary.csv", "report.md", "report.html")

TOTAL_COLUMNS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                 "output_throughput", "total_token_throughput", "request_goodput")
STAT_COLUMNS = tuple(f"{s}_{m}" for m in LATENCY_METRICS for s in STATISTICS)


def summary_csv(report: dict) -> str:
    """One row per run point (one per swept rate) with vLLM-style columns."""
    points = report["sweep"] or [report]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["mode", "rate", "burstiness", "concurrency", *TOTAL_COLUMNS, *STAT_COLUMNS, "passed", "valid",
                     "saturated"])
    for p in points:
        load = p["load"]
        writer.writerow([load["mode"], load["rate"], load["burstiness"], load["concurrency"],
                         *(p[c] for c in TOTAL_COLUMNS), *(p[c] for c in STAT_COLUMNS), p["passed"], p["valid"],
                         p["saturation"]["saturated"]])
    return buffer.getvalue()


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def report_markdown(report: dict) -> str:
    t, load, wl = report["target"], report["load"], report["workload"]
    status = ("INVALID" if not report["valid"] else "PASS" if report["passed"] or not report["targets"] else
              "MISSED")
    lines = [f"# LLM serving benchmark: {t.get('model') or t.get('path')}", "",
             f"**Result: {status}** ({report['created']}, backend {t['backend']}"
             f"{', ' + t['url'] if t.get('url') else ''})", "", "## Settings", "",
             f"- scenario: {report['scenario']}; load: mode {load['mode']}, rate {load['rate']}, burstiness "
             f"{load['burstiness']}, concurrency {load['concurrency']}",
             f"- workload: {json.dumps(wl['settings'], default=str)}",
             f"- input tokens: {json.dumps(wl['input_tokens'])}; output tokens: {json.dumps(wl['output_tokens'])}", "",
             "## Totals", "", "| metric | value |", "|---|---|"]
    lines += [f"| {c} | {'- (no targets)' if c == 'request_goodput' and not report['targets'] else _num(report[c], 3)} |"
              for c in TOTAL_COLUMNS]
    lines += ["", "## Latency (ms, with 95% bootstrap CIs)", "",
              "| metric | mean | median | std | p90 | p95 | p99 |", "|---|---|---|---|---|---|---|"]
    for m in LATENCY_METRICS:
        cells = [f"{_num(report[f'{s}_{m}'])}" + ("" if s == "std" else f" {_ci(report['ci'].get(f'{s}_{m}'))}")
                 for s in STATISTICS]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    if report["targets"]:
        lines += ["", "## Targets", "", "| target | limit ms | measured ms | 95% CI | samples | result |",
                  "|---|---|---|---|---|---|"]
        for x in report["targets"]:
            status = x.get("status") or ("met" if x["passed"] else "missed")
            result = ("PASS" if status == "met" else
                      f"MISS by {x['miss_by_ms']:.2f} ms ({x['miss_by_pct']:.1f}%)" if status == "missed" else
                      f"INSUFFICIENT SAMPLES ({x['samples']} of {x.get('needed', '?')} needed): not decided")
            lines.append(f"| {x['percentile']} {x['metric']} | {x['limit_ms']:g} | {_num(x['measured'])} | "
                         f"{_ci(x['ci'])} | {x['samples']} | {result} |")
    if report["sweep"]:
        lines += ["", "## Sweep", "", f"Highest rate meeting every target: {report['max_rate_meeting_targets']}", "",
                  "| rate | completed | req/s | p99 TTFT | p99 TPOT | valid | passed |", "|---|---|---|---|---|---|---|"]
        for p in report["sweep"]:
            lines.append(f"| {p['load']['rate']:g} | {p['completed']} | {_num(p['request_throughput'], 3)} | "
                         f"{_num(p['p99_ttft_ms'])} | {_num(p['p99_tpot_ms'])} | {p['valid']} | {p['passed']} |")
    notes = [*report["invalid_reasons"], *report["sample_warnings"],
             *([report["environment"]["busy_warning"]] if report["environment"].get("busy_warning") else [])]
    lines += ["", "## Validity and warnings", "", f"Saturation: {report['saturation']['details']}", ""]
    lines += [f"- {n}" for n in notes] or ["- none"]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in report["environment"].items()]
    return "\n".join(lines) + "\n"


def _earlier_run(path: Path) -> bool:
    """An empty directory, or one holding only a benchmark run's files with an LLM serving report.json."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    try:
        kind = json.loads((path / "report.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return False
    return kind == "llm-serving-benchmark" and names <= set(RUN_FILES)


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an `--output` that exists and is not an earlier run (it would be replaced)."""
    if out.exists() and not _earlier_run(out):
        raise UserInputError(f"--output {out} exists and is not an earlier benchmark run (which would be replaced); "
                             "choose a new directory")


def write_outputs(out: str | Path, report: dict, rows: list[dict]) -> Path:
    """Write every file of the run to `out` (replacing it) through a staging directory. An existing `out`
    is replaced only when it is an earlier benchmark run: never a directory with anything else in it."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (staging / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (staging / "summary.csv").write_text(summary_csv(report), encoding="utf-8")
        (staging / "report.md").write_text(report_markdown(report), encoding="utf-8")
        from inferforge.bench.html_report import write_html

        write_html(staging, report, rows)
        make_public_dir(staging)
        replace_directory(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
