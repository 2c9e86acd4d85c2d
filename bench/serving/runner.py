"""Run a workload against a backend under a load mode; a sweep searches for the highest passing rate.

`run_point` sends the warm-up requests first (concurrently, excluded from every metric), then
starts the clock (t = 0) and sends the measured requests by the load mode's rules (schedule.py).
At each send it samples how many requests are in flight (sent and not finished): the saturation
rule's input.

Sweep: start at `--rate` R; while a point meets every target (valid and passed), double the rate,
up to `sweep_max_doublings` times. If R itself misses, halve instead. Then bisect between the
highest meeting rate and the lowest missing one `sweep_bisections` times. Every point is reported.

An unreachable server or a wrong model name stops the run early (`AllFailed`, exit 2) instead of
sending every request: after warm-up when every warm-up request failed, or, with no warm-up, when
the first FIRST_FAILURES measured requests to finish all failed.
"""

from __future__ import annotations

import asyncio
import time

from inferforge.bench.serving.metrics import RequestRecord
from inferforge.bench.serving.schedule import LoadConfig, arrival_times
from inferforge.bench.serving.workload import BenchRequest
from inferforge.errors import InferforgeError

FIRST_FAILURES = 5


class AllFailed(InferforgeError):
    """Every request so far failed (unreachable server, wrong model): the run stops (exit 2)."""

    exit_code = 2



def _record(request: BenchRequest) -> RequestRecord:
    return RequestRecord(request.id, request.prompt_tokens, request.output_len)


async def run_point(backend, requests: list[BenchRequest], load: LoadConfig, *, seed: int = 0,
                    on_done=None, stop_after_failures: int | None = None) -> list[RequestRecord]:
    """Measured requests only (warm-up excluded); records in request order. With `stop_after_failures` N,
    raise AllFailed (nothing more is sent, requests in flight are cancelled) when the first N requests to
    finish all failed."""
    records = [_record(r) for r in requests]
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    in_flight = 0
    finished: list[RequestRecord] = []
    stopped: list[str] = []
    tasks: list[asyncio.Task] = []

    async def send(request: BenchRequest, record: RequestRecord, scheduled: float) -> None:
        nonlocal in_flight
        record.scheduled_s, record.in_flight_at_send = scheduled, in_flight
        in_flight += 1
        try:
            await backend.send(request, record, clock)
        finally:
            in_flight -= 1
            finished.append(record)
            if on_done is not None:
                on_done()
        n = stop_after_failures
        if n and not stopped and len(finished) == min(n, len(requests)) and not any(r.success for r in finished):
            stopped.append(f"the first {len(finished)} requests all failed (no --warmup to catch it earlier); "
                           f"first error: {finished[0].error}")
            for t in tasks:
                if t is not asyncio.current_task():
                    t.cancel()

    def check_stopped():
        if stopped:
            raise AllFailed(stopped[0])

    if load.mode == "concurrency":
        queue = list(zip(requests, records))
        queue.reverse()

        async def client() -> None:
            while queue and not stopped:
                request, record = queue.pop()
                await send(request, record, clock())

        tasks.extend(asyncio.create_task(client()) for _ in range(min(load.concurrency, len(requests))))
        await asyncio.gather(*tasks, return_exceptions=True)
        check_stopped()
        for t in tasks:
            t.result()
        return records
    rate = float("inf") if load.mode == "offline" else load.rate
    times = arrival_times(len(requests), rate, burstiness=load.burstiness, seed=seed)
    for request, record, at in zip(requests, records, times):
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if stopped:
            break
        tasks.append(asyncio.create_task(send(request, record, float(at))))
    await asyncio.gather(*tasks, return_exceptions=True)
    check_stopped()
    for t in tasks:
        t.result()
    return records


async def warm_up(backend, requests: list[BenchRequest]) -> list[RequestRecord]:
    """Send the warm-up requests together and wait for them; their records are returned (never measured)."""
    start = time.perf_counter()
    records = [_record(r) for r in requests]
    await asyncio.gather(*(backend.send(r, rec, lambda: time.perf_counter() - start)
                           for r, rec in zip(requests, records)))
    return records


async def sweep_rates(start_rate: float, meets, *, max_doublings: int, bisections: int) -> list[float]:
    """The rates a sweep visits; `await meets(rate) -> bool` runs one point. Returns them in visiting order."""
    visited = [start_rate]
    first = await meets(start_rate)
    best = start_rate if first else None
    worst = None if first else start_rate
    rate = start_rate
    for _ in range(max_doublings):
        rate = rate * 2 if first else rate / 2
        visited.append(rate)
        ok = await meets(rate)
        if ok:
            best = rate if best is None else max(best, rate)
        else:
            worst = rate if worst is None else min(worst, rate)
        if ok != first:
            break
    if best is None or worst is None:
        return visited
    for _ in range(bisections):
        rate = (best + worst) / 2
        visited.append(rate)
        if await meets(rate):
            best = rate
        else:
            worst = rate
    return visited
