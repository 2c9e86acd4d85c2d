"""`inferforge report compare A B`: two benchmark reports side by side, and a regression check for CI.

Reads two `report.json` files (a directory holding one, or the file itself) of the same kind:

- `llm-serving-benchmark` (the load benchmark): the vLLM-style keys, e.g. `p99_ttft_ms`,
  `request_throughput`;
- `llm-benchmark` (`inferforge bench` on a causal-LM artifact): `b8/p99_ttft_ms`, `b8/p50_tokens_per_s`;
- an encoder run or `inferforge bench` report (`benchmark.results`): `onnx-int8/b8/p95_ms`,
  `onnx-int8/b8/throughput_seq_s`.

For each key: A, B, delta = B - A and delta % = delta / |A|. Latency keys are lower-is-better and
throughput/goodput keys higher-is-better; a change for the worse is marked as a regression (`std_*`,
`duration` and counts are shown but never judged).

`--fail-on KEY:THRESHOLD` (repeatable) exits 1 when B is worse than A by more than THRESHOLD: with a
`%` sign relative to A (`p99_ttft_ms:10%`), without one in the key's own unit (`p99_ttft_ms:5` is
5 ms; `request_throughput:0.5` is 0.5 req/s). An unknown or unjudged key, a missing file or a report
of another kind is one line and exit 2. Nothing is written unless `--output DIR` is given (then
`compare.md` and `compare.json`, atomically).

Validity and comparability (LLM serving reports): a warning (stderr, `warnings` in compare.json, a
section of compare.md) when either run is invalid (`valid` false: saturated, too many failures, too
few samples) or when the two differ in scenario, load mode / rate / burstiness / concurrency,
workload settings, or target backend / model. With `--fail-on`, an invalid run on either side is
one line and exit 2: a regression gate cannot be decided on an invalid run.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import GateFailed, UserInputError

SERVING_KIND, ENGINE_KIND, ENCODER_KIND = "llm-serving-benchmark", "llm-benchmark", "encoder-benchmark"
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
LATENCY_STATS = ("mean", "median", "p90", "p95", "p99")
THROUGHPUT_KEYS = ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput")
LOWER, HIGHER = "lower", "higher"


def read_report(path: str | Path) -> dict:
    """A report.json, from its path or its directory; a missing or unreadable file is a UserInputError."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UserInputError(f"{path}: no report.json there; give a benchmark output directory or its report.json")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{file}: not valid JSON ({e}); is the benchmark still writing it?") from None
    if not isinstance(report, dict):
        raise UserInputError(f"{file}: expected a JSON object, got {type(report).__name__}")
    return report


def report_kind(report: dict, source: str = "report") -> str:
    kind = report.get("kind")
    if kind in (SERVING_KIND, ENGINE_KIND):
        return kind
    if isinstance((report.get("benchmark") or {}).get("results"), list):
        return ENCODER_KIND
    raise UserInputError(f"{source}: a report of kind {kind!r} has no benchmark to compare; compare reports "
                         f"of kind {SERVING_KIND}, {ENGINE_KIND} or an encoder benchmark (benchmark.results)")


def metric_values(report: dict, kind: str) -> dict[str, tuple[float | None, str | None]]:
    """key -> (value, direction): LOWER or HIGHER is better, None for values shown but not judged."""
    out: dict[str, tuple[float | None, str | None]] = {}
    if kind == SERVING_KIND:
        for key in ("completed", "duration", "total_input_tokens", "total_output_tokens"):
            out[key] = (report.get(key), None)
        out["failed"] = (report.get("failed"), LOWER)
        for key in THROUGHPUT_KEYS:
            out[key] = (report.get(key), HIGHER)
        for metric in LATENCY_METRICS:
            for stat in LATENCY_STATS:
                out[f"{stat}_{metric}"] = (report.get(f"{stat}_{metric}"), LOWER)
            out[f"std_{metric}"] = (report.get(f"std_{metric}"), None)
    elif kind == ENGINE_KIND:
        for row in report["llm_benchmark"]["results"]:
            b = row["batch_size"]
            for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
                for p, v in row[metric].items():
                    out[f"b{b}/{p}_{metric}"] = (v, LOWER)
            for p, v in row["tokens_per_s"].items():
                out[f"b{b}/{p}_tokens_per_s"] = (v, HIGHER)
    else:
        for row in report["benchmark"]["results"]:
            prefix = f"{row['provider']}/b{row['batch_size']}"
            for stat in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms"):
                if stat in row:
                    out[f"{prefix}/{stat}"] = (row[stat], LOWER)
            out[f"{prefix}/throughput_seq_s"] = (row.get("throughput_seq_s"), HIGHER)
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None, d)
            for k, (v, d) in out.items()}


def compare_reports(a: dict, b: dict, *, a_name: str = "A", b_name: str = "B") -> dict:
    """Rows of key, a, b, delta (b - a), delta_pct, direction and verdict ('worse', 'better', 'same', '')."""
    kind_a, kind_b = report_kind(a, a_name), report_kind(b, b_name)
    if kind_a != kind_b:
        raise UserInputError(f"{a_name} is a {kind_a} report and {b_name} a {kind_b} report; compare two of one kind")
    va, vb = metric_values(a, kind_a), metric_values(b, kind_b)
    rows = []
    for key in list(va) + [k for k in vb if k not in va]:
        x, direction = va.get(key, (None, None))
        y, direction_b = vb.get(key, (None, None))
        direction = direction or direction_b
        delta = y - x if x is not None and y is not None else None
        # No percentage from a zero baseline (JSON has no infinity); --fail-on KEY:N% then fails on any worsening.
        pct = (delta / abs(x) * 100 if x else (0.0 if delta == 0 else None)) if delta is not None else None
        verdict = ""
        if delta is not None and direction:
            worse = delta > 0 if direction == LOWER else delta < 0
            verdict = "same" if delta == 0 else "worse" if worse else "better"
        rows.append({"key": key, "a": x, "b": y, "delta": delta, "delta_pct": pct, "direction": direction,
                     "verdict": verdict})
    return {"kind": kind_a, "a": a_name, "b": b_name, "rows": rows}


def _differences(label: str, x, y) -> list[str]:
    if not isinstance(x, dict) or not isinstance(y, dict):
        return [] if x == y else [f"{label}: {x!r} vs {y!r}"]
    return [f"{label}.{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]


def invalid_runs(a: dict, b: dict, *, a_name: str = "A", b_name: str = "B") -> list[str]:
    """One line per run marked invalid (`valid` false), with its reasons."""
    out = []
    for side, name, report in (("A", a_name, a), ("B", b_name, b)):
        if report.get("valid") is False:
            reasons = "; ".join(str(r) for r in report.get("invalid_reasons") or []) or "no reason given"
            out.append(f"{side} ({name}) is an invalid run: {reasons}")
    return out


def comparability_warnings(a: dict, b: dict, *, a_name: str = "A", b_name: str = "B") -> list[str]:
    """Why a comparison may mislead: an invalid run, or different load, workload or target."""
    warnings = invalid_runs(a, b, a_name=a_name, b_name=b_name)
    if a.get("kind") != SERVING_KIND:
        return warnings
    diffs = _differences("scenario", a.get("scenario"), b.get("scenario"))
    load_a, load_b = dict(a.get("load") or {}), dict(b.get("load") or {})
    if load_a.get("mode") == load_b.get("mode") == "sweep":      # a sweep's rate is its result, not a setting
        load_a.pop("rate", None), load_b.pop("rate", None)
    diffs += _differences("load", load_a, load_b)
    wa, wb = a.get("workload") or {}, b.get("workload") or {}
    diffs += _differences("workload", wa.get("settings", wa), wb.get("settings", wb))
    ta, tb = a.get("target") or {}, b.get("target") or {}
    diffs += _differences("target", {k: ta.get(k) for k in ("backend", "model")},
                          {k: tb.get(k) for k in ("backend", "model")})
    if diffs:
        warnings.append("the runs differ in settings, so deltas mix the change with the setting: " + "; ".join(diffs))
    return warnings


@dataclass(frozen=True)
class FailOn:
    """B may be worse than A on `key` by at most `threshold`: percent of A if `relative`, else the key's unit."""

    key: str
    threshold: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> FailOn:
        key, sep, limit = text.strip().rpartition(":")
        relative = limit.strip().endswith("%")
        try:
            threshold = float(limit.strip().removesuffix("%"))
        except ValueError:
            threshold = math.nan
        if not sep or not key or not math.isfinite(threshold) or threshold < 0:
            raise UserInputError(f"--fail-on {text!r}: expected KEY:PERCENT% or KEY:AMOUNT with a number >= 0, "
                                 "e.g. p99_ttft_ms:10% or p99_ttft_ms:5 (ms)")
        return cls(key.strip(), threshold, relative)

    def __str__(self) -> str:
        return f"{self.key}:{self.threshold:g}{'%' if self.relative else ''}"


def check_fail_on(comparison: dict, rules: list[FailOn]) -> list[str]:
    """One message per rule that B broke; a key that is unknown, unjudged or missing a value is a UserInputError."""
    rows = {r["key"]: r for r in comparison["rows"]}
    failures = []
    for rule in rules:
        row = rows.get(rule.key)
        if row is None:
            close = difflib.get_close_matches(rule.key, list(rows), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; keys look like {next(iter(rows), '?')}"
            raise UserInputError(f"--fail-on {rule}: no key {rule.key!r} in a {comparison['kind']} report{hint}")
        if not row["direction"]:
            raise UserInputError(f"--fail-on {rule}: {rule.key} is shown but not judged (neither lower nor higher is "
                                 "better); choose a latency, throughput or goodput key")
        if row["delta"] is None:
            raise UserInputError(f"--fail-on {rule}: {rule.key} is missing from {'A' if row['a'] is None else 'B'}")
        worse_by = row["delta"] if row["direction"] == LOWER else -row["delta"]
        pct = row["delta_pct"]
        worse_pct = None if pct is None else pct if row["direction"] == LOWER else -pct
        if rule.relative:
            over = worse_by > 0 if worse_pct is None else worse_pct > rule.threshold
        else:
            over = worse_by > rule.threshold
        if over:
            how = "from a baseline of 0" if worse_pct is None else f"{worse_pct:+.1f}% worse"
            failures.append(f"{rule.key} regressed by {abs(row['delta']):.4g} ({how}): "
                            f"{row['a']:.4g} -> {row['b']:.4g}, allowed {rule.threshold:g}"
                            f"{'%' if rule.relative else ''} ({row['direction']} is better)")
    return failures


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}%" if pct else f"{v:.5g}"


def render_compare_markdown(comparison: dict, failures: list[str], warnings: list[str] = ()) -> str:
    lines = [f"# Benchmark comparison ({comparison['kind']})", "", f"- A: `{comparison['a']}`",
             f"- B: `{comparison['b']}`", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in warnings] + [""]
    lines += [ "| key | A | B | delta | delta % | verdict |", "|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['key']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['delta'])} | "
                     f"{_fmt(r['delta_pct'], pct=True)} | {r['verdict'] or '-'} |")
    lines += ["", "Delta = B - A; delta % = delta / |A|. Latency keys: lower is better; throughput and goodput "
              "keys: higher is better; `worse` marks a regression of B against A.", ""]
    if failures:
        lines += ["## --fail-on thresholds exceeded", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)


def print_comparison(comparison: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{comparison['kind']}: A {comparison['a']}  vs  B {comparison['b']}")
    for col in ("key", "A", "B", "delta", "delta %", ""):
        table.add_column(col, justify="left" if col in ("key", "") else "right")
    style = {"worse": "[red]worse[/red]", "better": "[green]better[/green]", "same": "same"}
    for r in comparison["rows"]:
        table.add_row(r["key"], _fmt(r["a"]), _fmt(r["b"]), _fmt(r["delta"]), _fmt(r["delta_pct"], pct=True),
                      style.get(r["verdict"], ""))
    Console().print(table)


def cmd_report_compare(args) -> int:
    rules = [FailOn.parse(t) for t in args.fail_on]
    a, b = read_report(args.a), read_report(args.b)
    comparison = compare_reports(a, b, a_name=str(args.a), b_name=str(args.b))
    failures = check_fail_on(comparison, rules)   # bad keys raise before anything is printed or written
    warnings = comparability_warnings(a, b, a_name=str(args.a), b_name=str(args.b))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    invalid = invalid_runs(a, b, a_name=str(args.a), b_name=str(args.b))
    if rules and invalid:
        raise UserInputError(f"--fail-on cannot be decided: {invalid[0]}")
    result = {**comparison, "warnings": warnings, "fail_on": [str(r) for r in rules], "failures": failures,
              "passed": not failures}
    if args.output:
        from inferforge.fileio import atomic_write_json, atomic_write_text

        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--output {out}: a file is there; give a directory")
        atomic_write_text(out / "compare.md", render_compare_markdown(comparison, failures, warnings))
        atomic_write_json(out / "compare.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_comparison(comparison)
        if args.output:
            print(f"written: {Path(args.output) / 'compare.md'}\n         {Path(args.output) / 'compare.json'}")
    if failures:
        raise GateFailed("; ".join(failures))
    return 0


def cmd_report_html(args) -> int:
    from inferforge.bench.html_report import read_requests, write_html

    report = read_report(args.run)
    if report.get("kind") != SERVING_KIND:
        raise UserInputError(f"{args.run}: a report of kind {report.get('kind')!r}; report html renders "
                             f"{SERVING_KIND} reports (the load benchmark's output directory)")
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    requests_file = run_dir / "requests.jsonl"
    try:
        requests = read_requests(requests_file) if requests_file.is_file() else []
    except json.JSONDecodeError as e:
        raise UserInputError(f"{requests_file}: a line is not valid JSON ({e})") from None
    path = write_html(Path(args.output) if args.output else run_dir, report, requests)
    print(f"report: {path}" + ("" if requests else " (no requests.jsonl: no distribution plots)"))
    return 0


def _report_help(parser):
    def show(args) -> int:
        parser.print_help()
        return 2
    return show


def add_report_parser(sub, fmt) -> None:
    """The `report` command group: `report compare A B` and `report html RUN_DIR`."""
    p = sub.add_parser("report", formatter_class=fmt, help="compare benchmark reports; render report.html",
                       description="Work with the reports benchmarks write: compare two of them side by side "
                                   "(with thresholds for CI), or render an LLM serving benchmark as one HTML file.")
    p.set_defaults(func=_report_help(p))
    rsub = p.add_subparsers(dest="report_command", metavar="SUBCOMMAND", parser_class=type(p))
    c = rsub.add_parser("compare", formatter_class=fmt, help="two report.json side by side: A, B, delta, delta %%",
                        description="Compare benchmark B with baseline A: every metric with its delta; latency higher "
                                    "is worse, throughput and goodput lower is worse. Exit 1 when a --fail-on "
                                    "threshold is exceeded, 2 on a bad key, a missing file or a report of another kind.",
                        epilog="examples:\n  inferforge report compare runs/base runs/new\n"
                               "  inferforge report compare runs/base runs/new --fail-on p99_ttft_ms:10% "
                               "--fail-on request_throughput:5%\n"
                               "  inferforge report compare runs/base runs/new --fail-on p99_tpot_ms:2 --output cmp")
    c.add_argument("a", metavar="DIR_A", help="baseline: a benchmark output directory or its report.json")
    c.add_argument("b", metavar="DIR_B", help="candidate: a benchmark output directory or its report.json")
    c.add_argument("--fail-on", action="append", default=[], metavar="KEY:THRESHOLD",
                   help="exit 1 when B is worse than A on KEY by more than THRESHOLD: 10%% is relative to A, a plain "
                        "number is in the key's unit (ms for latency keys, req/s or tok/s for throughput); repeatable "
                        "(default: none, only the table)")
    c.add_argument("-o", "--output", metavar="DIR", help="also write DIR/compare.md and DIR/compare.json (default: nothing "
                                                   "is written)")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout instead of the table")
    c.set_defaults(func=cmd_report_compare)
    h = rsub.add_parser("html", formatter_class=fmt, help="render an LLM serving benchmark as one report.html",
                        description="Read RUN_DIR/report.json and RUN_DIR/requests.jsonl and write a self-contained "
                                    "report.html (inline SVG plots, no scripts, nothing fetched).",
                        epilog="example:\n  inferforge report html runs/loadbench-1")
    h.add_argument("run", metavar="RUN_DIR", help="the load benchmark's output directory (or its report.json)")
    h.add_argument("-o", "--output", metavar="DIR", help="directory for report.html (default: RUN_DIR)")
    h.set_defaults(func=cmd_report_html)
