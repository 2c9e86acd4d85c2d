"""scripts/bench_engine_cpu.py: the batch-1 weight-streaming floors it reports next to each side."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine_cpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_engine_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_reads_every_linear_weight_once_and_not_the_embedding():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 12), torch.nn.Linear(12, 8),
                                torch.nn.Linear(8, 50, bias=False))
    seconds, weight_bytes = _script().streaming_floor_seconds(model, passes=3)
    assert weight_bytes == 4 * (8 * 12 + 12 * 8 + 8 * 50)
    assert seconds > 0


def test_reps_below_one_are_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--reps", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("layout", [False, "onednn"])
def test_the_engine_floor_reads_every_projection_and_the_lm_head_once(tmp_path, layout):
    from inferforge.runtime.engine import LLMEngine
    from tests.factories_llama import save_tiny_llama

    engine = LLMEngine.from_pretrained(save_tiny_llama(tmp_path / "tiny"), dtype=torch.float32, device="cpu",
                                       max_num_seqs=2, cpu_packed_linears=layout)
    spec = engine.model.spec
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    seconds, weight_bytes = _script().engine_linears_seconds(engine.model, passes=3)
    assert weight_bytes == 4 * (spec.num_layers * per_layer + spec.vocab_size * hidden)   # untied LM head
    assert seconds > 0
