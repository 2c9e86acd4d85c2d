"""Where requests go: the in-process engine (`AsyncEngine`) or an OpenAI-compatible HTTP server.

A backend's `send(request, record, clock)` fills a `RequestRecord` with the send time, the time of
every streamed chunk and the output token count, on `clock()` (seconds from the run's start). It
records a failure in the record instead of raising, so one bad request never stops a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from inferforge.bench.serving.metrics import RequestRecord
from inferforge.bench.serving.workload import BenchRequest
from inferforge.errors import UserInputError


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


class EngineBackend:
    """In-process: `AsyncEngine.generate` yields one token per chunk."""

    name = "inferforge-engine"

    def __init__(self, async_engine, *, ignore_eos: bool = True):
        self.engine, self.ignore_eos = async_engine, ignore_eos

    async def send(self, request: BenchRequest, record: RequestRecord, clock) -> None:
        if not isinstance(request.prompt, list):
            raise UserInputError("in-process prompts must be token ids; the model directory needs a tokenizer "
                                 "for text prompts")
        record.sent_s = clock()
        try:
            async for _token in self.engine.generate(request.prompt, max_tokens=request.output_len,
                                                     temperature=0.0, ignore_eos=self.ignore_eos):
                record.chunk_times_s.append(clock())
            record.output_tokens = len(record.chunk_times_s)
            record.success = record.output_tokens > 0
            if not record.success:
                record.error = "no output tokens"
        except Exception as e:   # noqa: BLE001 - recorded as a failed request; the run goes on
            record.error = _failure(e)
        finally:
            record.end_s = clock()

    async def close(self) -> None:
        return None


class OpenAIHTTPBackend:
    """Streams `POST {url}/completions` (stream, include_usage) and parses the server-sent events.

    A chunk is an SSE `data:` event with a choice; it counts as a streamed chunk unless it is only
    the closing one (empty text with a finish_reason). Output tokens: the usage chunk's
    `completion_tokens`, else the number of chunks. Prompt tokens: the usage chunk's `prompt_tokens`,
    else the token ids sent."""

    name = "openai-http"

    def __init__(self, url: str, model: str, *, ignore_eos: bool = True, timeout_s: float = 600.0, transport=None):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise UserInputError(f"--url {url!r}: expected http://HOST:PORT/v1")
        self.url, self.model, self.ignore_eos = url.rstrip("/"), model, ignore_eos
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), transport=transport,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    def payload(self, request: BenchRequest) -> dict:
        return {"model": self.model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": self.ignore_eos}

    async def send(self, request: BenchRequest, record: RequestRecord, clock) -> None:
        usage = {}
        record.sent_s = clock()
        try:
            async with self.client.stream("POST", f"{self.url}/completions", json=self.payload(request)) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    raise RuntimeError(f"HTTP {response.status_code}: {body[:300]}")
                async for line in response.aiter_lines():
                    line = line.strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    now = clock()
                    event = json.loads(data)
                    if event.get("error"):
                        raise RuntimeError(f"server error: {event['error']}")
                    usage = event.get("usage") or usage
                    choices = event.get("choices") or []
                    if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                        record.chunk_times_s.append(now)
            record.output_tokens = int(usage.get("completion_tokens") or len(record.chunk_times_s))
            if usage.get("prompt_tokens"):
                record.prompt_tokens = int(usage["prompt_tokens"])
            record.success = bool(record.chunk_times_s)
            if not record.success:
                record.error = "no output chunks"
        except Exception as e:   # noqa: BLE001 - recorded as a failed request; the run goes on
            record.error = _failure(e)
        finally:
            record.end_s = clock()

    async def close(self) -> None:
        await self.client.aclose()


def engine_target(engine, path: Path) -> dict:
    """The report's `target` for an in-process run: which runtime ran the model, and the model's full path.
    An ONNX decoder records ONNX Runtime and its execution provider; the engine is "inferforge-engine"."""
    target = {"backend": EngineBackend.name, "model": path.name, "path": str(path.resolve())}
    provider = getattr(engine, "provider", None)
    if provider is not None:     # OnnxDecoder: an onnx-causal-lm artifact on ONNX Runtime
        target.update(backend="onnxruntime", provider=provider)
    return target


def load_engine(target: str | Path, *, max_num_seqs: int, max_context: int, **engine_kwargs):
    """The `LLMEngine` for a causal-LM artifact (hashes verified) or a Llama-family checkpoint directory."""
    from inferforge.runtime.load import load_engine as load

    return load(target, command="the serving benchmark", max_num_seqs=max_num_seqs, max_context=max_context,
                **engine_kwargs)
