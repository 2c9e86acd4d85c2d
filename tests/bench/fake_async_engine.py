"""A small stand-in for `inferforge.runtime.async_engine.AsyncEngine` (same interface) until that module
is merged: a background thread steps the `LLMEngine` and hands each sampled token to the request's
asyncio queue. Test-only: it reaches into the engine's request list."""

from __future__ import annotations

import asyncio
import threading


class FakeAsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._lock, self._wake, self._stop = threading.Lock(), threading.Event(), threading.Event()
        self._queues: dict[int, tuple] = {}
        self._next = 0
        self._thread = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.engine._running), "waiting": len(self.engine._waiting),
                    "kv_blocks_used": 0, "kv_blocks_total": self.engine.cache.num_blocks}

    async def generate(self, prompt, *, max_tokens, temperature=0.0, top_p=None, top_k=None, seed=None,
                       ignore_eos=False, stop_token_ids=None):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        stop = [] if ignore_eos else stop_token_ids
        (request,) = self.engine._make_requests([prompt], max_tokens, temperature, top_k, top_p, seed, stop, None)
        with self._lock:
            request.index = self._next
            self._next += 1
            self._queues[request.index] = (loop, queue)
            self.engine._waiting.append(request)
        self._wake.set()
        while (token := await queue.get()) is not None:
            yield token

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            with self._lock:
                busy = bool(engine._waiting or engine._running)
                produced = engine.step() if busy else []
                active = {r.index for r in engine._waiting + engine._running}
                done = [i for i in self._queues if i not in active]
                targets = dict(self._queues)
                for i in done:
                    del self._queues[i]
            for index, token in produced:
                loop, queue = targets[index]
                loop.call_soon_threadsafe(queue.put_nowait, token)
            for index in done:
                loop, queue = targets[index]
                loop.call_soon_threadsafe(queue.put_nowait, None)
            if not busy:
                self._wake.wait(0.01)
                self._wake.clear()


def install_if_missing(monkeypatch):
    """Make `inferforge.runtime.async_engine.AsyncEngine` importable: the real one, or this fake."""
    import sys
    import types

    try:
        import inferforge.runtime.async_engine  # noqa: F401
    except ImportError:
        module = types.ModuleType("inferforge.runtime.async_engine")
        module.AsyncEngine = FakeAsyncEngine
        monkeypatch.setitem(sys.modules, "inferforge.runtime.async_engine", module)
    return sys.modules["inferforge.runtime.async_engine"].AsyncEngine
