"""The generation engine on a seeded random tiny Llama, against transformers and against itself."""

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.runtime.engine import ContextWindowExceeded, LLMEngine
from tests.factories_llama import save_tiny_llama

PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 70)), [1, 99], [1] + [7, 3] * 20 + [250]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def hf_greedy(path, prompt, n):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def engine(path, **kwargs):
    return LLMEngine.from_pretrained(path, dtype=torch.float32, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def reference_outputs(tiny):
    return [hf_greedy(tiny, p, 12) for p in PROMPTS]


def test_greedy_matches_transformers_in_one_batch(tiny, reference_outputs):
    out = engine(tiny, max_num_seqs=4).generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert out == reference_outputs


def test_chunked_prefill_equals_unchunked(tiny, reference_outputs):
    eng = engine(tiny, max_num_seqs=4, max_step_tokens=7)
    out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert out == reference_outputs
    assert eng.steps > 12        # prompts really were split over several steps


def test_continuous_batching_equals_one_at_a_time(tiny, reference_outputs):
    one = engine(tiny, max_num_seqs=1)
    serial = [one.generate([p], max_new_tokens=12, stop_token_ids=[])[0] for p in PROMPTS]
    # Two slots for four requests: requests join as others finish, at different steps.
    assert engine(tiny, max_num_seqs=2, max_step_tokens=16).generate(PROMPTS, max_new_tokens=12,
                                                                     stop_token_ids=[]) == serial == reference_outputs


def test_prefix_sharing_gives_identical_outputs_with_fewer_blocks(tiny):
    shared = [1] + list(range(100, 147))                # 48 tokens: 3 whole blocks of 16
    first, second = shared + [5, 6, 7], shared + [200, 201]
    fresh = engine(tiny)
    want = fresh.generate([second], max_new_tokens=6, stop_token_ids=[])
    fresh_blocks = fresh.cache.allocations
    eng = engine(tiny)
    eng.generate([first], max_new_tokens=6, stop_token_ids=[])
    before = eng.cache.allocations
    assert eng.generate([second], max_new_tokens=6, stop_token_ids=[]) == want
    assert eng.cache.reused_tokens == 48
    assert eng.cache.allocations - before == fresh_blocks - 3


def test_stop_tokens_end_generation(tiny, reference_outputs):
    target = reference_outputs[0][3]
    out = engine(tiny).generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=[target])[0]
    assert out == reference_outputs[0][:reference_outputs[0].index(target) + 1]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny, reference_outputs):
    eng = engine(tiny, max_num_seqs=4)
    a = eng.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    b = eng.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    c = eng.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4, stop_token_ids=[])
    assert a == b and a != c
    greedy = eng.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1, seed=0, stop_token_ids=[])
    assert greedy == [r[:8] for r in reference_outputs]


def test_stream_yields_tokens_as_they_come(tiny, reference_outputs):
    events = list(engine(tiny, max_num_seqs=4).stream(PROMPTS[:2], max_new_tokens=5, stop_token_ids=[]))
    assert [t for i, t in events if i == 0] == reference_outputs[0][:5]
    assert [i for i, _ in events[:2]] == [0, 1]          # both sequences advance step by step


def test_context_window_error_names_the_numbers(tiny):
    eng = engine(tiny)                                  # the tiny model's window is 256 tokens
    with pytest.raises(ContextWindowExceeded, match=r"prompt \(250 tokens\) \+ max_new_tokens \(10\) = 260 exceeds "
                                                    r"the model's context window \(256 tokens\)"):
        eng.generate([[1] * 250], max_new_tokens=10)


def test_kv_cache_capacity_error(tiny):
    eng = engine(tiny, num_blocks=4)                    # 64 tokens of cache
    with pytest.raises(ContextWindowExceeded, match=r"what the KV cache can hold \(64 tokens in 4 blocks\)"):
        eng.generate([[1] * 60], max_new_tokens=10)


def test_truncate_left_keeps_the_most_recent_tokens(tiny):
    eng = engine(tiny, max_context=64)
    long_prompt = list(range(3, 103))                   # 100 tokens
    got = eng.generate([long_prompt], max_new_tokens=4, truncate="left", stop_token_ids=[])
    assert got == eng.generate([long_prompt[-60:]], max_new_tokens=4, stop_token_ids=[])


def test_bad_requests(tiny):
    eng = engine(tiny)
    with pytest.raises(UserInputError, match=r"token ids must be ints in \[0, 256\), got 999"):
        eng.generate([[1, 999]], max_new_tokens=2)
    with pytest.raises(UserInputError, match="prompts must be a list of non-empty token-id lists"):
        eng.generate([[]], max_new_tokens=2)
    with pytest.raises(UserInputError, match="truncate must be None or 'left'"):
        eng.generate([[1]], max_new_tokens=2, truncate="right")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserInputError, match="model_type 'gpt2' is not supported"):
        LLMEngine.from_pretrained(tmp_path)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    path = save_tiny_llama(tmp_path / "llama3", seed=1, rope_scaling=scaling, rope_theta=500000.0)
    prompt = [1] + list(range(10, 50))
    assert engine(path).generate([prompt], max_new_tokens=8, stop_token_ids=[])[0] == hf_greedy(path, prompt, 8)


def test_qwen2_with_attention_bias_matches_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():   # random biases, so a missing bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "qwen2")
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, 6, dtype=torch.long))[0, 6:].tolist()
    assert engine(tmp_path / "qwen2").generate([prompt], max_new_tokens=8, stop_token_ids=[])[0] == want


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_output_or_mlp_biases_are_refused_not_ignored(tmp_path, bias):
    """Llama's attention_bias biases o_proj too, and mlp_bias the MLP: the engine applies neither, so it refuses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=64, **{bias: True})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserInputError, match=r"(o_proj|mlp\.\w+)\.bias.*not supported by the engine"):
        engine(tmp_path / "llama")


def test_fp8_kv_cache_stays_close_to_full_precision(tiny, reference_outputs):
    out = engine(tiny, max_num_seqs=4, kv_cache_dtype="fp8").generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert [o[0] for o in out] == [r[0] for r in reference_outputs]
    agree = sum(a == b for o, r in zip(out, reference_outputs) for a, b in zip(o, r))
    assert agree >= 0.6 * 48      # a random tiny model has near-ties; later tokens may drift


def test_int8_kv_cache_needs_scales(tiny):
    with pytest.raises(UserInputError, match="an int8 KV cache needs calibrated scales"):
        engine(tiny, kv_cache_dtype="int8")


def test_generate_command_streams_text(tmp_path):
    import json

    from tests.conftest import run_cli
    from tests.factories_llama import save_word_tokenizer

    path = save_tiny_llama(tmp_path / "m")
    save_word_tokenizer(path)
    prompt_ids = [1, 5, 9, 200, 17]
    want = hf_greedy(path, prompt_ids, 6)
    proc = run_cli("generate", path, "--prompt", "w5 w9 w200 w17", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"] == 5
    stop = next((i for i, t in enumerate(want) if t == 2), None)      # </s> ends generation
    assert result["tokens"] == (want if stop is None else want[:stop + 1])
    plain = run_cli("generate", path, "--prompt", "w5 w9 w200 w17", "--max-new-tokens", "6")
    assert plain.returncode == 0 and plain.stdout.strip() == result["text"]
    missing = run_cli("generate", tmp_path, "--prompt", "hi")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_load_of_a_packaged_llama_artifact_returns_the_engine(tiny, tmp_path, reference_outputs):
    import inferforge
    from inferforge.artifact import package_checkpoint
    from inferforge.errors import ArtifactError

    out = package_checkpoint(tiny, tmp_path / "art")
    eng = inferforge.load(out, dtype=torch.float32, device="cpu")
    assert isinstance(eng, LLMEngine) and eng.manifest["kind"] == "causal-lm"
    assert eng.generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=[])[0] == reference_outputs[0]
    (out / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        inferforge.load(out)


def test_sliding_window_without_eviction_equals_normal_generation(tiny, reference_outputs):
    out = engine(tiny, max_num_seqs=4).generate(PROMPTS, max_new_tokens=12, stop_token_ids=[], sliding_window=128,
                                                sink_tokens=4)
    assert out == reference_outputs


def test_sliding_window_streams_past_the_context_window_in_a_fixed_cache(tiny):
    from inferforge.runtime.llama import _linear, apply_rope, rms_norm

    eng = engine(tiny, num_blocks=12)                    # the model's window is 256 tokens
    prompt = [1] + list(range(10, 60))                   # 51 tokens: the prompt itself gets evicted in part
    held, checked = [], False
    stream = eng.stream([prompt], max_new_tokens=300, stop_token_ids=[], sliding_window=40, sink_tokens=4)
    for n, _ in enumerate(stream, start=1):
        if n == 300:        # the last token: the sequence has finished and left the cache
            break
        table = eng.cache.block_table(0)
        held.append(len(table))
        if n == 250:
            # Layer 0's keys depend only on each token and its position: every cached key must equal
            # the token's key rotated to its position *in the cache* (sinks first, then the window).
            model, cache = eng.model, eng.cache
            tokens = torch.tensor(cache.cached_tokens(0))
            assert tokens[:16].tolist() == prompt[:16]   # the sink block holds the first tokens
            layer = model.layers[0]
            nq, nkv, d = model.spec.n_heads * 16, model.spec.n_kv_heads * 16, 16
            x = rms_norm(model.embed[tokens], layer["input_layernorm"], model.spec.rms_norm_eps)
            k = _linear(x, layer["qkv"], layer["qkv_bias"])[:, nq:nq + nkv].reshape(-1, model.spec.n_kv_heads, d)
            freqs = torch.arange(len(tokens), dtype=torch.float32)[:, None] * model.inv_freq[None, :]
            want = apply_rope(k, freqs.cos(), freqs.sin())
            got = cache.k_pools[0][torch.tensor(table)].reshape(-1, model.spec.n_kv_heads, d)[:len(tokens)]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            checked = True
    assert n == 300 and checked
    assert max(held) == 1 + 3 + 1                        # sinks + window + one block of room, never more
    with pytest.raises(ContextWindowExceeded):           # the same request without the policy is refused
        eng.generate([prompt], max_new_tokens=300)


def test_sliding_window_settings_are_checked(tiny):
    eng = engine(tiny, max_context=64)
    with pytest.raises(ContextWindowExceeded, match=r"need 6 blocks of 16 tokens = 96 tokens, more than the 64"):
        eng.generate([[1, 2]], max_new_tokens=4, sliding_window=60, sink_tokens=4)
    with pytest.raises(UserInputError, match="choose one context policy"):
        eng.generate([[1, 2]], max_new_tokens=4, sliding_window=16, truncate="left")
    with pytest.raises(UserInputError, match="sliding_window needs a float KV cache"):
        engine(tiny, kv_cache_dtype="fp8").generate([[1, 2]], max_new_tokens=4, sliding_window=16)


def test_a_prompt_chunked_alone_writes_every_chunk(tiny):
    """One request, its prompt split over steps that need no logits: the K/V of every chunk count."""
    prompt = [1] + list(range(10, 60))
    want = hf_greedy(tiny, prompt, 6)
    assert engine(tiny, max_step_tokens=16).generate([prompt], max_new_tokens=6, stop_token_ids=[])[0] == want


def test_generate_command_sliding_window(tmp_path):
    import json

    from tests.conftest import run_cli
    from tests.factories_llama import save_word_tokenizer

    path = save_tiny_llama(tmp_path / "m", max_position_embeddings=64)
    save_word_tokenizer(path)
    prompt = " ".join(f"w{i}" for i in range(10, 40))
    refused = run_cli("generate", path, "--prompt", prompt, "--max-new-tokens", "60")
    assert refused.returncode == 2 and "exceeds the model's context window (64 tokens)" in refused.stderr
    proc = run_cli("generate", path, "--prompt", prompt, "--max-new-tokens", "60", "--sliding-window", "16",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)["tokens"]
    assert len(tokens) == 60 and 2 not in tokens      # 30 + 60 tokens: past the 64-token window


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_calibrated_quantized_kv_cache(tiny, reference_outputs, kv_dtype):
    from inferforge.optimize.kv_quant import KVCacheQuant, calibrate_kv_scales
    from inferforge.runtime.llama import LlamaModel

    model = LlamaModel.load(tiny, dtype=torch.float32)
    calibration = [[1] + list(range(100, 160)), [1] + [9, 8, 7] * 15]
    k_scales, v_scales = calibrate_kv_scales(model, calibration, KVCacheQuant(dtype=kv_dtype))
    assert k_scales.shape == (2, 2) and (k_scales > 0).all() and (v_scales > 0).all()
    out = engine(tiny, max_num_seqs=4, kv_cache_dtype=kv_dtype, kv_scales=(k_scales, v_scales)).generate(
        PROMPTS, max_new_tokens=12, stop_token_ids=[])
    if kv_dtype == "int8":      # calibrated int8 keeps every greedy token of this model
        assert out == reference_outputs
    else:                       # fp8 has 3 mantissa bits (and the interpreter rounds fp8 writes poorly)
        assert [o[0] for o in out] == [r[0] for r in reference_outputs]
        assert sum(a == b for o, r in zip(out, reference_outputs) for a, b in zip(o, r)) >= 0.6 * 48


def test_mistral_sliding_window_matches_transformers(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "mistral")
    prompt = [1] + list(range(20, 45))                  # longer than the window
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    got = engine(tmp_path / "mistral", max_step_tokens=10).generate([prompt], max_new_tokens=10, stop_token_ids=[])
    assert got[0] == want[0, len(prompt):].tolist()


def test_engine_refuses_a_nested_stream_and_keeps_the_rng(tiny):
    eng = engine(tiny)
    stream = eng.stream([[1, 2, 3]], max_new_tokens=4, stop_token_ids=[])
    next(stream)
    with pytest.raises(UserInputError, match="already generating"):
        eng.generate([[1, 2]], max_new_tokens=2)
    assert len(list(stream)) == 3                      # the open stream is untouched
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    eng.generate([[1, 2]], max_new_tokens=3, temperature=1.0)   # no seed: must not reseed torch's RNG
    assert torch.equal(torch.rand(1), expected)
    with pytest.raises(UserInputError, match="top_k >= 1"):
        eng.generate([[1, 2]], max_new_tokens=2, temperature=1.0, top_k=0)


def test_top_p_boundary_keeps_only_what_reaches_it():
    from inferforge.runtime.engine import sample

    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    drawn = {sample(logits, temperature=1.0, top_k=None, top_p=0.5, generator=torch.Generator().manual_seed(s))
             for s in range(50)}
    assert drawn == {0}
