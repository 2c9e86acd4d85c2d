"""`inferforge quantize MODEL --config ...` on a tiny Llama checkpoint, and `inferforge.load` of the artifact."""

import json

import pytest
import torch

import inferforge
from inferforge.cli import main
from inferforge.optimize.quantize import Int8WeightOnlyLinear
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    path = save_tiny_llama(root / "tiny")
    save_word_tokenizer(path)
    return path, save_word_text(root / "cal.txt")


def test_quantize_command_writes_a_loadable_artifact(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    out = tmp_path / "q8"
    code = main(["quantize", str(path), "--config", "int8-weight-only", "--calibration", str(cal), "--num-samples", "4",
                 "--seq-len", "16", "--skip", "lm_head", "--output", str(out), "--json", "-q"])
    assert code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "quantized-causal-lm" and manifest["runtime"]["format"] == "int8-weight-only"
    assert manifest["quantization"]["skipped"] == ["lm_head"] and manifest["quantization"]["calibration_sha256"]
    assert manifest["validation"]["top1_agreement"] > 0.8 and manifest["validation"]["tokens"] == 2 * 15
    model = inferforge.load(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8WeightOnlyLinear)
    ids = torch.randint(3, 256, (1, 10))
    from transformers import LlamaForCausalLM

    from inferforge.optimize import Int8WeightOnly, quantize

    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantize(reference, Int8WeightOnly(skip=("lm_head",)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # Every file gets the usual permissions (the weights were once left 0600 by their temp file).
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["manifest.json"], modes
    # `inspect` reads a quantized LLM's manifest (it used to expect an encoder's runtime).
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format int8-weight-only" in printed and "top1_agreement" in printed and "lowest SQNR" in printed


def test_gate_and_auto_skip(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    args = ["quantize", str(path), "--config", "int4-gptq", "--calibration", str(cal), "--num-samples", "4",
            "--seq-len", "16", "--group-size", "32", "--min-top1-agreement", "1.0", "-q"]
    assert main([*args, "--output", str(tmp_path / "strict")]) == 1
    assert "quantization gate missed: top-1 agreement" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()                      # no artifact for a failed gate
    assert main([*args, "--auto-skip", "--output", str(tmp_path / "mixed"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["quantization"]["auto_skipped"] and manifest["validation"]["top1_agreement"] == 1.0
    assert manifest["passed"]


def test_quantize_config_errors(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["quantize", str(path), "--config", "w8a8", "--output", str(tmp_path / "x")]) == 2
    assert "needs --calibration FILE" in capsys.readouterr().err
    assert main(["quantize", str(path), "--config", "int4-g128", "--output", str(tmp_path / "y"), "-q"]) == 2
    assert "in_features (64) is not a multiple of group_size (128)" in capsys.readouterr().err
