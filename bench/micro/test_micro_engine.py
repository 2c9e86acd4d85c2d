"""One decode `LLMEngine.step()` on the tiny random Llama, with 1 and with 8 sequences in the batch.

`stream()` queues the requests and its first `next()` runs the prefill step; the benchmark then drives
`step()` itself, every call a pure decode step (one new token per sequence), and closing the stream
frees the cache. Rounds are fixed so the sequences never reach `max_new_tokens`."""

from __future__ import annotations

import pytest

PROMPT_LEN, ROUNDS, WARMUP = 8, 30, 3


@pytest.mark.parametrize("batch", [1, 8])
def test_engine_decode_step(benchmark, kernel_path, tiny_llama_dir, batch):
    from inferforge.runtime.engine import LLMEngine

    engine = LLMEngine.from_pretrained(tiny_llama_dir, max_num_seqs=8, max_context=128)
    prompts = [[3 + (i * 7 + j) % 200 for j in range(PROMPT_LEN)] for i in range(batch)]
    stream = engine.stream(prompts, max_new_tokens=ROUNDS + WARMUP + 4, stop_token_ids=[])
    next(stream)   # admission and prefill of every prompt; the next steps decode all of them
    benchmark.group = "engine decode step, tiny Llama (2 layers, 64 wide)"
    benchmark.extra_info.update(path=kernel_path(engine.model.device.type == "cuda"), batch=batch,
                                tokens_per_step=batch, prompt_len=PROMPT_LEN)
    try:
        produced = benchmark.pedantic(engine.step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    finally:
        stream.close()
    assert len(produced) == batch
