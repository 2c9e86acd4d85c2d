"""`inferforge report compare`: deltas, regression directions, --fail-on exit codes, outputs only on request."""

from __future__ import annotations

import json

import pytest

from inferforge.bench.compare import FailOn, check_fail_on, compare_reports
from inferforge.cli import main
from inferforge.errors import UserInputError
from tests.bench.serving_fixtures import make_report, make_requests, write_run


@pytest.fixture
def runs(tmp_path):
    requests = make_requests()
    a = make_report(requests)
    b = json.loads(json.dumps(a))
    b["p99_ttft_ms"] = a["p99_ttft_ms"] * 1.2        # 20% slower
    b["p99_tpot_ms"] = a["p99_tpot_ms"] + 1.0         # 1 ms slower
    b["request_throughput"] = a["request_throughput"] * 0.9   # 10% less
    b["output_throughput"] = a["output_throughput"] * 1.5     # better
    return write_run(tmp_path / "a", a, requests), write_run(tmp_path / "b", b, requests), a, b


def _rows(a, b):
    return {r["key"]: r for r in compare_reports(a, b)["rows"]}


def test_deltas_and_directions(runs):
    _, _, a, b = runs
    rows = _rows(a, b)
    ttft = rows["p99_ttft_ms"]
    assert ttft["a"] == a["p99_ttft_ms"] and ttft["b"] == b["p99_ttft_ms"]
    assert ttft["delta"] == pytest.approx(b["p99_ttft_ms"] - a["p99_ttft_ms"])
    assert ttft["delta_pct"] == pytest.approx(20.0)
    assert ttft["verdict"] == "worse"                                  # latency: higher is worse
    assert rows["request_throughput"]["delta_pct"] == pytest.approx(-10.0)
    assert rows["request_throughput"]["verdict"] == "worse"            # throughput: lower is worse
    assert rows["output_throughput"]["verdict"] == "better"
    assert rows["p90_ttft_ms"]["verdict"] == "same" and rows["p90_ttft_ms"]["delta"] == 0
    assert rows["std_ttft_ms"]["verdict"] == "" and rows["duration"]["verdict"] == ""   # shown, not judged


def test_fail_on_parsing():
    assert FailOn.parse("p99_ttft_ms:10%") == FailOn("p99_ttft_ms", 10.0, True)
    assert FailOn.parse("p99_tpot_ms:2.5") == FailOn("p99_tpot_ms", 2.5, False)
    for bad in ("p99_ttft_ms", "p99_ttft_ms:", ":5", "p99_ttft_ms:ten%", "p99_ttft_ms:-1"):
        with pytest.raises(UserInputError):
            FailOn.parse(bad)


def test_fail_on_thresholds(runs):
    _, _, a, b = runs
    comparison = compare_reports(a, b)
    assert check_fail_on(comparison, [FailOn.parse("p99_ttft_ms:25%")]) == []
    (msg,) = check_fail_on(comparison, [FailOn.parse("p99_ttft_ms:10%")])
    assert "p99_ttft_ms" in msg and "+20.0%" in msg
    assert check_fail_on(comparison, [FailOn.parse("p99_tpot_ms:1.5")]) == []      # 1 ms worse, 1.5 ms allowed
    assert len(check_fail_on(comparison, [FailOn.parse("p99_tpot_ms:0.5")])) == 1
    assert len(check_fail_on(comparison, [FailOn.parse("request_throughput:5%")])) == 1
    assert check_fail_on(comparison, [FailOn.parse("output_throughput:0%")]) == []  # better never fails
    zero_a = compare_reports({**a, "failed": 0}, {**b, "failed": 3})
    assert {r["key"]: r for r in zero_a["rows"]}["failed"]["delta_pct"] is None    # no % from a zero baseline
    (msg,) = check_fail_on(zero_a, [FailOn.parse("failed:50%")])
    assert "from a baseline of 0" in msg
    json.dumps(zero_a, allow_nan=False)


def test_cli_exit_codes(runs, capsys):
    dir_a, dir_b, _, _ = runs
    assert main(["report", "compare", str(dir_a), str(dir_b)]) == 0
    assert "p99_ttft_ms" in capsys.readouterr().out
    assert main(["report", "compare", str(dir_a), str(dir_b), "--fail-on", "p99_ttft_ms:25%"]) == 0
    capsys.readouterr()
    assert main(["report", "compare", str(dir_a), str(dir_b), "--fail-on", "p99_ttft_ms:25%",
                 "--fail-on", "request_throughput:5%"]) == 1
    err = capsys.readouterr().err
    assert "request_throughput regressed" in err and "p99_ttft_ms" not in err
    # B against itself never fails.
    assert main(["report", "compare", str(dir_b), str(dir_b / "report.json"), "--fail-on", "p99_ttft_ms:0%"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--fail-on", "p99_ttf_ms:10%"], "did you mean p99_ttft_ms"),
    (["--fail-on", "std_ttft_ms:10%"], "not judged"),
    (["--fail-on", "p99_ttft_ms"], "KEY:PERCENT%"),
])
def test_bad_fail_on_is_one_line_exit_2(runs, capsys, args, message):
    dir_a, dir_b, _, _ = runs
    assert main(["report", "compare", str(dir_a), str(dir_b), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""      # refused before the table


def test_missing_file_and_wrong_kinds_exit_2(runs, tmp_path, capsys):
    dir_a, _, a, _ = runs
    assert main(["report", "compare", str(dir_a), str(tmp_path / "nowhere")]) == 2
    assert "no report.json" in capsys.readouterr().err
    other = write_run(tmp_path / "other", {"kind": "quantized-causal-lm", "name": "x"}, [])
    assert main(["report", "compare", str(dir_a), str(other)]) == 2
    assert "'quantized-causal-lm'" in capsys.readouterr().err
    encoder = write_run(tmp_path / "enc", {"benchmark": {"results": [
        {"provider": "onnx-int8", "batch_size": 8, "p50_ms": 10.0, "p95_ms": 12.0, "p99_ms": 13.0,
         "throughput_seq_s": 800.0}]}}, [])
    assert main(["report", "compare", str(dir_a), str(encoder)]) == 2
    assert "llm-serving-benchmark report and" in capsys.readouterr().err


def test_encoder_reports_compare(tmp_path, capsys):
    def run(name, p95):
        return write_run(tmp_path / name, {"kind": "sentence-encoder", "benchmark": {"results": [
            {"provider": "onnx-int8", "batch_size": 8, "p50_ms": 10.0, "p95_ms": p95, "p99_ms": 13.0,
             "mean_ms": 10.5, "throughput_seq_s": 800.0}]}}, [])
    a, b = run("a", 12.0), run("b", 15.0)
    assert main(["report", "compare", str(a), str(b), "--json", "--fail-on", "onnx-int8/b8/p95_ms:20%"]) == 1
    result = json.loads(capsys.readouterr().out)
    row = {r["key"]: r for r in result["rows"]}["onnx-int8/b8/p95_ms"]
    assert row["delta"] == 3.0 and row["delta_pct"] == pytest.approx(25.0) and result["passed"] is False


def test_writes_only_with_output(runs, tmp_path, capsys, monkeypatch):
    dir_a, dir_b, _, _ = runs
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["report", "compare", str(dir_a), str(dir_b), "--json"]) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    out = tmp_path / "cmp"
    assert main(["report", "compare", str(dir_a), str(dir_b), "--output", str(out),
                 "--fail-on", "p99_ttft_ms:10%"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["passed"] is False and saved["fail_on"] == ["p99_ttft_ms:10%"]
    md = (out / "compare.md").read_text()
    assert "| p99_ttft_ms |" in md and "+20.0%" in md and "thresholds exceeded" in md


def test_report_html_command(runs, capsys):
    dir_a, _, _, _ = runs
    assert main(["report", "html", str(dir_a)]) == 0
    assert (dir_a / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
