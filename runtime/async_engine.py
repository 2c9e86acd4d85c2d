"""`AsyncEngine`: one background thread runs an `LLMEngine` for many asyncio clients.

The thread owns the engine; nothing else touches it. Clients talk to it through one thread-safe
queue of commands (add a request, abort a request, stop). Between two engine steps the thread
takes every queued command, then runs `engine.step()` and hands each sampled token to its
request's `asyncio.Queue` with `loop.call_soon_threadsafe`. Requests from all clients therefore
share continuous batching. When no request is left, the thread sleeps on the command queue.

A request's queue receives, in order: its tokens (ints), then one `_Done` (finished: the engine's
finish reason) or an exception (refused at admission, or the engine failed). If a step raises,
every request in flight gets that exception, the engine's requests are dropped (their cache
blocks freed) and the loop goes on serving new requests.

Requests submitted before `start()` wait for it; they join the first step together.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from inferforge.runtime.engine import LLMEngine


@dataclass(frozen=True)
class _Done:
    reason: str


@dataclass
class _Add:
    request_id: int
    prompt: list
    params: dict
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue


@dataclass(frozen=True)
class _Abort:
    request_id: int


_STOP = object()


class EngineShutDown(RuntimeError):
    """The engine was shut down while a request was waiting or running."""


class AsyncEngine:
    """Serve an `LLMEngine` to asyncio code: `async for token in ae.generate(prompt, max_tokens=...)`."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._requests: dict[int, _Add] = {}          # in flight; touched by the engine thread only
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._closed = False
        self._counters = {"steps": 0, "batched_steps": 0, "max_running": 0, "requests_added": 0,
                          "requests_finished": 0, "requests_aborted": 0, "requests_failed": 0,
                          "prompt_tokens": 0, "generation_tokens": 0, "engine_errors": 0}
        self._snapshot = dict(engine.stats())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lifecycle:
            if self._closed:
                raise EngineShutDown("this AsyncEngine was shut down; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="inferforge-engine", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread after the current step; requests still in flight get `EngineShutDown` (idempotent)."""
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._commands.put(_STOP)
        if thread is not None:
            thread.join()
        else:       # never started: fail what was submitted, here
            self._drain_commands()
            self._fail_all(EngineShutDown("the engine was shut down before it started"))

    def is_running(self) -> bool:
        """True while the engine thread is alive and not shut down."""
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> AsyncEngine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ clients
    async def generate(self, prompt: list[int], *, max_tokens: int, temperature: float = 0.0,
                       top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                       ignore_eos: bool = False, stop_token_ids: list[int] | None = None) -> AsyncIterator[int]:
        """Yield the token ids generated for `prompt` as soon as each is sampled.

        Parameters as `LLMEngine.add_request` (`max_tokens` is its `max_new_tokens`). A refused
        request raises (`ContextWindowExceeded`, `UserInputError`) before the first token. If the
        consumer stops early (`aclose()`, its task cancelled), the request is aborted and its cache
        blocks are freed."""
        request = _Add(next(self._ids), list(prompt) if isinstance(prompt, (list, tuple)) else prompt,
                       dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            ignore_eos=ignore_eos, stop_token_ids=stop_token_ids),
                       asyncio.get_running_loop(), asyncio.Queue())
        with self._lifecycle:    # shutdown() cannot slip between the check and the put
            if self._closed:
                raise EngineShutDown("this AsyncEngine was shut down")
            self._commands.put(request)
        done = False
        try:
            while True:
                item = await request.tokens.get()
                if isinstance(item, int):
                    yield item
                elif isinstance(item, _Done):
                    done = True
                    return
                else:
                    done = True
                    raise item
        finally:
            if not done:    # the consumer stopped early: no await here, so a cancelled task still gets here
                self._commands.put(_Abort(request.request_id))

    def stats(self) -> dict:
        """running, waiting, kv_blocks_used, kv_blocks_total (as of the last step), plus counters: steps,
        batched_steps (steps that ran more than one sequence), max_running (the most sequences in one
        step), requests added / finished / aborted / failed, prompt and generation tokens, engine errors."""
        return {**self._snapshot, **self._counters}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            if not self._drain_commands(block=not engine.has_unfinished()):
                self._fail_all(EngineShutDown("the engine was shut down"))
                return
            if not engine.has_unfinished():
                continue
            try:
                produced = engine.step()
            except Exception as error:   # noqa: BLE001 - a failed step fails its requests, not the server
                self._counters["engine_errors"] += 1
                self._fail_all(error)
                continue
            # Stats first: a client that reads them right after its last token sees this step counted.
            self._count_step(produced)
            self._snapshot = engine.stats()
            for request_id, token in produced:
                self._deliver(request_id, token)
            for request_id, reason in engine.finished.items():
                self._deliver(request_id, _Done(reason))
                self._requests.pop(request_id, None)

    def _drain_commands(self, block: bool = False) -> bool:
        """Apply every queued command (waiting for one if `block`); False once asked to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                tracked = self._requests.pop(command.request_id, None)
                if self.engine.abort(command.request_id) or tracked:
                    self._counters["requests_aborted"] += 1
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._snapshot = self.engine.stats()
        return True

    def _add(self, request: _Add) -> None:
        try:
            self.engine.add_request(request.request_id, request.prompt, **request.params)
        except Exception as error:   # noqa: BLE001 - refused: the client raises it before its first token
            self._counters["requests_failed"] += 1
            self._snapshot = self.engine.stats()
            self._send(request, error)
            return
        self._requests[request.request_id] = request
        self._counters["requests_added"] += 1
        self._counters["prompt_tokens"] += len(request.prompt)

    def _count_step(self, produced: list) -> None:
        # The sequences in this step: those still running after it plus those it finished.
        ran = self.engine.stats()["running"] + len(self.engine.finished)
        counters = self._counters
        counters["steps"] += 1
        counters["batched_steps"] += ran > 1
        counters["max_running"] = max(counters["max_running"], ran)
        counters["generation_tokens"] += len(produced)
        counters["requests_finished"] += len(self.engine.finished)

    def _deliver(self, request_id: int, item) -> None:
        request = self._requests.get(request_id)
        if request is not None and not self._send(request, item):
            # The client's event loop is gone: nobody will read this request again.
            self.engine.abort(request_id)
            self._requests.pop(request_id, None)
            self._counters["requests_aborted"] += 1

    @staticmethod
    def _send(request: _Add, item) -> bool:
        try:
            request.loop.call_soon_threadsafe(request.tokens.put_nowait, item)
            return True
        except RuntimeError:        # the loop is closed
            return False

    def _fail_all(self, error: BaseException) -> None:
        """Every request in flight gets `error`; the engine drops them and frees their blocks."""
        failed = list(self._requests.values())
        self._requests.clear()
        for request in failed:
            try:
                self.engine.abort(request.request_id)
            except Exception:   # noqa: BLE001 - a broken engine fails its next step too; keep failing requests
                pass
        self._counters["requests_failed"] += len(failed)
        self._snapshot = self.engine.stats()
        for request in failed:
            self._send(request, error)
