"""The engine on a quantized tiny Llama artifact with PyTorch's packed CPU kernels (issue 14): the
layers are packed once at load, and greedy decoding follows the previous CPU path
(INFERFORGE_CPU_PACKED=0: the PyTorch reference, float32 x times the dequantized weights) on the same
artifact. The packed kernels round activations to bfloat16 (about 2^-9 relative per layer), which can
flip a near-tie between two random logits: the tokens must match, or first differ where the
reference's top two logits are within 5% of the logit range (checked on the reference's logits)."""

import pytest
import torch

import inferforge
from inferforge.cli import main
from inferforge.kernels import cpu_packed, weight_only_matmul
from inferforge.optimize.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from tests.factories_llama import save_tiny_llama, save_word_tokenizer

PROMPTS = [[1, 5, 9, 200, 17], [1, 99, 42]]
FORMATS = {"int8": (["--config", "int8-weight-only"], Int8WeightOnlyLinear, cpu_packed.Int8PackedCPU),
           "int4": (["--config", "int4-g128", "--group-size", "32"], Int4WeightOnlyLinear, cpu_packed.Int4PackedCPU)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed-artifacts")
    tiny = save_tiny_llama(root / "tiny", seed=3)
    save_word_tokenizer(tiny)
    out = {}
    for name, (args, _, _) in FORMATS.items():
        out[name] = root / name
        assert main(["quantize", str(tiny), *args, "--no-gate", "--output", str(out[name]), "-q"]) == 0
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_engine_generates_the_tokens_of_the_previous_path(artifacts, name, monkeypatch):
    _, module_type, packed_type = FORMATS[name]
    monkeypatch.setattr(cpu_packed, "_INTERPRET", False)        # tests run under TRITON_INTERPRET=1
    monkeypatch.delenv("INFERFORGE_CPU_PACKED", raising=False)
    engine = inferforge.load(artifacts[name], dtype=torch.float32, device="cpu", max_num_seqs=2)
    layer = engine.model.layers[0]
    for key in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"):
        # Packed at load, and the step calls the packed kernel itself, not the module around it.
        assert isinstance(layer[key], packed_type), layer[key]
    assert isinstance(engine.model.lm_head, packed_type)
    packed = engine.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])

    monkeypatch.setenv("INFERFORGE_CPU_PACKED", "0")
    monkeypatch.setattr(weight_only_matmul, "_INTERPRET", False)   # the reference, not the Triton interpreter
    previous = inferforge.load(artifacts[name], dtype=torch.float32, device="cpu", max_num_seqs=2)
    qkv = previous.model.layers[0]["qkv"]
    assert isinstance(qkv, module_type) and "_cpu_packed" not in qkv.__dict__
    want = previous.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])
    # The KV budget counts the packed forms' tensors: the int8 weights are the same bytes (bf16 scales
    # are half), the int4 codes are repacked; counting nothing would leave only embeddings and norms.
    assert engine.kv_plan.weight_bytes >= 0.75 * previous.kv_plan.weight_bytes
    for prompt, got, ref in zip(PROMPTS, packed, want):
        if got != ref:
            _assert_near_tie(artifacts[name], prompt, got, ref)


def _assert_near_tie(artifact, prompt, got, ref):
    from inferforge.optimize.llm_quantize import load_as_transformers

    step = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
    model = load_as_transformers(artifact)           # the same quantized layers, on the reference path
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:step]])).logits[0, -1].double()
    top2 = logits.topk(2).values
    assert int(logits.argmax()) == ref[step]          # the engine's previous path agrees with transformers
    assert top2[0] - top2[1] < 0.05 * (logits.max() - logits.min()), f"diverged at step {step} without a near-tie"
