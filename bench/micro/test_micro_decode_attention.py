"""Paged decode attention on the CPU at batch 8: the batched path (`paged_decode_attention_torch`,
what `paged_decode_attention` runs on a CPU) next to the per-sequence loop reference, in one group.

Shapes of a small GQA model (16 query heads, 4 KV heads, head_dim 64), blocks of 16 tokens,
sequences of 40 to 180 cached tokens scattered over a shuffled pool."""

from __future__ import annotations

import pytest
import torch

BATCH, N_HEADS, N_KV, HEAD_DIM, BLOCK_SIZE = 8, 16, 4, 64, 16
SEQ_LENS = [40, 57, 64, 93, 100, 128, 151, 180]


@pytest.fixture(scope="module")
def decode_inputs():
    g = torch.Generator().manual_seed(0)
    max_blocks = -(-max(SEQ_LENS) // BLOCK_SIZE)
    num_blocks = BATCH * max_blocks + 5
    k = torch.randn(num_blocks, BLOCK_SIZE, N_KV, HEAD_DIM, generator=g)
    v = torch.randn(num_blocks, BLOCK_SIZE, N_KV, HEAD_DIM, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:BATCH * max_blocks].reshape(BATCH, max_blocks).int()
    q = torch.randn(BATCH, N_HEADS, HEAD_DIM, generator=g)
    return q, k, v, tables, torch.tensor(SEQ_LENS, dtype=torch.int32)


@pytest.mark.parametrize("provider", ["batched", "loop-reference"])
def test_paged_decode_attention_cpu(benchmark, decode_inputs, provider):
    from inferforge.kernels.decode_attention import paged_decode_attention_torch
    from inferforge.kernels.reference import paged_decode_attention_reference

    q, k, v, tables, lens = decode_inputs
    scale = HEAD_DIM ** -0.5
    if provider == "batched":
        def run():
            return paged_decode_attention_torch(q, k, v, tables, lens, sm_scale=scale)
    else:
        def run():
            return paged_decode_attention_reference(q, k, v, tables, lens, sm_scale=scale)
    benchmark.group = f"paged decode attention, CPU, batch {BATCH}, {N_HEADS}/{N_KV} heads, d {HEAD_DIM}, fp32"
    benchmark.extra_info.update(provider=provider, batch=BATCH, seq_lens=SEQ_LENS, threads=torch.get_num_threads())
    out = benchmark.pedantic(run, rounds=50, warmup_rounds=5, iterations=1)
    assert out.shape == (BATCH, N_HEADS, HEAD_DIM) and torch.isfinite(out).all()
