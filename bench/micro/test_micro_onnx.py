"""ONNX Runtime fp32 against dynamic int8 on the tiny test BERT: one `session.run` on a fixed batch."""

from __future__ import annotations

import numpy as np
import pytest

BATCH, SEQ_LEN = 8, 32


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_encoder_call(benchmark, tiny_encoder_onnx, precision):
    from inferforge.bench.latency import fixed_length_batch
    from inferforge.encoder import ort_session

    session = ort_session(tiny_encoder_onnx[precision], threads=1)
    batch = fixed_length_batch(tiny_encoder_onnx["vocab_size"], BATCH, SEQ_LEN, np.random.default_rng(0))
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    benchmark.group = f"onnxruntime tiny BERT encoder, batch {BATCH} x {SEQ_LEN} tokens, 1 thread"
    benchmark.extra_info.update(provider=f"onnxruntime-{precision}", batch_size=BATCH, seq_len=SEQ_LEN)
    (hidden,) = benchmark(session.run, None, feeds)
    assert hidden.shape == (BATCH, SEQ_LEN, 64)
