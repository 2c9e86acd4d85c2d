"""The serving benchmark against a real `inferforge serve` (a quantized artifact, in a subprocess), as a user
runs them: `inferforge bench --url ... --model ...`. Targets are ones no machine can miss (1e9 ms) or meet
(1e-6 ms), so nothing depends on this machine's speed. The server runs the PyTorch reference ops (no Triton
interpreter; the kernels have their own tests), and the Poisson rate is far below what it serves even on a
loaded machine, so the run cannot saturate it."""

import csv
import json

import pytest

from inferforge.cli import main
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer
from tests.runtime.server_process import DEADLINE_S, start_server, stop_server

SERVED = "tiny-int8"


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-serve")
    model = save_tiny_llama(root / "model", initializer_range=0.05)
    save_word_tokenizer(model)
    text = save_word_text(root / "calibration.txt")
    out = root / "tiny-int8"
    assert main(["quantize", str(model), "--config", "int8-weight-only", "--calibration", str(text),
                 "--seq-len", "32", "--num-samples", "16", "--output", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def url(int8_artifact, tmp_path_factory):
    proc, base = start_server(int8_artifact, tmp_path_factory.mktemp("server"), "--served-model-name", SERVED,
                               interpret_kernels=False)
    yield f"{base}/v1"
    stop_server(proc)


def bench(url, out, *extra):
    return main(["bench", "--url", url, "--model", SERVED, "--scenario", "server", "--vocab-size", "256",
                 "--input-len", "12", "--output-len", "6", "--warmup", "1", "--seed", "3", "-o", str(out), "-q",
                 *extra])


def test_poisson_run_over_http_writes_every_report_file(url, tmp_path, capsys):
    out = tmp_path / "run"
    assert bench(url, out, "--rate", "4", "--num-requests", "24", "--target", "ttft_ms:p95:1e9",
                 "--target", "tpot_ms:median:1e9") == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "requests.jsonl",
                                                      "summary.csv"]
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"backend": "openai-http", "model": SERVED, "url": url}
    assert report["load"] == {"mode": "rate", "rate": 4.0, "burstiness": 1.0, "concurrency": None}
    assert report["completed"] == 24 and report["failed"] == 0 and report["valid"] and report["passed"]
    # ignore_eos: every request generates exactly --output-len tokens, counted from the server's usage chunk.
    assert report["total_output_tokens"] == 24 * 6 and report["total_input_tokens"] == 24 * 12
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["success"] and r["output_tokens"] == 6 for r in rows)
    for r in rows:
        assert r["sent_s"] <= r["first_token_s"] <= r["end_s"]
        assert r["ttft_ms"] == pytest.approx((r["first_token_s"] - r["sent_s"]) * 1e3)
        assert len(r["itl_ms"]) == len(r["chunk_times_s"]) - 1
    assert [t["passed"] for t in report["targets"]] == [True, True]
    (row,) = csv.DictReader((out / "summary.csv").open())
    assert row["completed"] == "24" and float(row["p95_ttft_ms"]) == pytest.approx(report["p95_ttft_ms"])
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4 and "tiny-int8" in html


def test_an_impossible_target_exits_1_and_names_the_miss(url, tmp_path, capsys):
    assert bench(url, tmp_path / "run", "--concurrency", "3", "--num-requests", "6",
                 "--target", "ttft_ms:median:1e-6") == 1
    err = capsys.readouterr().err
    assert "target missed: median_ttft_ms" in err and "> 1e-06 ms (by" in err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["passed"] is False


def test_too_few_requests_for_p99_is_refused_before_the_run(url, tmp_path, capsys):
    assert bench(url, tmp_path / "run", "--rate", "50", "--num-requests", "10", "--target", "ttft_ms:p99:1e9") == 2
    err = capsys.readouterr().err
    assert "p99 needs >= 100 samples but 10 measured requests" in err


def test_the_openai_client_streams_from_a_served_quantized_artifact(url):
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", timeout=DEADLINE_S, max_retries=0)
    chunks = list(client.completions.create(model=SERVED, prompt="w3 w4 w5", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens <= 5 and chunks[-1].usage.prompt_tokens == 4
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
