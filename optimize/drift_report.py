"""The drift report as Markdown and as one self-contained HTML page (inline SVG, no scripts).

Each feature gets its before/after histogram (share of texts per PSI bin: the calibration snapshot
against the new texts) and, for numeric features, both empirical CDFs (what the KS test compares).
"""

from __future__ import annotations

from html import escape

from inferforge.bench.svg_plots import Chart, Series, cdf_points, render_chart

RULE = ("a feature drifts when PSI >= {psi} (bands: < {psi_moderate} none, {psi_moderate}-{psi} moderate, >= {psi} "
        "significant; {bins}, epsilon {psi_epsilon}), or when the two-sample KS test (scipy.stats.ks_2samp) has "
        "p < {ks_alpha} and statistic D >= {ks_min_statistic}; a layer drifts when more than {max_out_of_range:.2%} "
        "of its activation values fall outside the calibrated [min, max]; the [UNK] rate when it rises by more than "
        "{max_unknown_rate_increase:.2%}; the accuracy gate when a manifest limit is missed on the new texts")


def rule_text(thresholds: dict) -> str:
    return RULE.format(bins="numeric bins at the reference's quantiles, about 40 reference values per bin (4-10 bins)",
                       **thresholds)


def _edge(v: float) -> str:
    """An edge with 3 significant digits (`-0.0227`, `0.00671`, `1.23e+04`)."""
    return "0" if v == 0 else f"{v:.3g}"


def _bin_labels(feature: dict) -> list[str]:
    """Bin labels in interval notation. The bins are those of `drift_stats.bin_counts`: (-inf, e_1],
    (e_1, e_2], ..., (e_k, +inf), so the outer ones read `<= e_1` and `> e_k`."""
    if "labels" in feature:
        return feature["labels"]
    edges = [_edge(e) for e in feature["edges"]]
    return [f"<= {edges[0]}", *[f"({a}, {b}]" for a, b in zip(edges, edges[1:])], f"> {edges[-1]}"]


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts) or 1
    return [c / total for c in counts]


def render_markdown(report: dict) -> str:
    verdict = "DRIFT" if report["drift"] else "no drift"
    lines = [f"# Drift check: {verdict}", "",
             f"Artifact `{report['artifact']}` ({report['kind']}): {report['texts']} new texts against "
             f"{report['reference_texts']} calibration texts.", "", f"Rule: {rule_text(report['thresholds'])}.", ""]
    if report["drifted"]:
        lines += ["## Drifted", ""] + [f"- **{d['what']}**: {d['reason']}" for d in report["drifted"]] + [""]
    lines += ["## Features", "", "| feature | PSI | band | KS D | KS p | mean (calibration -> new) | drift |",
              "|---|---|---|---|---|---|---|"]
    for f in report["features"]:
        ks = (f"{f['ks_statistic']:.3f} | {f['ks_pvalue']:.2g}" if "ks_statistic" in f else "- | -")
        means = f"{f['reference_mean']:.4g} -> {f['new_mean']:.4g}" if "new_mean" in f else "-"
        lines.append(f"| {f['name']} | {f['psi']:.3f} | {f['psi_band']} | {ks} | {means} | "
                     f"{'yes' if f['drift'] else 'no'} |")
    unk = report["unknown_token_rate"]
    lines += ["", f"[UNK] token rate: {unk['reference']:.3%} in calibration, {unk['new']:.3%} new.", ""]
    lines += ["## Activations outside the calibrated range", "",
              "Share of a layer's input values (real tokens) outside the [min, max] seen on calibration: the values "
              "a static int8 scale fixed on calibration would clip.", "",
              "| layer | calibrated range | new range | outside | drift |", "|---|---|---|---|---|"]
    for a in sorted(report["activations"], key=lambda a: -a["outside_share"]):
        lines.append(f"| `{a['layer']}` | [{a['calibrated_min']:.3g}, {a['calibrated_max']:.3g}] | "
                     f"[{a['new_min']:.3g}, {a['new_max']:.3g}] | {a['outside_share']:.4%} | "
                     f"{'yes' if a['drift'] else 'no'} |")
    gate = report.get("gate")
    lines += ["", "## Accuracy gate on the new texts", ""]
    if not gate:
        lines.append("Not checked (--no-gate, or a language model: no float reference is re-run).")
    elif not gate["available"]:
        lines.append(gate["note"] + ".")
    else:
        lines += [f"- {c['name']}: {c['measured']:.4f} (required {c['op']} {c['limit']}) "
                  f"{'ok' if c['passed'] else 'MISSED'}" for c in gate["checks"]]
        lines.append(f"- reference: the float source model at `{gate['reference']}`")
    lines += [""] + [f"Note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def _charts(feature: dict, index: int) -> str:
    labels = _bin_labels(feature)
    hist = Chart(title=f"{feature['name']}: share per bin", x_label="bin", y_label="share of the sample",
                 x_categories=labels, y_min=0,
                 width=max(640, 70 * len(labels) + 90),
                 series=[Series("calibration", list(range(len(labels))), _shares(feature["reference_counts"]),
                                bars=True),
                         Series("new texts", list(range(len(labels))), _shares(feature["new_counts"]), bars=True)])
    out = render_chart(hist, f"hist-{index}")
    if "new_values" in feature:
        series = []
        for name, values in (("calibration", feature["reference_values"]), ("new texts", feature["new_values"])):
            x, y = cdf_points(values)
            series.append(Series(name, x.tolist(), y.tolist(), step=True))
        out += render_chart(Chart(title=f"{feature['name']}: empirical CDFs (KS D = {feature['ks_statistic']:.3f})",
                                  x_label=feature["name"], y_label="share <= x", series=series, y_min=0, y_max=1),
                            f"cdf-{index}")
    return out


def render_html(report: dict) -> str:
    verdict = "DRIFT" if report["drift"] else "no drift"
    body = [f"<h1>Drift check: {escape(verdict)}</h1>",
            f"<p>Artifact <code>{escape(report['artifact'])}</code> ({escape(report['kind'])}): {report['texts']} new "
            f"texts against {report['reference_texts']} calibration texts.</p>",
            f"<p>Rule: {escape(rule_text(report['thresholds']))}.</p>"]
    if report["drifted"]:
        body.append("<h2>Drifted</h2><ul>" + "".join(f"<li><b>{escape(d['what'])}</b>: {escape(d['reason'])}</li>"
                                                      for d in report["drifted"]) + "</ul>")
    for i, f in enumerate(report["features"]):
        ks = f", KS D {f['ks_statistic']:.3f} (p {f['ks_pvalue']:.2g})" if "ks_statistic" in f else ""
        body.append(f"<section><h2>{escape(f['name'])}: PSI {f['psi']:.3f} ({escape(f['psi_band'])}){escape(ks)}"
                    f"{' - DRIFT' if f['drift'] else ''}</h2>{_charts(f, i)}</section>")
    md_tables = render_markdown(report).split("## Activations outside the calibrated range", 1)[1]
    body.append("<h2>Activations outside the calibrated range, accuracy gate</h2><pre>" + escape(md_tables) + "</pre>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Drift check</title><style>body{font-family:"
            "sans-serif;max-width:1400px;margin:auto}svg{display:inline-block;margin:4px}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
