"""report.html of an LLM serving benchmark: escaped, self-contained, the plotted CDFs are the data's, and
headless Chromium renders its tables and SVG plots (required on CI: `CI` set and no chromium fails)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from inferforge.bench.html_report import (
    cdf_charts,
    metric_samples,
    normalize_percentile,
    read_requests,
    render_html,
    write_html,
)
from inferforge.bench.svg_plots import cdf_points, nice_ticks
from tests.bench.serving_fixtures import HOSTILE, make_report, make_requests, write_run

CDF_TITLES = ("TTFT CDF", "TPOT CDF", "ITL CDF", "E2EL CDF")
PERCENTILE_TITLES = ("TTFT percentiles with 95% bootstrap CIs", "ITL percentiles with 95% bootstrap CIs")
SWEEP_TITLES = ("Sweep: TTFT against achieved request rate", "Sweep: TPOT against achieved request rate")


def _case(name: str):
    requests = make_requests()
    if name == "sweep":
        return make_report(requests, sweep=True), requests
    if name == "saturated-invalid":
        return make_report(requests, saturated=True, invalid=True, model=HOSTILE), requests
    return make_report(requests), requests


# ------------------------------------------------------------------------------- without a browser
def test_hostile_strings_are_escaped():
    requests = make_requests(failures=3)
    requests[5]["error"] = "<img src=x onerror=alert(1)>"
    report = make_report(requests, model=HOSTILE, saturated=True)
    report["workload"]["note"] = "</table><script>alert(2)</script>"
    report["sample_warnings"].append("<b>bold</b>")
    html = render_html(report, requests)
    assert "<script" not in html.lower()
    assert "<img" not in html.lower() and "<b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;model&quot;" in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html          # request errors
    assert "&lt;/table&gt;&lt;script&gt;" in html      # settings


def test_html_is_self_contained():
    report, requests = _case("sweep")
    html = render_html(report, requests)
    lowered = html.lower()
    for forbidden in ("<script", "<link", "<iframe", "<img", "src=", "href=", "@import", "url(http"):
        assert forbidden not in lowered, forbidden
    # The only http URL outside the data is the SVG namespace.
    urls = set(re.findall(r'"(https?://[^"]+)"', html))
    assert urls == {"http://www.w3.org/2000/svg"}


def test_write_html_is_atomic_and_returns_the_path(tmp_path):
    report, requests = _case("plain")
    path = write_html(tmp_path, report, requests)
    assert path == tmp_path / "report.html"
    assert path.read_text(encoding="utf-8") == render_html(report, requests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]   # no temporary file left


@pytest.mark.parametrize("n", [1, 7, 250])
def test_cdf_points_are_the_empirical_cdf(n):
    values = np.random.default_rng(n).gamma(2.0, 10.0, size=n)
    xs, ys = cdf_points(list(values) + [None])
    np.testing.assert_array_equal(xs, np.sort(values))
    np.testing.assert_allclose(ys, np.arange(1, n + 1) / n)


def test_cdf_points_downsampled_are_exact_pairs():
    values = np.random.default_rng(0).normal(100, 10, size=10_001)
    xs, ys = cdf_points(values, max_points=500)
    assert len(xs) <= 500 and xs[0] == values.min() and xs[-1] == values.max() and ys[-1] == 1.0
    ranks = np.searchsorted(np.sort(values), xs, side="right")   # no ties in continuous samples
    np.testing.assert_allclose(ys, ranks / values.size)


def test_plotted_cdfs_are_the_requests_samples():
    report, requests = _case("plain")
    charts = {c.title.split()[0]: c for c in cdf_charts(report, requests)}
    ok = [r for r in requests if r["success"]]
    expected = {"TTFT": [r["ttft_ms"] for r in ok], "ITL": [g for r in ok for g in r["itl_ms"]],
                "E2EL": [r["e2el_ms"] for r in ok]}
    for name, values in expected.items():
        (series,) = charts[name].series
        np.testing.assert_array_equal(series.x, np.sort(values))
        np.testing.assert_allclose(series.y, np.arange(1, len(values) + 1) / len(values))
    assert metric_samples(requests, "itl_ms") == expected["ITL"]
    # The target of each metric is drawn at its limit: p99 TTFT <= 80 ms, p95 TPOT <= 15 ms.
    assert [(r.axis, r.value) for r in charts["TTFT"].refs if r.kind == "target"] == [("x", 80.0)]
    assert [(r.axis, r.value) for r in charts["TPOT"].refs if r.kind == "target"] == [("x", 15.0)]


def test_ticks_and_percentile_names():
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert [normalize_percentile(p) for p in (99, 99.9, "p95", "50", "median")] == ["p99", "p99.9", "p95",
                                                                                   "median", "median"]


def test_read_requests_roundtrip(tmp_path):
    report, requests = _case("plain")
    run = write_run(tmp_path / "run", report, requests)
    assert read_requests(run / "requests.jsonl") == requests


# ------------------------------------------------------------------------------- headless Chromium
@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("CI is set and chromium is not installed: .ci/run installs it (apt-get install -y chromium); "
                    "the HTML rendering test must not be skipped on CI")
    pytest.skip("chromium is not installed (apt-get install -y chromium); on CI (CI set) this test fails instead")


def _chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("case", ["plain", "sweep", "saturated-invalid"])
def test_chromium_renders_tables_and_plots(chromium, tmp_path, case):
    report, requests = _case(case)
    run = write_run(tmp_path / "run", report, requests)
    page = write_html(run, report, requests)
    proc = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    svgs, tables = dom.count("<svg"), dom.count("<table")
    sweep = case == "sweep"
    assert svgs == 4 + 4 + (3 if sweep else 0), svgs          # CDFs, percentiles, sweep
    assert tables == (6 if sweep else 5) + 1, tables           # + failed requests
    for title in CDF_TITLES + PERCENTILE_TITLES + (SWEEP_TITLES if sweep else ()):
        assert f"<title>{title}" in dom, title
    # Targets drawn as lines: on the TTFT and TPOT CDFs and percentile plots (and the two sweep plots).
    assert dom.count('class="ref-line target"') == 4 + (2 if sweep else 0)
    assert ('class="ref-line max-rate"' in dom) == sweep
    if sweep:
        assert 'id="max-rate"' in dom and "<strong>4.00</strong>" in dom
    # A saturated run is invalid: one red banner says both (not a second, "SATURATED" one).
    assert ('id="invalid"' in dom) == ("SATURATED:" in dom) == (case == "saturated-invalid")
    assert 'id="saturated"' not in dom
    assert "<script" not in dom.lower() and not re.search(r"<link[^>]+href=\"?http", dom)


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the inflated scanlines (filter bytes included) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_chromium_screenshot_is_not_blank(chromium, tmp_path):
    report, requests = _case("sweep")
    page = write_html(tmp_path, report, requests)
    shot = tmp_path / "shot.png"
    proc = _chromium(chromium, tmp_path, "--hide-scrollbars", "--window-size=1400,2400", f"--screenshot={shot}",
                     page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    width, height, raw = _png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 2400)
    assert len(set(raw)) > 32, "the screenshot is (nearly) one colour"


def test_sparse_and_odd_reports_render():
    """A report with only its kind, and a sweep with missing, infinite and NaN values, still render."""
    assert "<svg" not in render_html({"kind": "llm-serving-benchmark"}, [])
    report, requests = _case("sweep")
    report["sweep"][1]["p99_tpot_ms"] = None
    report["sweep"].append({"rate": float("inf"), "request_throughput": 9.5, "passed": False,
                            "p99_ttft_ms": float("nan")})
    report["ci"]["p99_ttft_ms"] = None
    report["targets"][0].update(metric="TTFT", percentile="p99")
    html = render_html(report, requests)
    assert html.count("<svg") == 11 and html.count('class="ref-line target"') == 6
    assert not re.search(r'(points|cx|cy|y1|y2)="[^"]*nan', html, flags=re.I)
