"""An OpenAI-compatible HTTP server over `AsyncEngine` (FastAPI; `inferforge serve` runs it with uvicorn).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as server-sent events with
`stream=true`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

The handlers only translate: request body -> prompt token ids and sampling settings -> `_Generation`
(tokens from the engine -> text, finish reason, usage, metrics) -> response body. The engine loop
itself runs in `AsyncEngine`'s thread; every request joins it through its queue.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a bad request (bad
JSON, a wrong type, an unsupported option, an unknown model, a token id outside the vocabulary, a
prompt over the context window) is a 400 before any token is generated, counted in
`inferforge_requests_rejected_total`; an engine failure is a 500, or in a stream an error event
followed by `data: [DONE]`, counted as `finish_reason="error"`.

A client that goes away aborts its request (its sequence and cache blocks are freed, finish reason
"abort"): each request's handler runs as a task beside a watcher of the connection that cancels it
on disconnect (a non-streaming request, or a stream still waiting for its first token); once
streaming, starlette's own disconnect check closes the stream. TTFT is measured from request
arrival, stamped by a middleware before the body is read.

Chat without a chat template in the tokenizer uses a plain format: one `role: content` line per
message, then `assistant:`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass

# At module level, not in create_app: FastAPI resolves the handlers' (string) annotations in this module.
from fastapi import Request

from inferforge.errors import UserInputError
from inferforge.runtime.async_engine import AsyncEngine
from inferforge.runtime.detokenize import IncrementalDetokenizer
from inferforge.runtime.engine import ContextWindowExceeded
from inferforge.runtime.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)
from inferforge.runtime.serve_metrics import ServerMetrics


class OpenAIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self):
        from fastapi.responses import JSONResponse

        body = ErrorResponse(error=ErrorInfo(message=str(self), type=self.kind, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def _engine_error(error: Exception) -> OpenAIError:
    """An error raised by the engine for one request, as the HTTP client should see it."""
    if isinstance(error, ContextWindowExceeded):
        numbers = str(error).split(";")[0].replace("max_new_tokens", "max_tokens")
        return OpenAIError(f"{numbers}; shorten the prompt or lower max_tokens", param="prompt",
                           code="context_length_exceeded")
    if isinstance(error, UserInputError):
        return OpenAIError(str(error))
    return OpenAIError(f"the engine failed: {type(error).__name__}: {error}", status=500, kind="internal_error")


@dataclass
class ServingState:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    metrics: ServerMetrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], field: str) -> None:
        """A 400 naming `field` unless every id is in the vocabulary (the types were checked by the protocol)."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(f"{field}: token ids must be ints in [0, {self.vocab_size}), got {bad[0]}", param=field)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
        if not getattr(self.tokenizer, "chat_template", None):
            return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:")
        try:
            ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        except Exception as e:   # noqa: BLE001 - a template that rejects these messages (jinja raises its own types)
            raise OpenAIError(f"messages: the model's chat template refused them: {e}", param="messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class _Generation:
    """One request on the engine: tokens -> text deltas, then `finish_reason` and `usage()`."""

    def __init__(self, state: ServingState, prompt: list[int], request, max_tokens: int, arrival: float):
        """`arrival`: `time.perf_counter()` when the request reached the server (the start of TTFT)."""
        self.state, self.prompt, self.request, self.max_tokens = state, prompt, request, max_tokens
        eos = () if request.ignore_eos else state.eos_token_ids
        self.stop_ids = sorted({*eos, *(request.stop_token_ids or ())})
        self.detokenizer = IncrementalDetokenizer(state.tokenizer, request.stop_strings)
        self.finish_reason: str | None = None
        self.arrival = arrival
        self._tokens = None

    async def start(self) -> None:
        """Submit the request and wait for its first token: a refused request raises `OpenAIError` here,
        before any response is started. Cancelled while waiting (the client left), the request is aborted."""
        self._tokens = self.state.engine.generate(self.prompt, max_tokens=self.max_tokens, ignore_eos=False,
                                                  stop_token_ids=self.stop_ids, **self.request.sampling())
        try:
            self._first = await anext(self._tokens)
            self._first_at = time.perf_counter()
        except asyncio.CancelledError:      # `generate` queued the abort on its way out
            self.state.metrics.finished.labels("abort").inc()
            raise
        except Exception as e:   # noqa: BLE001 - every engine error becomes an HTTP error
            error = _engine_error(e)
            if error.status >= 500:         # a refused request (400) is counted as rejected by the handler
                self.state.metrics.finished.labels("error").inc()
            raise error from None
        self.state.metrics.prompt_tokens.inc(len(self.prompt))

    async def deltas(self):
        """Yield text pieces as tokens arrive; at the end `finish_reason` is set. Leaving early (a client
        that disconnected, a stop string) aborts the request, which frees its cache blocks."""
        metrics, detokenizer = self.state.metrics, self.detokenizer
        token, last = self._first, self._first_at
        metrics.observe_token(last - self.arrival, first=True)
        async with aclosing(self._tokens) as tokens:
            try:
                while True:
                    piece = detokenizer.add(token)
                    if piece:
                        yield piece
                    if detokenizer.stopped:
                        self.finish_reason = "stop"
                        break
                    try:
                        token = await anext(tokens)
                    except StopAsyncIteration:
                        break
                    now = time.perf_counter()
                    metrics.observe_token(now - last, first=False)
                    last = now
                rest = detokenizer.flush()
                if rest:
                    yield rest
                if self.finish_reason is None:
                    self.finish_reason = "stop" if detokenizer.tokens[-1] in self.stop_ids else "length"
            except Exception as e:   # noqa: BLE001 - the engine failed mid-request
                self.finish_reason = "error"
                raise _engine_error(e) from None
            finally:
                metrics.finished.labels(self.finish_reason or "abort").inc()

    async def text(self) -> str:
        return "".join([piece async for piece in self.deltas()])

    def usage(self) -> Usage:
        done = len(self.detokenizer.tokens)
        return Usage(prompt_tokens=len(self.prompt), completion_tokens=done, total_tokens=len(self.prompt) + done)


def _sse(events):
    """Server-sent events: `data: {json}` per event, an error event if the engine fails, then `data: [DONE]`."""
    from fastapi.responses import StreamingResponse

    async def body():
        try:
            async with aclosing(events):
                async for event in events:
                    yield f"data: {event.model_dump_json()}\n\n"
        except OpenAIError as e:
            error = ErrorResponse(error=ErrorInfo(message=str(e), type=e.kind, param=e.param, code=e.code))
            yield f"data: {error.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _completion_events(gen: _Generation, model: str, include_usage: bool):
    rid = new_id("cmpl")
    async with aclosing(gen.deltas()) as deltas:
        async for piece in deltas:
            yield CompletionResponse(id=rid, model=model, choices=[CompletionChoice(text=piece)])
    yield CompletionResponse(id=rid, model=model, choices=[CompletionChoice(text="", finish_reason=gen.finish_reason)])
    if include_usage:
        yield CompletionResponse(id=rid, model=model, choices=[], usage=gen.usage())


async def _chat_events(gen: _Generation, model: str, include_usage: bool):
    rid = new_id("chatcmpl")
    yield ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant",
                                                                                             content=""))])
    async with aclosing(gen.deltas()) as deltas:
        async for piece in deltas:
            yield ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=ChatDelta(content=piece))])
    yield ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(delta=ChatDelta(),
                                                                            finish_reason=gen.finish_reason)])
    if include_usage:
        yield ChatCompletionChunk(id=rid, model=model, choices=[], usage=gen.usage())


async def _unless_disconnected(raw, work):
    """Await the coroutine `work`, cancelling it if the client of `raw` (a starlette Request whose body
    was read) disconnects first; cancelling a generation aborts its request in the engine."""
    async def disconnected() -> None:
        try:
            while (await raw.receive())["type"] != "http.disconnect":
                pass
        except Exception:   # noqa: BLE001 - this connection cannot be watched: let the request run to its end
            await asyncio.get_running_loop().create_future()

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():           # the client left (or this handler was cancelled)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        from fastapi.responses import Response

        return Response(status_code=499)      # nobody reads it: "client closed request", as nginx logs it
    return task.result()


class _StampArrival:
    """ASGI middleware: `scope["inferforge.arrival"]` = `time.perf_counter()` when the request arrived
    (its headers were read), before the body is read, parsed and tokenized: the start of TTFT."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope["inferforge.arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


def _validation_error(exc) -> OpenAIError:
    """FastAPI's RequestValidationError (422 by default) as a 400 naming the first bad field."""
    errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'cannot parse it')})")

    def field_path(error) -> list[str]:
        return [str(part) for part in error.get("loc", ()) if part != "body" and not isinstance(part, int)]

    def text(error) -> str:
        return str(error.get("msg", "invalid value")).removeprefix("Value error, ")

    fields = field_path(first)
    if not fields:     # a check on the whole body: our messages start with the field's name
        head = text(first).split(":")[0]
        return OpenAIError(text(first), param=head if " " not in head else None)
    # A union (prompt: string or token ids) reports one error per alternative: say them together.
    same = [text(e) for e in errors if field_path(e)[:1] == fields[:1]]
    message = "; or ".join(dict.fromkeys(same)) if len(same) > 1 else f"{'.'.join(fields)}: {same[0]}"
    return OpenAIError(f"{fields[0]}: {message}" if len(same) > 1 else message, param=fields[0])


def create_app(engine: AsyncEngine, tokenizer, *, model_name: str, max_model_len: int | None = None):
    """The FastAPI app serving `engine` (started and shut down with the app's lifespan) under `model_name`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    llm = engine.engine
    spec = llm.model.spec
    state = ServingState(engine, tokenizer, model_name, max_model_len or llm.max_context,
                         tuple(spec.eos_token_ids), spec.vocab_size, ServerMetrics(engine))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="inferforge", lifespan=lifespan)
    app.add_middleware(_StampArrival)
    app.state.serving = state

    @app.exception_handler(OpenAIError)
    async def openai_error(request, exc: OpenAIError):
        if exc.status < 500:       # the client's mistake, refused before generating: not an engine failure
            state.metrics.rejected.inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        state.metrics.rejected.inc()
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return OpenAIError(str(exc.detail), status=exc.status_code, kind=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        return OpenAIError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="internal_error").response()

    def check_common(request) -> None:
        state.check_model(request.model)
        state.check_token_ids(request.stop_token_ids or [], "stop_token_ids")

    async def complete(request: CompletionRequest, arrival: float):
        check_common(request)
        if isinstance(request.prompt, list):
            state.check_token_ids(request.prompt, "prompt")
        prompt = request.prompt if isinstance(request.prompt, list) else state.encode(request.prompt)
        gen = _Generation(state, prompt, request, request.max_tokens, arrival)
        await gen.start()
        if request.stream:
            return _sse(_completion_events(gen, state.model_name, request.include_usage))
        text = await gen.text()
        return CompletionResponse(id=new_id("cmpl"), model=state.model_name, usage=gen.usage(),
                                  choices=[CompletionChoice(text=text, finish_reason=gen.finish_reason)])

    async def chat(request: ChatCompletionRequest, arrival: float):
        check_common(request)
        prompt = state.chat_prompt(request)
        max_tokens = request.token_limit or state.max_model_len - len(prompt)
        if max_tokens < 1:
            raise OpenAIError(f"the messages ({len(prompt)} tokens) fill the model's context window "
                              f"({state.max_model_len} tokens); shorten them", param="messages",
                              code="context_length_exceeded")
        gen = _Generation(state, prompt, request, max_tokens, arrival)
        await gen.start()
        if request.stream:
            return _sse(_chat_events(gen, state.model_name, request.include_usage))
        text = await gen.text()
        return ChatCompletionResponse(id=new_id("chatcmpl"), model=state.model_name, usage=gen.usage(),
                                      choices=[ChatChoice(message=ChatMessageOut(content=text),
                                                          finish_reason=gen.finish_reason)])

    def arrival_of(raw: Request) -> float:
        return raw.scope.get("inferforge.arrival", time.perf_counter())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await _unless_disconnected(raw, complete(body, arrival_of(raw)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await _unless_disconnected(raw, chat(body, arrival_of(raw)))

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len)])

    @app.get("/health")
    async def health():
        if not engine.is_running():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
