"""Quantized causal-LM artifacts work with the other commands (issue 9, item 5): `inferforge.load`
returns the engine running the quantized layers on inferforge's kernels, token for token as the
transformers model with the same layers; `generate`, `bench` and `inspect` accept the artifacts."""

import json

import pytest
import torch

import inferforge
from inferforge.cli import main
from inferforge.optimize.llm_quantize import load_as_transformers
from inferforge.optimize.quantize import FP8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from inferforge.runtime.cpu_linear import PackedDenseLinear
from inferforge.runtime.engine import LLMEngine
from inferforge.runtime.llama_quantized import ConcatLinear
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")

PROMPTS = [[1, 5, 9, 200, 17], [1, 99, 42]]
FORMATS = {
    # int8 with the gate on; lm_head and one of layer 0's q/k/v stay in float (a mixed fused projection).
    "int8": ["--config", "int8-weight-only", "--skip", "lm_head", "--skip", "model.layers.0.self_attn.k_proj"],
    "int4": ["--config", "int4-g128", "--group-size", "32", "--no-gate"],      # q/k/v fused into one int4 module
    "fp8": ["--config", "fp8", "--no-gate"],                                  # per-tensor scales: run one by one
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-artifacts")
    tiny = save_tiny_llama(root / "tiny")
    save_word_tokenizer(tiny)
    cal = save_word_text(root / "cal.txt")
    out = {"tiny": tiny}
    for name, args in FORMATS.items():
        out[name] = root / name
        assert main(["quantize", str(tiny), *args, "--calibration", str(cal), "--num-samples", "4", "--seq-len", "16",
                     "--output", str(out[name]), "-q"]) == 0
    return out


def transformers_greedy(artifact, prompt, n):
    model = load_as_transformers(artifact)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_returns_the_engine_matching_transformers_token_for_token(artifacts, name):
    engine = inferforge.load(artifacts[name], dtype=torch.float32, device="cpu", max_num_seqs=4)
    assert isinstance(engine, LLMEngine) and engine.manifest["kind"] == "quantized-causal-lm"
    layers = engine.model.layers
    if name == "int8":
        assert isinstance(layers[1]["qkv"], Int8WeightOnlyLinear)                     # fused: same per-row scheme
        assert isinstance(layers[0]["qkv"], ConcatLinear)                             # k_proj kept in float
        assert isinstance(layers[0]["qkv"].parts[0], Int8WeightOnlyLinear)
        assert isinstance(layers[0]["gate_up"], Int8WeightOnlyLinear)
        assert isinstance(engine.model.lm_head, PackedDenseLinear)                    # skipped: dense (packed on CPU)
    elif name == "int4":
        assert isinstance(layers[0]["qkv"], Int4WeightOnlyLinear) and layers[0]["qkv"].out_features == 64 + 2 * 32
        assert isinstance(layers[0]["mlp.down_proj"], Int4WeightOnlyLinear)
    else:
        assert isinstance(layers[0]["qkv"], ConcatLinear) and isinstance(layers[0]["qkv"].parts[1], FP8Linear)
        assert isinstance(engine.model.lm_head, FP8Linear)
    got = engine.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])
    assert got == [transformers_greedy(artifacts[name], p, 6) for p in PROMPTS]


def test_generate_accepts_an_artifact(artifacts, capsys):
    from transformers import AutoTokenizer

    art = artifacts["int8"]
    assert main(["generate", str(art), "--prompt", "w5 w9 w200", "--max-new-tokens", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    prompt = AutoTokenizer.from_pretrained(art)("w5 w9 w200")["input_ids"]
    assert printed["prompt_tokens"] == len(prompt) == 4
    assert printed["tokens"] == transformers_greedy(art, prompt, 5)
    # The artifact is verified first: a changed file is refused.
    (art / "report.md").write_text((art / "report.md").read_text() + "edited\n")
    try:
        assert main(["generate", str(art), "--prompt", "w5", "--max-new-tokens", "2"]) == 2
        assert "'report.md' does not match its sha256" in capsys.readouterr().err
    finally:
        (art / "report.md").write_text((art / "report.md").read_text().removesuffix("edited\n"))


def test_generate_messages_name_the_flags(artifacts, capsys):
    tiny = artifacts["tiny"]
    assert main(["generate", str(tiny), "--prompt", "w5 w9", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the model's context window (256 tokens)" in err and "--truncate-left" in err
    assert "--max-new-tokens (300)" in err and "truncate='left'" not in err and "max_new_tokens" not in err
    assert main(["generate", str(tiny), "--prompt", "w5", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", str(tiny), "--prompt", "w5", "--truncate-left", "--sliding-window", "32"]) == 2
    assert "choose one context policy: --truncate-left or --sliding-window" in capsys.readouterr().err


def test_bench_measures_generation_with_the_engine(artifacts, tmp_path, monkeypatch, capsys):
    """The serving benchmark runs a quantized artifact in-process. Limits no machine can miss (1e9 ms) or meet
    (1e-6 ms) keep the test independent of the machine's speed."""
    args = ["bench", str(artifacts["int4"]), "--num-requests", "4", "--input-len", "6", "--output-len", "3",
            "--warmup", "0", "--max-num-seqs", "2", "-o", str(tmp_path / "run"), "--json", "-q"]
    assert main([*args, "--target", "ttft_ms:median:1e9", "--target", "tpot_ms:median:1e-6"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == {"backend": "inferforge-engine", "model": "int4",
                                "path": str(artifacts["int4"].resolve())}
    assert report["workload"]["settings"]["input_len"]["mean"] == 6 and report["completed"] == 4
    assert report["total_output_tokens"] == 12
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < report[f"median_{metric}"] <= report[f"p90_{metric}"] <= report[f"p99_{metric}"], metric
    assert report["median_e2el_ms"] >= report["median_ttft_ms"]
    one, two = report["targets"]
    assert one["passed"] and not two["passed"] and two["measured"] == report["median_tpot_ms"]
    assert two["limit_ms"] == 1e-6 and two["miss_by_ms"] > 0
    assert "(output tokens - 1)" in report["definitions"]["tpot_ms"]


def test_bench_accepts_a_packaged_checkpoint(artifacts, tmp_path, monkeypatch, capsys):
    from inferforge.artifact import package_checkpoint

    art = package_checkpoint(artifacts["tiny"], tmp_path / "plain")
    assert main(["bench", str(art), "--num-requests", "2", "--input-len", "4", "--output-len", "2", "--warmup", "0",
                 "-o", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ttft_ms" in out and "output tokens/s" in out and (tmp_path / "run" / "report.md").is_file()
    assert main(["bench", str(art), "--compare-source", "-q"]) == 2
    assert "--compare-source" in capsys.readouterr().err


def test_reports_and_inspect(artifacts, capsys):
    art = artifacts["int8"]
    report = json.loads((art / "report.json").read_text())
    md = (art / "report.md").read_text()
    assert report["quantization"]["skipped"] == ["model.layers.0.self_attn.k_proj", "lm_head"]
    assert report["gate"]["enabled"] and report["gate"]["limits"]["min_top1_agreement"] == 0.9
    assert report["quantization"]["data"]["held_out_sha256"] and report["environment"]["torch"]
    for text in ("## Gate", "| top-1 agreement (held-out) |", ">= 0.9 | PASS", "Skipped by pattern: "
                 "model.layers.0.self_attn.k_proj, lm_head", "Held-out tokens sha256", "## Environment", "perplexity = exp"):
        assert text in md, text
    root = str(art.parent)
    assert root not in md and root not in (art / "report.json").read_text()     # no paths of this machine
    assert main(["inspect", str(art)]) == 0
    printed = " ".join(capsys.readouterr().out.split())     # rich wraps long lines
    assert "all" in printed and "files verified" in printed and "top-1 agreement (held-out)" in printed
    assert "engine inferforge.runtime.engine.LLMEngine" in printed
    off = json.loads((artifacts["fp8"] / "report.json").read_text())
    assert off["gate"]["enabled"] is False and "**Off**" in (artifacts["fp8"] / "report.md").read_text()
    # inspect says so too: a reader of its PASS rows must see that no accuracy gate was checked.
    assert main(["inspect", str(artifacts["fp8"])]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "accuracy gate: OFF" in printed and "--no-gate" in printed
