"""One self-contained `report.html` for an LLM serving benchmark (`report.json` + `requests.jsonl`).

No JavaScript, no stylesheet or font from elsewhere: the CSS is inline and every plot is an inline
SVG drawn by `inferforge.bench.svg_plots`. What a reader sees first: a red banner when the run is
invalid, saturated or missed a target, then the plots (latency CDFs with the targets as lines,
percentiles with their bootstrap CIs, and for a rate sweep latency against achieved throughput with
the largest rate that met the targets marked), then the tables (metrics with CIs, targets, sweep,
settings, environment, definitions). Every string from the report or the requests (model names,
error messages, settings) is HTML-escaped.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from inferforge.bench.svg_plots import (
    FAIL_COLOUR,
    PASS_COLOUR,
    Chart,
    RefLine,
    Series,
    cdf_points,
    fmt_number,
    render_chart,
)

HTML_NAME = "report.html"
METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL"))
STATS = ("mean", "median", "std", "p90", "p95", "p99")
PERCENTILE_CATEGORIES = ("mean", "median", "p90", "p95", "p99")
MAX_ERRORS_SHOWN = 20

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1360px;padding:0 16px;color:#1d1d1d;background:#fafafa;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
.sub{color:#555;margin-top:0}
.banner{padding:10px 14px;margin:8px 0;border-radius:4px;font-weight:600}
.banner.bad{background:#fde2e1;border:2px solid #c62828;color:#8e0000}
.banner.warn{background:#fff4d6;border:1px solid #d79b00;color:#6b4e00}
.banner.good{background:#e3f5e9;border:1px solid #2e7d32;color:#1b5e20}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px}
svg.chart{font-size:12px;font-family:inherit}
svg .chart-title{font-size:14px;font-weight:600}svg .tick{fill:#444}svg .axis-label{fill:#222}
table{border-collapse:collapse;margin:8px 0;background:#fff}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#666;font-size:.85em;display:block}
.pass{color:#1b5e20;font-weight:600}.fail{color:#b71c1c;font-weight:600}.warn{color:#6b4e00;font-weight:600}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
pre{white-space:pre-wrap;margin:0}
"""


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _rate(point: dict):
    """A sweep point's offered rate (requests/s): `load.rate` in report.json."""
    return (point.get("load") or {}).get("rate", point.get("rate"))


def _shape(point: dict) -> str:
    """A sweep point's marker: a cross when the point was invalid (e.g. saturated), else a circle."""
    return "cross" if point.get("valid", True) is False else "circle"


def _met(point: dict) -> bool:
    """A sweep point met its targets: every target passed and the run was valid (not saturated)."""
    return bool(point.get("passed")) and point.get("valid", True) is not False


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else "-inf" if value < 0 else "NaN"
        return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    return _e(value)


def normalize_metric(metric) -> str:
    """'ttft', 'TTFT', 'ttft_ms' -> 'ttft_ms'; 'e2e' and 'e2el' -> 'e2el_ms'."""
    m = str(metric).strip().lower()
    m = m if m.endswith("_ms") else f"{m}_ms"
    return "e2el_ms" if m == "e2e_ms" else m


def normalize_percentile(percentile) -> str:
    """99, 99.0, '99', 'p99' -> 'p99'; 50 and 'p50' -> 'median' (the report's key)."""
    p = str(percentile).strip().lower()
    if p in ("median", "mean"):
        return p
    value = float(p.removeprefix("p"))
    text = f"p{int(value)}" if value.is_integer() else f"p{value:g}"
    return "median" if text == "p50" else text


def target_key(target: dict) -> tuple[str, str]:
    """(metric key such as 'ttft_ms', statistic such as 'p99') of a target entry."""
    return normalize_metric(target["metric"]), normalize_percentile(target["percentile"])


def metric_samples(requests: list[dict], metric: str) -> list[float]:
    """The per-request (ITL: per-gap) samples of a metric over the successful requests."""
    values: list[float] = []
    for r in requests:
        if not r.get("success", True):
            continue
        v = r.get(metric)
        if isinstance(v, list):
            values.extend(float(x) for x in v if x is not None)
        elif v is not None:
            values.append(float(v))
    return values


def _targets_for(report: dict, metric: str) -> list[tuple[str, dict]]:
    out = []
    for t in report.get("targets") or []:
        m, stat = target_key(t)
        if m == metric and t.get("limit_ms") is not None:
            out.append((stat, t))
    return out


def _target_label(stat: str, label: str, limit) -> str:
    return f"target: {stat} {label} <= {fmt_number(float(limit))} ms"


# ---------------------------------------------------------------------------------------------- plots
def cdf_charts(report: dict, requests: list[dict]) -> list[Chart]:
    charts = []
    for metric, label in METRICS:
        samples = metric_samples(requests, metric)
        xs, ys = cdf_points(samples)
        if xs.size == 0:
            continue
        unit = "inter-token gaps" if metric == "itl_ms" else "requests"
        chart = Chart(title=f"{label} CDF ({len(samples):,} {unit})",
                      x_label=f"{label} (ms)", y_label=f"share of {unit} <= x", y_min=0.0, y_max=1.0, x_min=0.0,
                      series=[Series(label, xs.tolist(), ys.tolist(), step=True)])
        for stat, t in _targets_for(report, metric):
            chart.refs.append(RefLine("x", float(t["limit_ms"]), _target_label(stat, label, t["limit_ms"])))
            if stat.startswith("p"):
                level = float(stat[1:]) / 100
                chart.refs.append(RefLine("y", level, f"{stat} level ({level:g} of {unit})", colour="#777777",
                                          kind="level"))
        charts.append(chart)
    return charts


def percentile_charts(report: dict) -> list[Chart]:
    ci = report.get("ci") or {}
    charts = []
    for metric, label in METRICS:
        stats = [s for s in PERCENTILE_CATEGORIES if report.get(f"{s}_{metric}") is not None]
        if not stats:
            continue
        values = [float(report[f"{s}_{metric}"]) for s in stats]
        whiskers = [tuple(ci[f"{s}_{metric}"]) if ci.get(f"{s}_{metric}") else None for s in stats]
        chart = Chart(title=f"{label} percentiles with 95% bootstrap CIs", x_label="statistic",
                      y_label=f"{label} (ms)", x_categories=list(stats),
                      series=[Series(f"{label} (whiskers: 95% CI)", list(range(len(stats))), values,
                                     line=False, markers=True, whiskers=whiskers)])
        for stat, t in _targets_for(report, metric):
            chart.refs.append(RefLine("y", float(t["limit_ms"]), _target_label(stat, label, t["limit_ms"])))
        charts.append(chart)
    return charts


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sweep_charts(report: dict) -> list[Chart]:
    sweep = [s for s in report.get("sweep") or [] if _finite(s.get("request_throughput"))]
    if not sweep:
        return []
    sweep.sort(key=lambda s: s["request_throughput"])
    max_rate = report.get("max_rate_meeting_targets")
    best = next((s for s in sweep if max_rate is not None and _rate(s) == max_rate), None)
    charts = []
    for metric, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        stats = ["p99"] + [s for s, _ in _targets_for(report, metric) if s != "p99"]
        x = [s["request_throughput"] for s in sweep]
        colours = [PASS_COLOUR if _met(s) else FAIL_COLOUR for s in sweep]
        shapes = [_shape(s) for s in sweep]
        series = [Series(f"{stat} {label} (points: green met the targets, red: missed or invalid; x = invalid)", x,
                         [s.get(f"{stat}_{metric}") for s in sweep], markers=True, point_colours=colours,
                         point_shapes=shapes)
                  for stat in dict.fromkeys(stats)]
        chart = Chart(title=f"Sweep: {label} against achieved request rate", x_label="achieved requests/s",
                      y_label=f"{label} (ms)", series=series, x_min=0.0)
        for stat, t in _targets_for(report, metric):
            chart.refs.append(RefLine("y", float(t["limit_ms"]), _target_label(stat, label, t["limit_ms"])))
        if best is not None:
            chart.refs.append(RefLine("x", float(best["request_throughput"]),
                                      f"max rate meeting targets: {fmt_number(float(max_rate))} req/s offered, "
                                      f"{fmt_number(float(best['request_throughput']))} achieved",
                                      colour="#009E73", kind="max-rate"))
        charts.append(chart)
    offered = [s for s in sweep if _finite(_rate(s))]
    if offered:
        top = max(max(_rate(s) for s in offered), max(s["request_throughput"] for s in offered))
        chart = Chart(title="Sweep: achieved against offered request rate", x_label="offered requests/s",
                      y_label="achieved requests/s", x_min=0.0,
                      series=[Series("achieved", [_rate(s) for s in offered],
                                     [s["request_throughput"] for s in offered], markers=True,
                                     point_colours=[PASS_COLOUR if _met(s) else FAIL_COLOUR for s in offered],
                                     point_shapes=[_shape(s) for s in offered]),
                              Series("achieved = offered", [0.0, top], [0.0, top], colour="#999999")])
        charts.append(chart)
    return charts


def _figures(charts: list[Chart], prefix: str) -> str:
    return "<div class=\"plots\">" + "".join(
        f"<figure>{render_chart(c, f'{prefix}-{i}')}</figure>" for i, c in enumerate(charts)) + "</div>"


# ---------------------------------------------------------------------------------------------- tables
def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(text: str, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def _value_text(value) -> str:
    if isinstance(value, (dict, list)):
        return f"<pre>{_e(json.dumps(value, indent=1, default=str))}</pre>"
    return _num(value) if isinstance(value, (int, float)) else _e(value)


def _kv_table(data: dict, cls: str) -> str:
    return _table(["setting", "value"], [[_td(f"<code>{_e(k)}</code>"), _td(_value_text(v))]
                                         for k, v in (data or {}).items()], cls)


def _ci_text(ci) -> str:
    return f'<span class="ci">95% CI [{_num(ci[0])}, {_num(ci[1])}]</span>' if ci else ""


def metrics_table(report: dict) -> str:
    ci = report.get("ci") or {}
    rows = []
    for metric, label in METRICS:
        cells = [_td(f"{label} (ms)")]
        for stat in STATS:
            key = f"{stat}_{metric}"
            cells.append(_td(_num(report.get(key)) + _ci_text(ci.get(key)), num=True))
        rows.append(cells)
    return _table(["metric"] + list(STATS), rows, "metrics")


def summary_table(report: dict) -> str:
    rows = [("completed requests", report.get("completed")), ("failed requests", report.get("failed")),
            ("duration (s)", report.get("duration")), ("total input tokens", report.get("total_input_tokens")),
            ("total output tokens", report.get("total_output_tokens")),
            ("request throughput (req/s)", report.get("request_throughput")),
            ("output throughput (tok/s)", report.get("output_throughput")),
            ("total token throughput (tok/s)", report.get("total_token_throughput")),
            ("request goodput (req/s meeting all targets)", report.get("request_goodput"))]
    cells = [[_td(_e(k)), _td(_num(v), num=True)] for k, v in rows]
    if not report.get("targets") and report.get("request_goodput") is None:
        cells[-1][1] = _td("- (no targets)", num=True)
    return _table(["quantity", "value"], cells, "summary")


def targets_table(report: dict) -> str:
    rows = []
    for t in report.get("targets") or []:
        metric, stat = target_key(t)
        ok = t.get("passed")
        if _insufficient(t):
            verdict = (f'<span class="warn">insufficient samples</span> ({_e(t.get("samples"))} of '
                       f'{_e(t.get("needed", "?"))} needed)')
            miss = "-"
        else:
            verdict = '<span class="pass">PASS</span>' if ok else '<span class="fail">MISS</span>'
            miss = "-" if ok else f"{_num(t.get('miss_by_ms'))} ms ({_num(t.get('miss_by_pct'), 1)}%)"
        rows.append([_td(_e(metric)), _td(_e(stat)), _td(_num(t.get("limit_ms")), num=True),
                     _td(_num(t.get("measured")), num=True),
                     _td(f"[{_num(t['ci'][0])}, {_num(t['ci'][1])}]" if t.get("ci") else "-", num=True),
                     _td(verdict), _td(miss, num=True)])
    return _table(["metric", "statistic", "limit (ms)", "measured (ms)", "95% CI", "result", "missed by"], rows,
                  "targets")


def sweep_table(report: dict) -> str:
    headers = ["offered req/s", "achieved req/s", "output tok/s", "p99 TTFT (ms)", "p99 TPOT (ms)",
               "p99 ITL (ms)", "p99 E2EL (ms)", "targets"]
    rows = []
    for s in report.get("sweep") or []:
        verdict = ('<span class="pass">met</span>' if _met(s) else '<span class="fail">missed</span>' if s.get("valid", True)
                   else '<span class="fail">invalid</span>')
        rows.append([_td(_num(_rate(s)), num=True)]
                    + [_td(_num(s.get(k)), num=True) for k in ("request_throughput", "output_throughput",
                                                               "p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms",
                                                               "p99_e2el_ms")]
                    + [_td(verdict)])
    return _table(headers, rows, "sweep")


def errors_table(requests: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in requests:
        if not r.get("success", True):
            key = str(r.get("error") or "unknown error")
            counts[key] = counts.get(key, 0) + 1
    rows = [[_td(f"<pre>{_e(err)}</pre>"), _td(str(n), num=True)]
            for err, n in sorted(counts.items(), key=lambda kv: -kv[1])[:MAX_ERRORS_SHOWN]]
    return _table(["error", "requests"], rows, "errors")


def _insufficient(t: dict) -> bool:
    return t.get("status") == "insufficient samples"


def banners(report: dict, requests: list[dict]) -> list[str]:
    """One red banner at most for validity: a saturated run is invalid, so saturation is said inside it."""
    out = []
    saturation = report.get("saturation") or {}
    sat_text = ""
    if saturation.get("saturated"):
        details = saturation.get("details")
        text = details if isinstance(details, str) else json.dumps(details, default=str)
        sat_text = ("SATURATED: the load generator or server could not keep up with the offered load; latencies "
                    f"include queueing. {text}")
    if report.get("valid") is False:
        reasons = [str(r) for r in report.get("invalid_reasons") or [] if not (sat_text and
                                                                               str(r).startswith("saturated:"))]
        body = "; ".join(([sat_text] if sat_text else []) + reasons) or "no reason given"
        out.append(f'<div class="banner bad" id="invalid">INVALID RUN: {_e(body)}</div>')
    elif sat_text:
        out.append(f'<div class="banner bad" id="saturated">{_e(sat_text)}</div>')
    if report.get("targets"):
        undecided = [f"{stat} {m}" for t in report["targets"] if _insufficient(t) for m, stat in [target_key(t)]]
        missed = [f"{stat} {m}" for t in report["targets"] if not t.get("passed") and not _insufficient(t)
                  for m, stat in [target_key(t)]]
        if report.get("passed"):
            out.append('<div class="banner good" id="verdict">All latency targets met.</div>')
        elif missed:
            out.append(f'<div class="banner bad" id="verdict">TARGETS MISSED: {_e(", ".join(missed))}</div>')
        if undecided:
            out.append(f'<div class="banner warn" id="undecided">Not decided, too few samples for the statistic: '
                       f'{_e(", ".join(undecided))}; raise --num-requests</div>')
    busy = (report.get("environment") or {}).get("busy_warning")
    if busy:
        out.append(f'<div class="banner warn" id="busy">Busy machine: {_e(busy)}</div>')
    for w in report.get("sample_warnings") or []:
        out.append(f'<div class="banner warn sample-warning">{_e(w)}</div>')
    failed = sum(1 for r in requests if not r.get("success", True)) or report.get("failed") or 0
    if failed:
        out.append(f'<div class="banner warn" id="failed">{failed} request(s) failed; see "Failed requests".</div>')
    return out


# ---------------------------------------------------------------------------------------------- page
def render_html(report: dict, requests: list[dict]) -> str:
    """The whole report as one HTML document (a str): inline CSS and SVG, no scripts, no external links."""
    target = report.get("target") or {}
    load = report.get("load") or {}
    title = f"LLM serving benchmark: {target.get('model', '?')} ({target.get('backend', '?')})"
    load_text = ", ".join(f"{k} {v}" for k, v in load.items() if v is not None)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f'<p class="sub">created {_e(report.get("created"))} &middot; scenario {_e(report.get("scenario"))} '
             f'&middot; load: {_e(load_text)}</p>']
    parts += banners(report, requests)
    parts += ["<h2>Summary</h2>", summary_table(report), "<h2>Latency metrics</h2>", metrics_table(report)]
    if report.get("targets"):
        parts += ["<h2>Targets</h2>", targets_table(report)]
    if report.get("sweep") and any("rate" in r for r in requests):
        # A sweep's summary is one point (its rate is load.rate): its distributions are that point's requests.
        requests = [r for r in requests if r.get("rate") == load.get("rate")]
    cdfs = cdf_charts(report, requests)
    if cdfs:
        heading = "Latency distributions" + (f" at {load.get('rate')} requests/s" if report.get("sweep") else "")
        parts += [f"<h2>{_e(heading)}</h2>", _figures(cdfs, "cdf")]
    pcts = percentile_charts(report)
    if pcts:
        parts += ["<h2>Percentiles</h2>", _figures(pcts, "pct")]
    if report.get("sweep"):
        max_rate = report.get("max_rate_meeting_targets")
        parts += ["<h2>Rate sweep</h2>",
                  f'<p id="max-rate">Largest offered rate that met every target: '
                  f'<strong>{_num(max_rate) if max_rate is not None else "none"}</strong> req/s.</p>',
                  _figures(sweep_charts(report), "sweep"), sweep_table(report)]
    if any(not r.get("success", True) for r in requests):
        parts += ["<h2>Failed requests</h2>", errors_table(requests)]
    parts += ["<h2>Settings</h2>",
              _kv_table({"target": target, "scenario": report.get("scenario"), "load": load,
                         **{f"workload.{k}": v for k, v in (report.get("workload") or {}).items()}}, "settings"),
              "<h2>Environment</h2>", _kv_table(report.get("environment") or {}, "environment"),
              "<h2>Definitions</h2>", "<dl>"]
    for name, formula in (report.get("definitions") or {}).items():
        parts.append(f"<dt><strong>{_e(name)}</strong></dt><dd>{_e(formula)}</dd>")
    parts += ["</dl>", "</body></html>"]
    return "\n".join(parts) + "\n"


def read_requests(path: str | Path) -> list[dict]:
    """requests.jsonl: one JSON object per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_html(out_dir: Path, report: dict, requests: list[dict]) -> Path:
    """Write `out_dir/report.html` atomically; returns its path."""
    from inferforge.fileio import atomic_write_text

    return atomic_write_text(Path(out_dir) / HTML_NAME, render_html(report, requests))
