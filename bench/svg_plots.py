"""Inline SVG charts written by hand: no matplotlib, no JavaScript, nothing fetched when the page opens.

A chart is a list of series drawn on linear axes with 1-2-5 ticks, optional reference lines (latency
targets, a marked rate), a legend, a `<title>` and an `aria-label`. Every string that reaches the
SVG goes through `html.escape`. Series, reference lines and points carry `data-*` attributes and
class names (`series`, `ref-line`, `whisker`) so a test can find them in the rendered DOM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
TARGET_COLOUR = "#D55E00"
PASS_COLOUR, FAIL_COLOUR = "#009E73", "#D55E00"
MAX_CDF_POINTS = 2000


def cdf_points(values, max_points: int | None = MAX_CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF of `values`: x = the sorted values, y = (i + 1) / n, the share of samples <= x.

    NaN and None are dropped. With more than `max_points` samples, evenly spaced ranks are kept
    (always the first and the last), each still an exact (value, rank / n) pair."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = np.sort(a[~np.isnan(a)])
    n = a.size
    y = np.arange(1, n + 1, dtype=np.float64) / max(n, 1)
    if max_points and n > max_points:
        keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
        return a[keep], y[keep]
    return a, y


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def fmt_number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"


@dataclass
class Series:
    """One line or set of points. `step` draws a CDF staircase; `whiskers` are (lo, hi) per point."""

    name: str
    x: list
    y: list
    colour: str | None = None
    step: bool = False
    line: bool = True
    markers: bool = False
    whiskers: list | None = None
    point_colours: list | None = None
    point_shapes: list | None = None     # "circle" (default) or "cross" per point
    bars: bool = False                   # on a categorical x axis: one bar per category, grouped with other bar series


@dataclass
class RefLine:
    """A labelled reference line: `axis` "x" draws it vertically at `value`, "y" horizontally."""

    axis: str
    value: float
    label: str
    colour: str = TARGET_COLOUR
    kind: str = "target"


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    x_categories: list | None = None      # categorical x axis: x values are indices into this list
    y_min: float | None = None
    y_max: float | None = None
    x_min: float | None = None
    width: int = 640
    height: int = 360


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _extent(values: list[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return (lo - 1, hi + 1) if lo == 0 else (lo * 0.9, hi * 1.1) if lo > 0 else (lo * 1.1, hi * 0.9)
    span = hi - lo
    return lo - span * pad, hi + span * pad


def render_chart(chart: Chart, chart_id: str) -> str:
    """The chart as one `<svg>` element (a `<figure>`-ready string)."""
    left, right, top, bottom = 70, 20, 40, 58
    legend_rows = len(chart.series) + len(chart.refs)
    bottom_legend = 18 * legend_rows + 8
    # Long category labels that would overlap are drawn slanted, with room made for them below the axis.
    slant = 0.0
    if chart.x_categories:
        longest = max(len(str(c)) for c in chart.x_categories) * 6.5
        if longest > (chart.width - left - right) / len(chart.x_categories) - 6:
            slant = longest * 0.6
    extra = int(slant)
    width, height = chart.width, chart.height + bottom_legend + extra
    plot_w, plot_h = width - left - right, chart.height - top - bottom

    xs = [float(v) for s in chart.series for v in s.x if _finite(v)]
    ys = [float(v) for s in chart.series for v in s.y if _finite(v)]
    ys += [float(w) for s in chart.series for pair in (s.whiskers or []) if pair for w in pair if _finite(w)]
    xs += [r.value for r in chart.refs if r.axis == "x"]
    ys += [r.value for r in chart.refs if r.axis == "y"]
    if chart.x_categories is not None:
        x_lo, x_hi = -0.5, len(chart.x_categories) - 0.5
        x_ticks = list(range(len(chart.x_categories)))
    else:
        x_lo, x_hi = _extent(xs or [0.0, 1.0])
        if chart.x_min is not None:
            x_lo = chart.x_min
        x_ticks = [t for t in nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi] or [x_lo, x_hi]
    y_lo, y_hi = _extent(ys or [0.0, 1.0])
    y_lo = chart.y_min if chart.y_min is not None else min(y_lo, 0.0) if all(v >= 0 for v in ys) else y_lo
    y_hi = chart.y_max if chart.y_max is not None else y_hi
    y_ticks = [t for t in nice_ticks(y_lo, y_hi) if y_lo - 1e-12 <= t <= y_hi + 1e-12]

    def px(v: float) -> float:
        return left + (float(v) - x_lo) / (x_hi - x_lo) * plot_w

    def py(v: float) -> float:
        return top + plot_h - (float(v) - y_lo) / (y_hi - y_lo) * plot_h

    title = escape(chart.title)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart_id)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{title}">',
           f"<title>{title}</title>",
           f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" class="chart-title">{title}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#888"/>']
    # Grid and ticks.
    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{escape(fmt_number(t))}</text>')
    for t in x_ticks:
        x = px(t)
        label = chart.x_categories[t] if chart.x_categories is not None else fmt_number(t)
        text = (f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">' if not slant else
                f'<text transform="translate({x + 4:.1f} {top + plot_h + 12}) rotate(-35)" text-anchor="end" '
                'class="tick">')
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#efefef"/>'
                   f'{text}{escape(str(label))}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 38 + extra}" text-anchor="middle" '
               f'class="axis-label">{escape(chart.x_label)}</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'class="axis-label">{escape(chart.y_label)}</text>')
    # Series, clipped to the plot area.
    clip = f"clip-{escape(chart_id)}"
    out.append(f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/></clipPath>')
    out.append(f'<g clip-path="url(#{clip})">')
    colours = []
    bar_series = [s for s in chart.series if s.bars]
    bar_w = 0.8 / max(len(bar_series), 1)   # in category units: a group fills 80% of its category
    for i, s in enumerate(chart.series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        colours.append(colour)
        if s.bars:
            offset = -0.4 + (bar_series.index(s) + 0.5) * bar_w
            base = py(min(max(0.0, y_lo), y_hi))
            out.append(f'<g class="series bars" data-series="{escape(s.name)}" data-points="{len(s.y)}">')
            for x, y in zip(s.x, s.y):
                if not (_finite(x) and _finite(y)):
                    continue
                x0, x1, yt = px(x + offset - bar_w / 2), px(x + offset + bar_w / 2), py(y)
                out.append(f'<rect class="bar" x="{x0:.1f}" y="{min(yt, base):.1f}" width="{x1 - x0:.1f}" '
                           f'height="{abs(base - yt):.1f}" fill="{colour}" data-value="{float(y):.6g}">'
                           f'<title>{escape(s.name)}: {escape(fmt_number(float(y)))}</title></rect>')
            out.append("</g>")
            continue
        # (index in the series, x px, y px): a point without a value is left out, its whisker and colour with it.
        pts = [(j, px(x), py(y)) for j, (x, y) in enumerate(zip(s.x, s.y)) if _finite(x) and _finite(y)]
        name = escape(s.name)
        out.append(f'<g class="series" data-series="{name}" data-points="{len(pts)}">')
        if s.line and len(pts) > 1:
            xy = [(x, y) for _, x, y in pts]
            if s.step:   # CDF: horizontal to the next x, then up
                path = [xy[0]]
                for a, b in zip(xy, xy[1:]):
                    path += [(b[0], a[1]), b]
                xy = path
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        for j, x, y in pts:
            if s.whiskers and j < len(s.whiskers) and s.whiskers[j] and all(_finite(w) for w in s.whiskers[j]):
                lo, hi = s.whiskers[j]
                out.append(f'<g class="whisker" stroke="{colour}" stroke-width="1.5">'
                           f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py(lo):.1f}" y2="{py(hi):.1f}"/>'
                           f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{py(lo):.1f}" y2="{py(lo):.1f}"/>'
                           f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{py(hi):.1f}" y2="{py(hi):.1f}"/></g>')
            if s.markers:
                fill = s.point_colours[j] if s.point_colours and j < len(s.point_colours) else colour
                shape = s.point_shapes[j] if s.point_shapes and j < len(s.point_shapes) else "circle"
                if shape == "cross":
                    out.append(f'<path class="marker-cross" d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}'
                               f'M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" stroke="{fill}" '
                               f'stroke-width="3"/>')
                else:
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="#222" '
                               f'stroke-width="0.8"/>')
        out.append("</g>")
    out.append("</g>")
    # Reference lines over the data, labelled at the line.
    for r in chart.refs:
        label = escape(r.label)
        attrs = (f'class="ref-line {escape(r.kind)}" data-kind="{escape(r.kind)}" data-value="{r.value:.6g}" '
                 f'stroke="{r.colour}" stroke-width="2" stroke-dasharray="6 4"')
        if r.axis == "x" and x_lo <= r.value <= x_hi:
            x = px(r.value)
            out.append(f'<line {attrs} x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>')
        elif r.axis == "y" and y_lo <= r.value <= y_hi:
            y = py(r.value)
            out.append(f'<line {attrs} x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
    # Legend under the plot: one row per series and reference line.
    y = chart.height + 4 + extra
    for s, colour in zip(chart.series, colours):
        mark = (f'<rect x="{left + 2}" y="{y - 6:.1f}" width="16" height="12" fill="{colour}"/>' if s.bars else
                f'<circle cx="{left + 10}" cy="{y:.1f}" r="4.5" fill="{colour}"/>' if s.markers and not s.line else
                f'<line x1="{left}" x2="{left + 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<g class="legend-item">{mark}<text x="{left + 28}" y="{y + 4:.1f}" class="legend">'
                   f'{escape(s.name)}</text></g>')
        y += 18
    for r in chart.refs:
        out.append(f'<g class="legend-item"><line x1="{left}" x2="{left + 20}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{r.colour}" stroke-width="2" stroke-dasharray="6 4"/>'
                   f'<text x="{left + 28}" y="{y + 4:.1f}" class="legend">{escape(r.label)}</text></g>')
        y += 18
    out.append("</svg>")
    return "\n".join(out)
