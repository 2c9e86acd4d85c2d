"""The CUDA-graph decode runner: its padded static-shape path (eager, on CPU) against the normal engine,
the capture itself on a GPU, and the benchmark script's argument parsing."""

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.runtime.cuda_graphs import DecodeGraphRunner, decode_buckets
from inferforge.runtime.engine import LLMEngine
from tests.factories_llama import save_tiny_llama

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing CUDA graphs needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _prompts(n):
    return [[3 + (7 * i + j) % 250 for j in range(4 + 3 * i)] for i in range(n)]


def test_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(5) == [1, 2, 4, 8]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("num_seqs, bucket", [(1, 1), (3, 4), (5, 8)])
def test_padded_decode_gives_the_same_greedy_tokens(tiny, num_seqs, bucket):
    plain = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=8, max_context=128)
    want = plain.generate(_prompts(num_seqs), max_new_tokens=6)
    padded = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=8, max_context=128)
    runner = padded._graphs = DecodeGraphRunner(padded, mode="eager")
    buckets_used = []
    run = runner.run
    runner.run = lambda batch: (buckets_used.append(runner.bucket_for(batch.num_decode)), run(batch))[1]
    assert padded.generate(_prompts(num_seqs), max_new_tokens=6) == want
    # Every decode step went through the runner (the first token of each sequence comes from its prefill).
    assert runner.runs == 5 and buckets_used[0] == bucket
    assert runner.block_tables.shape == (8, 128 // 16)
    assert padded.cache.num_free_blocks == padded.cache.num_blocks       # padding rows took no block


def test_mixed_steps_fall_back_to_the_normal_path(tiny):
    """A step with a prompt chunk in it is not pure decode: the runner is not used for it."""
    engine = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=2, max_context=128,
                                       max_step_tokens=8)
    want = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=2, max_context=128,
                                     max_step_tokens=8).generate([[5] * 3, [6] * 30], max_new_tokens=4)
    engine._graphs = DecodeGraphRunner(engine, mode="eager")
    assert engine.generate([[5] * 3, [6] * 30], max_new_tokens=4) == want
    assert 0 < engine._graphs.runs < engine.steps


def test_cuda_graphs_on_cpu_are_refused(tiny):
    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        LLMEngine.from_pretrained(tiny, device="cpu", cuda_graphs=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 5])
def test_captured_graphs_give_the_same_greedy_tokens(tiny, num_seqs):
    kwargs = dict(dtype=torch.float32, device="cuda", max_num_seqs=8, max_context=128)
    want = LLMEngine.from_pretrained(tiny, **kwargs).generate(_prompts(num_seqs), max_new_tokens=6)
    engine = LLMEngine.from_pretrained(tiny, cuda_graphs=True, **kwargs)
    assert sorted(engine._graphs.graphs) == [1, 2, 4, 8]
    assert engine.generate(_prompts(num_seqs), max_new_tokens=6) == want
    assert engine._graphs.runs == 5


def test_benchmark_script_parses_its_arguments_on_cpu():
    from inferforge.bench.kernels import bench_decode_graphs

    with pytest.raises(SystemExit) as info:
        bench_decode_graphs.main(["--help"])
    assert info.value.code == 0
    plan = bench_decode_graphs.main(["--dry-run", "--new-tokens", "32", "--batch", "1", "4"])
    assert plan == {"batches": [1, 4], "new_tokens": 32, "prompt_len": 128,
                    "providers": ["engine", "engine+cuda-graphs", "transformers-static"]}
    with pytest.raises(SystemExit):
        bench_decode_graphs.main(["--new-tokens", "0", "--dry-run"])


def test_benchmark_smoke_runs_every_provider_on_cpu(tmp_path):
    """The GPU benchmark's code paths on a 2-layer model (graphs in eager mode); the numbers mean nothing."""
    from inferforge.bench.kernels import bench_decode_graphs

    out = tmp_path / "graphs.md"
    assert bench_decode_graphs.main(["--smoke", "--batch", "2", "--new-tokens", "3", "--prompt-len", "5",
                                     "--repeats", "1", "--out", str(out)]) == 0
    assert "| 2 |" in out.read_text() and "CPU smoke run" in out.read_text()
