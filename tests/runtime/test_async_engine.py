"""`LLMEngine`'s online-serving API and `AsyncEngine` in-process, on a seeded random tiny Llama."""

import asyncio
import time

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.runtime.async_engine import AsyncEngine, EngineShutDown
from inferforge.runtime.engine import ContextWindowExceeded, LLMEngine
from tests.factories_llama import save_tiny_llama

PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 50)), [1, 99], [1, 7, 3, 7, 3, 250]]
DEADLINE_S = 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.05)


def engine(path, **kwargs):
    return LLMEngine.from_pretrained(path, dtype=torch.float32, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def greedy(tiny):
    return engine(tiny, max_num_seqs=4).generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])


async def wait_for(condition, what: str):
    """Poll `condition()` until it holds; generous deadline, never a timing assertion."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_add_request_abort_and_stats(tiny, greedy):
    eng = engine(tiny, max_num_seqs=4)
    eng.add_request(10, PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    eng.add_request(11, PROMPTS[1], max_new_tokens=3, ignore_eos=True)
    with pytest.raises(UserInputError, match="request id 10 is already in use"):
        eng.add_request(10, PROMPTS[2], max_new_tokens=2)
    with pytest.raises(ContextWindowExceeded):
        eng.add_request(12, [1] * 250, max_new_tokens=10)
    assert eng.stats() == {"running": 0, "waiting": 2, "kv_blocks_used": 0, "kv_blocks_total": eng.cache.num_blocks}
    out, finished = {}, {}
    while eng.has_unfinished() and len(out.get(10, [])) < 5:
        for request_id, token in eng.step():
            out.setdefault(request_id, []).append(token)
        finished.update(eng.finished)
    assert finished == {11: "length"} and out[11] == greedy[1][:3]
    assert eng.stats()["running"] == 1 and eng.stats()["kv_blocks_used"] > 0
    assert eng.abort(10) and not eng.abort(10)
    assert not eng.has_unfinished() and eng.stats()["kv_blocks_used"] == 0
    assert out[10] == greedy[0][:5]


def test_stop_token_finish_reason(tiny, greedy):
    eng = engine(tiny)
    target = greedy[0][2]
    eng.add_request(0, PROMPTS[0], max_new_tokens=10, stop_token_ids=[target])
    tokens, reasons = [], {}
    while eng.has_unfinished():
        tokens += [t for _, t in eng.step()]
        reasons.update(eng.finished)
    assert tokens == greedy[0][:greedy[0].index(target) + 1] and reasons == {0: "stop"}


def test_concurrent_requests_share_steps_and_match_generate(tiny, greedy):
    async def main():
        ae = AsyncEngine(engine(tiny, max_num_seqs=4))

        async def one(prompt):
            return [t async for t in ae.generate(prompt, max_tokens=10, ignore_eos=True)]

        # Submitted before start(): all four join the first step, so batching is certain, not timing-dependent.
        tasks = [asyncio.create_task(one(p)) for p in PROMPTS]
        await asyncio.sleep(0)
        with ae:
            results = await asyncio.gather(*tasks)
            return results, ae.stats()

    results, stats = asyncio.run(main())
    assert results == greedy
    assert stats["max_running"] == 4 and stats["batched_steps"] >= 9
    assert stats["requests_finished"] == 4 and stats["generation_tokens"] == 40
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0


def test_aclose_and_cancel_abort_the_request_and_free_blocks(tiny):
    async def main():
        with AsyncEngine(engine(tiny)) as ae:
            stream = ae.generate(PROMPTS[1], max_tokens=200, ignore_eos=True)
            assert isinstance(await anext(stream), int)
            await anext(stream)
            await stream.aclose()
            await wait_for(lambda: ae.stats()["requests_aborted"] == 1, "the abort")
            await wait_for(lambda: ae.stats()["kv_blocks_used"] == 0 and ae.stats()["running"] == 0, "freed blocks")

            started = asyncio.Event()

            async def consume():
                async for _ in ae.generate(PROMPTS[0], max_tokens=200, ignore_eos=True):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_for(lambda: ae.stats()["requests_aborted"] == 2, "the second abort")
            await wait_for(lambda: ae.stats()["kv_blocks_used"] == 0 and ae.stats()["running"] == 0, "freed blocks")

    asyncio.run(main())


def test_refused_request_raises_before_the_first_token(tiny, greedy):
    async def main():
        with AsyncEngine(engine(tiny)) as ae:
            received = []
            with pytest.raises(ContextWindowExceeded, match="exceeds the model's context window"):
                async for token in ae.generate([1] * 250, max_tokens=10):
                    received.append(token)
            with pytest.raises(UserInputError, match="token ids must be ints"):
                async for token in ae.generate([1, 999], max_tokens=2):
                    received.append(token)
            assert received == []
            # The engine goes on serving.
            assert [t async for t in ae.generate(PROMPTS[0], max_tokens=10, ignore_eos=True)] == greedy[0]
            return ae.stats()

    stats = asyncio.run(main())
    assert stats["requests_failed"] == 2 and stats["kv_blocks_used"] == 0


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny, greedy):
    eng = engine(tiny)
    real_step, calls = eng.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected kernel failure")
        return real_step()

    eng.step = flaky_step

    async def main():
        with AsyncEngine(eng) as ae:
            got = []
            with pytest.raises(RuntimeError, match="injected kernel failure"):
                async for token in ae.generate(PROMPTS[0], max_tokens=10, ignore_eos=True):
                    got.append(token)
            assert got == greedy[0][:2]
            assert [t async for t in ae.generate(PROMPTS[0], max_tokens=10, ignore_eos=True)] == greedy[0]
            return ae.stats()

    stats = asyncio.run(main())
    assert stats["engine_errors"] == 1 and stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_shutdown_fails_pending_requests_and_refuses_new_ones(tiny):
    async def main():
        ae = AsyncEngine(engine(tiny))
        pending = asyncio.create_task(anext(ae.generate(PROMPTS[0], max_tokens=4)))
        await asyncio.sleep(0)
        ae.shutdown()
        ae.shutdown()                        # idempotent
        with pytest.raises(EngineShutDown):
            await pending
        with pytest.raises(EngineShutDown):
            await anext(ae.generate(PROMPTS[0], max_tokens=4))
        with pytest.raises(EngineShutDown):
            ae.start()

    asyncio.run(main())
