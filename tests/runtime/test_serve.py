"""`inferforge serve` end to end: a real server in a subprocess, the official openai client, raw HTTP for errors."""

import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

from tests.factories_llama import save_tiny_llama, save_word_tokenizer
from tests.runtime.server_process import DEADLINE_S, NAME, start_server, stop_server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("served") / "model", initializer_range=0.05)
    save_word_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    proc, url = start_server(model, tmp_path_factory.mktemp("server"), "--served-model-name", NAME,
                             "--max-num-seqs", "8")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=DEADLINE_S, max_retries=0)


def metrics(url) -> dict:
    """The unlabelled samples and the finish-reason counters of /metrics, by name."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_until(condition, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_models_and_health(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(NAME, 256)]


def test_openai_client_streams_a_completion_with_usage(client):
    stream = client.completions.create(model=NAME, prompt="w5 w9 w200 w17", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.split() and all(re.fullmatch(r"w\d+", w) for w in text.split())
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5       # <s> + 4 words
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.total_tokens == 11
    whole = client.completions.create(model=NAME, prompt="w5 w9 w200 w17", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == text and whole.usage.completion_tokens == 6


def test_openai_client_streams_a_chat_completion_with_usage(client):
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6 w7"}]
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens > 0
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "length"
    assert whole.usage == chunks[-1].usage


def test_token_id_prompt_equals_engine_greedy(server, model):
    from transformers import AutoTokenizer

    from inferforge.runtime.engine import LLMEngine

    prompt = [1, 5, 9, 200, 17]
    want = LLMEngine.from_pretrained(model, dtype=torch.float32, device="cpu").generate([prompt], max_new_tokens=12)[0]
    body = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0}, timeout=DEADLINE_S).json()
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert body["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": len(want), "total_tokens": 5 + len(want)}
    assert body["choices"][0]["finish_reason"] == ("stop" if want[-1] == 2 else "length")


def test_stop_strings_end_the_text(server, client):
    full = client.completions.create(model=NAME, prompt=[1, 5, 9], max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    stop = f" {words[2]}"
    cut = client.completions.create(model=NAME, prompt=[1, 5, 9], max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=[1, 5, 9], max_tokens=8, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


BAD_REQUESTS = [
    ("/v1/completions", {"model": "other-model", "prompt": "w5"}, "model"),
    ("/v1/completions", {"prompt": [5] * 300, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": 17}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "w5", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "w5", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "w5", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": [1, 999]}, "prompt"),
    ("/v1/completions", {"prompt": [1, -3]}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "16"}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 4.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "top_k": False}, "top_k"),
    ("/v1/completions", {"prompt": "w5", "n": True}, "n"),
    ("/v1/completions", {"prompt": "w5", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "w5", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "w5", "seed": 99999999999999999999999}, "seed"),
    ("/v1/completions", {"prompt": "w5", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": "w5", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "w5", "seed": "7"}, "seed"),
    ("/v1/completions", {"prompt": "w5", "stop_token_ids": [999999]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "w5", "stop_token_ids": [True]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "", "stream": True}, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w5"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "stream": True, "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " ".join(["w5"] * 300)}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "stop_token_ids": [256]},
     "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "seed": -5}, "seed"),
]

FINISHED_ERROR = 'inferforge_requests_finished_total{finish_reason="error"}'
ABORTED = 'inferforge_requests_finished_total{finish_reason="abort"}'


@pytest.mark.parametrize("route, body, param", BAD_REQUESTS)
def test_bad_requests_get_400_in_openai_shape(server, route, body, param):
    response = httpx.post(f"{server}{route}", json=body, timeout=DEADLINE_S)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param


def test_bad_values_are_named_in_the_message(server):
    def error(body):
        response = httpx.post(f"{server}/v1/completions", json=body, timeout=DEADLINE_S)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert error({"prompt": [1, 999]})["message"] == "prompt: token ids must be ints in [0, 256), got 999"
    assert error({"prompt": "w5", "stop_token_ids": [2, 999999]})["message"] == (
        "stop_token_ids: token ids must be ints in [0, 256), got 999999")
    huge = error({"prompt": "w5", "seed": 99999999999999999999999})
    assert huge["message"].startswith("seed: ") and "Overflow" not in huge["message"]
    assert error({"prompt": "w5", "max_tokens": True})["message"].startswith("max_tokens: ")
    ok = httpx.post(f"{server}/v1/completions", timeout=DEADLINE_S, json={
        "prompt": "w5", "max_tokens": 2, "seed": 2**63 - 1, "temperature": 1.0, "stop_token_ids": [255]})
    assert ok.status_code == 200, ok.text          # the largest seed and the last token id are accepted


def test_refused_requests_are_counted_as_rejected_not_as_engine_errors(server):
    before = metrics(server)
    for body in ({"prompt": [5] * 300, "max_tokens": 4}, {"prompt": [1, 999]}, {"prompt": "w5", "n": 2},
                 {"prompt": "w5", "stop_token_ids": [999999]}):
        assert httpx.post(f"{server}/v1/completions", json=body, timeout=DEADLINE_S).status_code == 400
    assert httpx.post(f"{server}/v1/completions", content=b"not json",
                      headers={"Content-Type": "application/json"}).status_code == 400
    after = metrics(server)
    assert after["inferforge_requests_rejected_total"] == before.get("inferforge_requests_rejected_total", 0) + 5
    assert after.get(FINISHED_ERROR, 0) == before.get(FINISHED_ERROR, 0)
    assert "# HELP inferforge_time_to_first_token_seconds Request arrival (headers read, before parsing and " \
           "tokenization)" in httpx.get(f"{server}/metrics").text


def test_malformed_json_and_wrong_body_get_400(server):
    for content in (b'{"prompt": "w5",', b"[1, 2]", b"not json"):
        response = httpx.post(f"{server}/v1/completions", content=content,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_clients_are_batched_by_one_engine(server, client):
    clients, results, errors = 6, {}, []
    barrier = threading.Barrier(clients)

    def one(i):
        try:
            barrier.wait()
            stream = client.completions.create(model=NAME, prompt=[1, 10 + i, 20 + i], max_tokens=24, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            results[i] = list(stream)[-1].usage.completion_tokens
        except Exception as e:   # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not errors and results == {i: 24 for i in range(clients)}
    values = metrics(server)
    assert values["inferforge_max_running_seqs"] > 1          # more than one sequence in one engine step
    assert values["inferforge_batched_steps_total"] > 0
    assert values["inferforge_time_to_first_token_seconds_count"] >= clients
    assert values["inferforge_inter_token_latency_seconds_count"] >= clients * 23


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    aborted = metrics(server).get(ABORTED, 0)
    body = {"model": NAME, "prompt": [1, 5, 9], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
        assert metrics(server)["inferforge_requests_running"] == 1
    # Leaving the block closed the connection after one token of 200.
    wait_until(lambda: metrics(server).get(ABORTED, 0) == aborted + 1, "the abort")
    wait_until(lambda: metrics(server)["inferforge_requests_running"] == 0
               and metrics(server)["inferforge_kv_cache_usage"] == 0, "the blocks to be freed")
    generated = metrics(server)["inferforge_generation_tokens_total"]
    assert httpx.get(f"{server}/health").status_code == 200
    assert metrics(server)["inferforge_generation_tokens_total"] == generated      # the engine stopped generating


def test_a_non_streaming_client_that_disconnects_is_aborted_and_frees_its_blocks(server):
    before = metrics(server)
    body = json.dumps({"model": NAME, "prompt": [1, 5, 9], "max_tokens": 240, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        wait_until(lambda: metrics(server)["inferforge_generation_tokens_total"]
                   > before["inferforge_generation_tokens_total"], "the request to generate")
        assert metrics(server)["inferforge_requests_running"] == 1
    # The client gave up (closed its connection) with the answer 240 tokens away.
    wait_until(lambda: metrics(server).get(ABORTED, 0) == before.get(ABORTED, 0) + 1, "the abort")
    wait_until(lambda: metrics(server)["inferforge_requests_running"] == 0
               and metrics(server)["inferforge_kv_cache_usage"] == 0, "the blocks to be freed")
    after = metrics(server)
    assert after["inferforge_generation_tokens_total"] < before["inferforge_generation_tokens_total"] + 240
    length = 'inferforge_requests_finished_total{finish_reason="length"}'
    assert after.get(length, 0) == before.get(length, 0)          # it did not run to max_tokens
    assert httpx.get(f"{server}/health").status_code == 200


def test_port_in_use_and_encoder_artifact_are_one_line_errors(server, model, tmp_path):
    from inferforge.manifest import FORMAT
    from tests.conftest import run_cli

    port = server.rsplit(":", 1)[1]
    busy = run_cli("serve", model, "--port", port)
    assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use; stop that server or pick another --port"]
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": {}, "kind": "sentence-encoder"}))
    refused = run_cli("serve", encoder, "--port", "0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "sentence-encoder artifact; serve runs causal-LM artifacts" in refused.stderr
    missing = run_cli("serve", tmp_path / "nope", "--port", "0")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} does not exist: give a Llama/Mistral/Qwen2 model directory or a causal-LM "
        "artifact"]


def test_ctrl_c_stops_the_server_cleanly_and_a_larger_max_context_is_capped_with_a_note(model, tmp_path):
    proc, url = start_server(model, tmp_path, "--max-context", "100000")
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == "model" and card["max_model_len"] == 256      # default name: the directory's
    assert stop_server(proc) == 0
    err = (tmp_path / "serve.err").read_text()
    assert "server stopped" in err
    assert "note: --max-context 100000 is capped at the model's context window (256 tokens)" in err.splitlines()


class _ByteTokenizer:
    """Token i is byte i: a multi-byte character spans several tokens."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_incremental_detokenizer_holds_back_partial_characters_and_stop_strings():
    from inferforge.runtime.detokenize import IncrementalDetokenizer

    text = "ab é cd STOP ef"
    plain = IncrementalDetokenizer(_ByteTokenizer())
    pieces = [plain.add(b) for b in text.encode()]
    assert "".join(pieces) + plain.flush() == text and "\ufffd" not in "".join(pieces)
    stopping = IncrementalDetokenizer(_ByteTokenizer(), stop=["STOP", "zz"])
    pieces = []
    for b in text.encode():
        pieces.append(stopping.add(b))
        if stopping.stopped:
            break
    assert "".join(pieces) + stopping.flush() == "ab é cd " and stopping.stopped
    assert all("S" not in p for p in pieces)          # the stop string's start was held back, never sent


def test_an_engine_failure_is_a_500_or_an_error_event_and_the_server_goes_on(model):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from inferforge.runtime.async_engine import AsyncEngine
    from inferforge.runtime.engine import LLMEngine
    from inferforge.runtime.serve import create_app

    engine = LLMEngine.from_pretrained(model, dtype=torch.float32, device="cpu")
    real_step, calls = engine.step, []

    def flaky_step():          # the 1st step of the first request fails, and the 3rd step of the second
        calls.append(1)
        if len(calls) in (1, 4):
            raise RuntimeError("injected kernel failure")
        return real_step()

    engine.step = flaky_step
    app = create_app(AsyncEngine(engine), AutoTokenizer.from_pretrained(model), model_name=NAME)
    body = {"prompt": [1, 5, 9], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with TestClient(app) as http:
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "internal_error"
        assert "injected kernel failure" in failed.json()["error"]["message"]
        streamed = http.post("/v1/completions", json={**body, "stream": True})
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert streamed.status_code == 200 and events[-1] == "[DONE]"
        assert "injected kernel failure" in json.loads(events[-2])["error"]["message"]
        assert len(events) == 4                # two tokens, the error, [DONE]
        ok = http.post("/v1/completions", json=body).json()
        assert ok["usage"]["completion_tokens"] == 5
        assert http.get("/health").json() == {"status": "ok"}


class _SlowTokenizer:
    """A tokenizer that takes `seconds` to encode and records when it finished."""

    def __init__(self, tokenizer, seconds):
        self.tokenizer, self.seconds, self.encoded_at = tokenizer, seconds, None

    def __call__(self, text):
        time.sleep(self.seconds)
        out = self.tokenizer(text)
        self.encoded_at = time.perf_counter()
        return out

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_ttft_starts_at_request_arrival_before_tokenization(model):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from inferforge.runtime.async_engine import AsyncEngine
    from inferforge.runtime.engine import LLMEngine
    from inferforge.runtime.serve import create_app

    slow = _SlowTokenizer(AutoTokenizer.from_pretrained(model), seconds=0.2)
    app = create_app(AsyncEngine(LLMEngine.from_pretrained(model, dtype=torch.float32, device="cpu")), slow,
                     model_name=NAME)
    metrics_, observed = app.state.serving.metrics, []
    real_observe = metrics_.observe_token

    def observe(seconds, *, first):
        if first:
            observed.append((seconds, time.perf_counter()))
        real_observe(seconds, first=first)

    metrics_.observe_token = observe
    with TestClient(app) as http:
        assert http.post("/v1/completions", json={"prompt": "w5 w9", "max_tokens": 2}).status_code == 200
    ((ttft, at),) = observed
    # TTFT reaches back past the end of tokenization by at least most of the tokenizer's 0.2 s (a TTFT
    # that started after tokenizing would reach back by nothing): only a lower bound, never a duration.
    assert ttft - (at - slow.encoded_at) >= 0.1


def test_the_ready_line_names_the_cpu_weight_layout(model, tmp_path):
    proc, url = start_server(model, tmp_path, "--cpu-linears", "onednn", "--max-num-seqs", "2")
    try:
        assert "--max-num-seqs 2, --cpu-linears onednn)" in (tmp_path / "serve.out").read_text()
    finally:
        stop_server(proc)
