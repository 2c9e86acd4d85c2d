"""End to end: the in-process engine on a tiny random Llama, and the HTTP backend against a fake
OpenAI-compatible SSE server. Tiny runs; no assertion on wall-clock times or on targets holding."""

import asyncio
import csv
import json
import socket
import threading
import time

import pytest

from inferforge.cli import main
from tests.factories_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("serving") / "tiny")


def test_in_process_rate_run_writes_every_report_file(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", str(tiny), "--scenario", "server", "--rate", "50", "--num-requests", "6", "--input-len", "8",
                 "--input-len-dist", "uniform", "--input-len-range", "0.25", "--output-len", "4", "--warmup", "1",
                 "--max-num-seqs", "4", "--target", "e2el_ms:mean:1e9", "-o", str(out), "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert report["kind"] == "llm-serving-benchmark" and report["scenario"] == "server"
    assert report["target"]["backend"] == "inferforge-engine"
    assert report["load"] == {"mode": "rate", "rate": 50.0, "burstiness": 1.0, "concurrency": None}
    assert (report["completed"], report["failed"], report["total_output_tokens"]) == (6, 0, 24)
    assert report["workload"]["input_tokens"]["min"] >= 6 and report["workload"]["input_tokens"]["max"] <= 10
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        for stat in ("mean", "median", "std", "p90", "p95", "p99"):
            assert report[f"{stat}_{metric}"] is not None
        assert report[f"mean_{metric}"] > 0
    assert report["mean_e2el_ms"] >= report["mean_ttft_ms"]
    assert "p99_ttft_ms rests on 6 samples; p99 needs >= 100" in report["sample_warnings"]
    assert report["targets"][0]["passed"] and report["valid"] and report["sweep"] is None
    assert "TPOT" in report["definitions"]["tpot_ms"] and "load_average" in report["environment"]
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["success"] and r["output_tokens"] == 4 and len(r["itl_ms"]) == 3 for r in rows)
    assert all(r["sent_s"] >= r["scheduled_s"] - 1e-6 and r["end_s"] >= r["first_token_s"] for r in rows)
    (row,) = list(csv.DictReader((out / "summary.csv").open()))
    assert row["mode"] == "rate" and row["completed"] == "6" and "p99_ttft_ms" in row
    md = (out / "report.md").read_text()
    assert "## Targets" in md and "| ttft_ms |" in md and "## Definitions" in md and "## Environment" in md
    assert not list(tmp_path.glob(".run.*"))      # the staging directory was renamed into place


def test_in_process_offline_miss_exits_1_and_names_it(tiny, tmp_path, capsys):
    code = main(["bench", str(tiny), "--num-requests", "3", "--input-len", "5", "--output-len", "3", "--warmup", "0",
                 "--target", "ttft_ms:median:0.001", "-o", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "target missed: median_ttft_ms" in err and "> 0.001 ms (by" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["load"]["mode"] == "offline" and report["load"]["rate"] == "inf"


def test_in_process_sweep_reports_every_rate(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", str(tiny), "--scenario", "server", "--sweep", "--rate", "20", "--sweep-doublings", "1",
                 "--sweep-bisections", "0", "--target", "e2el_ms:mean:1e9", "--num-requests", "3", "--input-len", "4",
                 "--output-len", "2", "--warmup", "0", "-o", str(out), "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert [p["load"]["rate"] for p in report["sweep"]] == [20.0, 40.0]
    assert report["max_rate_meeting_targets"] == 40.0 and report["load"]["mode"] == "sweep"
    assert [row["rate"] for row in csv.DictReader((out / "summary.csv").open())] == ["20.0", "40.0"]
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sorted({r["rate"] for r in rows}) == [20.0, 40.0] and len(rows) == 6


def test_output_replaces_an_earlier_run_but_never_another_directory(tiny, tmp_path, capsys):
    args = ["bench", str(tiny), "--num-requests", "2", "--input-len", "4", "--output-len", "2", "--warmup", "0", "-q"]
    run = tmp_path / "run"
    assert main([*args, "-o", str(run)]) == 0
    first = (run / "requests.jsonl").read_text()
    assert main([*args, "--seed", "1", "-o", str(run)]) == 0          # an earlier run: replaced
    assert (run / "requests.jsonl").read_text() != first
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([*args, "-o", str(mine)]) == 2                         # anything else: refused before any work
    assert "exists and is not an earlier benchmark run" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_flag_mistakes_exit_2_with_one_line(tiny, tmp_path, capsys):
    cases = [(["--target", "8:40"], "METRIC:STAT:LIMIT_MS"),
             (["--rate", "2"], "--rate needs --scenario server"),
             (["--scenario", "server"], "needs exactly one of --rate R, --concurrency C or --sweep"),
             (["--scenario", "server", "--sweep"], "--sweep searches for the highest rate"),
             (["--target", "ttft_ms:p99:100", "--input-len", "300"], "exceeds the model's context window (256)")]
    for extra, message in cases:
        assert main(["bench", str(tiny), "-o", str(tmp_path / "x"), "-q", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "-q"]) == 2
    assert "--vocab-size N or --tokenizer DIR" in capsys.readouterr().err


# ------------------------------------------------------------------ a fake OpenAI-compatible server
def _fake_app(seen: list):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if body["prompt"][0] == 13:                  # a request the server refuses
            return JSONResponse({"error": "bad prompt"}, status_code=400)
        n = body["max_tokens"]

        async def events():
            # Two tokens in the first chunk, then one per chunk; a closing chunk with empty text; usage.
            chunks = ["w5 w6"] + [f" w{i}" for i in range(n - 2)]
            for text in chunks:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
                await asyncio.sleep(0.002)
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n + len(body["prompt"])}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture
def fake_server():
    import uvicorn

    seen = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_fake_app(seen), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", seen
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_http_backend_against_a_fake_sse_server(fake_server, tmp_path, capsys):
    url, seen = fake_server
    out = tmp_path / "run"
    code = main(["bench", "--url", url, "--model", "fake", "--scenario", "server", "--concurrency", "2",
                 "--num-requests", "4", "--input-len", "5", "--output-len", "5", "--vocab-size", "100", "--warmup", "1",
                 "--target", "tpot_ms:mean:1e9", "-o", str(out), "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == {"backend": "openai-http", "model": "fake", "url": url}
    assert report["load"]["mode"] == "concurrency" and report["load"]["concurrency"] == 2
    body = seen[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert body["max_tokens"] == 5 and len(body["prompt"]) == 5 and all(isinstance(t, int) for t in body["prompt"])
    assert len(seen) == 5                                       # warm-up included
    assert (report["completed"], report["total_output_tokens"], report["total_input_tokens"]) == (4, 20, 20)
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    # 4 token chunks (the first carries two tokens; the closing empty chunk is not one): 3 gaps, 5 tokens.
    assert all(len(r["chunk_times_s"]) == 4 and len(r["itl_ms"]) == 3 and r["output_tokens"] == 5 for r in rows)
    r = rows[0]
    assert r["tpot_ms"] == pytest.approx((r["chunk_times_s"][-1] - r["chunk_times_s"][0]) * 1e3 / 4)


def test_http_failures_are_recorded_and_make_the_run_invalid(fake_server, tmp_path):
    from inferforge.bench.serving.backends import OpenAIHTTPBackend
    from inferforge.bench.serving.metrics import RequestRecord
    from inferforge.bench.serving.workload import BenchRequest

    url, _ = fake_server

    async def one():
        backend = OpenAIHTTPBackend(url, "fake")
        record = RequestRecord(0, 2, 3)
        try:
            await backend.send(BenchRequest(0, [13, 14], 2, 3), record, time.perf_counter)
        finally:
            await backend.close()
        return record

    record = asyncio.run(one())
    assert not record.success and record.error.startswith("RuntimeError: HTTP 400") and record.end_s is not None
