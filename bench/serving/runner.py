"""Run a workload against a backend under a load mode; a sweep searches for the highest passing rate.

`run_point` sends the warm-up requests first (concurrently, excluded from every metric), then
starts the clock (t = 0) and sends the measured requests by the load mode's rules (schedule.py).
At each send it samples how many requests are in flight (sent and not finished): the saturation
rule's input.

Sweep: start at `--rate` R; while a point meets every target (valid and passed), double the rate,
up to `sweep_max_doublings` times. If R itself misses, halve instead. Then bisect between the
highest meeting rate and the lowest missing one `sweep_bisections` times. Every point is reported.
"""

from __future__ import annotations

import asyncio
import time

from inferforge.bench.serving.metrics import RequestRecord
from inferforge.bench.serving.schedule import LoadConfig, arrival_times
from inferforge.bench.serving.workload import BenchRequest


def _record(request: BenchRequest) -> RequestRecord:
    return RequestRecord(request.id, request.prompt_tokens, request.output_len)


async def run_point(backend, requests: list[BenchRequest], load: LoadConfig, *, seed: int = 0,
                    on_done=None) -> list[RequestRecord]:
    """Measured requests only (warm-up excluded); records in request order."""
    records = [_record(r) for r in requests]
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    in_flight = 0

    async def send(request: BenchRequest, record: RequestRecord, scheduled: float) -> None:
        nonlocal in_flight
        record.scheduled_s, record.in_flight_at_send = scheduled, in_flight
        in_flight += 1
        try:
            await backend.send(request, record, clock)
        finally:
            in_flight -= 1
            if on_done is not None:
                on_done()

    if load.mode == "concurrency":
        queue = list(zip(requests, records))
        queue.reverse()

        async def client() -> None:
            while queue:
                request, record = queue.pop()
                await send(request, record, clock())

        await asyncio.gather(*(client() for _ in range(min(load.concurrency, len(requests)))))
        return records
    rate = float("inf") if load.mode == "offline" else load.rate
    times = arrival_times(len(requests), rate, burstiness=load.burstiness, seed=seed)
    tasks = []
    for request, record, at in zip(requests, records, times):
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(request, record, float(at))))
    await asyncio.gather(*tasks)
    return records


async def warm_up(backend, requests: list[BenchRequest]) -> None:
    """Send the warm-up requests together and wait for them; their records are dropped."""
    start = time.perf_counter()
    await asyncio.gather(*(backend.send(r, _record(r), lambda: time.perf_counter() - start) for r in requests))


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
