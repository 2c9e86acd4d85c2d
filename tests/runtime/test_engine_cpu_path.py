"""The engine on the CPU path a deployment without a GPU runs (no Triton interpreter): the batched
decode attention and the PyTorch references for prefill and append_kv. Greedy tokens must equal
transformers', and batching greedy rows into one argmax must not change any row."""

import pytest
import torch

from inferforge.kernels import attention as attention_module
from inferforge.kernels import decode_attention as decode_module
from inferforge.kernels import kv_cache as cache_module
from inferforge.runtime.engine import LLMEngine
from tests.factories_llama import save_tiny_llama
from tests.test_engine import PROMPTS, hf_greedy


@pytest.fixture
def cpu_path(monkeypatch):
    for module in (attention_module, decode_module, cache_module):
        monkeypatch.setattr(module, "_INTERPRET", False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cpu"))


def engine(path, **kwargs):
    return LLMEngine.from_pretrained(path, dtype=torch.float32, device="cpu", **kwargs)


def test_greedy_matches_transformers_on_the_cpu_path(cpu_path, tiny):
    want = [hf_greedy(tiny, p, 12) for p in PROMPTS]
    eng = engine(tiny, max_num_seqs=4, max_step_tokens=16)    # chunked prefill next to running decodes
    assert eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[]) == want


def test_decode_slots_and_tables_across_block_boundaries(cpu_path, tiny):
    """Block size 4: decode steps cross block boundaries every 4 tokens; the second run reuses the
    first one's prefix blocks."""
    prompt = [1] + list(range(40, 51))                   # 12 tokens: 3 whole blocks
    want = hf_greedy(tiny, prompt, 9)
    eng = engine(tiny, max_num_seqs=2, block_size=4)
    assert eng.generate([prompt], max_new_tokens=9, stop_token_ids=[]) == [want]
    assert eng.generate([prompt, prompt], max_new_tokens=9, stop_token_ids=[]) == [want, want]
    assert eng.cache.reused_tokens > 0


def test_next_slot_equals_slots():
    """`next_slot` (the decode step's int) hands out the slots `slots(id, 1)` would, copy-on-write
    of a forked sequence's shared last block included."""
    from inferforge.kernels import PagedKVCache

    def cache():
        c = PagedKVCache(num_layers=1, num_blocks=12, n_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)
        c.add_sequence("a", [1, 2, 3, 4, 5, 6])
        c.slots("a", 6)
        c.fork("a", "b")                                   # shares a half-filled last block
        return c

    fast, slow = cache(), cache()
    for seq in ["b", "a", "b", "b", "a", "a", "a", "b"]:
        assert fast.next_slot(seq) == int(slow.slots(seq, 1))
        assert fast.block_table(seq) == slow.block_table(seq) and fast.seq_len(seq) == slow.seq_len(seq)
    assert torch.equal(fast.block_tables(["a", "b"]), slow.block_tables(["a", "b"]))


def test_greedy_rows_next_to_sampled_rows(cpu_path, tiny):
    """One step samples greedy and temperature > 0 rows together; each greedy row is what it is alone,
    and the sampled rows are reproducible with their seed."""
    eng = engine(tiny, max_num_seqs=4)
    greedy = eng.generate(PROMPTS[:2], max_new_tokens=8, stop_token_ids=[])
    for r in range(2):
        eng.add_request(r, PROMPTS[r], max_new_tokens=8, ignore_eos=True)
        eng.add_request(10 + r, PROMPTS[r], max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    out = {}
    while eng.has_unfinished():
        for rid, token in eng.step():
            out.setdefault(rid, []).append(token)
    assert [out[0], out[1]] == greedy
    again = engine(tiny, max_num_seqs=4)
    for r in range(2):
        again.add_request(10 + r, PROMPTS[r], max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    out2 = {}
    while again.has_unfinished():
        for rid, token in again.step():
            out2.setdefault(rid, []).append(token)
    assert out2 == {10: out[10], 11: out[11]}
